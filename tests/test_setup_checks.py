"""Mistakes that can be known before training fail (or are warned about) before the first training step, whatever
``guards`` says: ``guards`` switches only the clean-pass guards."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy
from torchmetrics.regression import MeanSquaredError

from lightning_evalguard import EvalGuard, EvalGuardError, EvalGuardWarning

from helpers import (
    NUM_CLASSES,
    Classifier,
    NoTraining,
    NumpyNoise,
    TensorData,
    Validates,
    loader,
    make_tensors,
    micro_accuracy,
    trainer,
)


class Regressor(NoTraining):
    """Predicts one value per sample as (N, 1); its targets are (N,)."""

    def __init__(self) -> None:
        super().__init__("linear")
        self.net = nn.Linear(6, 1)


@pytest.mark.parametrize("guards", ["raise", "off"])
@pytest.mark.parametrize(
    ("metric", "model", "preds"),
    [
        (BinaryAccuracy(), NoTraining("linear"), rf"preds of shape \(16, {NUM_CLASSES}\) and dtype torch.float32"),
        (MulticlassAccuracy(num_classes=2), NoTraining("linear"), rf"preds of shape \(16, {NUM_CLASSES}\)"),
        (MeanSquaredError(), Regressor(), r"preds of shape \(16, 1\) and dtype torch.float32"),
    ],
    ids=["binary-on-multiclass", "too-few-classes", "n-by-1-against-n"],
)
def test_a_metric_that_does_not_fit_the_outputs_fails_before_training(tmp_path, guards, metric, model, preds):
    x, y = make_tensors(32)
    targets = y.float() if isinstance(metric, MeanSquaredError) else y
    guard = EvalGuard({"m": metric}, eval_transform=nn.Identity(), guards=guards)
    with pytest.raises((ValueError, RuntimeError)) as raised:
        trainer(tmp_path, callbacks=[guard]).fit(model, loader(TensorData(x, targets, NumpyNoise())))
    notes = "\n".join(getattr(raised.value, "__notes__", []))
    assert "EvalGuard updated a clone of metric 'm'" in notes, notes
    assert type(metric).__name__ in notes
    assert __import__("re").search(preds, notes), notes
    assert "target of shape (16,)" in notes
    assert not metric.update_called  # a clone was updated, not the user's object


class DictData(TensorData):
    def __getitem__(self, index: int) -> Any:
        x, y = super().__getitem__(index)
        return {"x": x, "y": y}


@pytest.mark.parametrize("guards", ["raise", "warn", "off"])
def test_dict_batches_without_forward_fail_before_training_whatever_guards_says(tmp_path, guards):
    x, y = make_tensors(32)
    guard = EvalGuard({"acc": micro_accuracy()}, guards=guards)
    with pytest.raises(TypeError, match=r"default forward expects batches that are \(inputs, target, ...\)"):
        trainer(tmp_path, callbacks=[guard]).fit(NoTraining("linear"), loader(DictData(x, y)))


@pytest.mark.parametrize("guards", ["raise", "off"])
def test_a_forward_returning_one_tensor_fails_before_training_whatever_guards_says(tmp_path, guards):
    x, y = make_tensors(32)
    guard = EvalGuard({"acc": micro_accuracy()}, forward=lambda module, batch: module(batch[0]), guards=guards)
    with pytest.raises(TypeError, match=r"`forward=` must return a \(preds, target\) pair"):
        trainer(tmp_path, callbacks=[guard]).fit(NoTraining("linear"), loader(TensorData(x, y)))


@pytest.mark.parametrize("guards", ["raise", "off"])
def test_val_transform_without_validation_data_fails_before_training_whatever_guards_says(tmp_path, guards):
    x, y = make_tensors(32)
    guard = EvalGuard({"acc": micro_accuracy()}, eval_transform="val", guards=guards)
    with pytest.raises(ValueError, match="this fit has no validation dataloader"):
        trainer(tmp_path, callbacks=[guard]).fit(NoTraining("linear"), loader(TensorData(x, y, NumpyNoise())))


@pytest.mark.parametrize("guards", ["raise", "off"])
def test_val_transform_finds_the_validation_loaders_passed_to_fit_before_they_are_loaded(tmp_path, guards):
    x, y = make_tensors(32)
    clean = TensorData(x, y, transform=nn.Identity())
    guard = EvalGuard({"acc": micro_accuracy()}, eval_transform="val", guards=guards)
    model = Validates("linear")
    pl_trainer = trainer(tmp_path, max_epochs=2, check_val_every_n_epoch=2, callbacks=[guard])
    pl_trainer.fit(model, loader(TensorData(x, y, NumpyNoise(2.0))), loader(clean, shuffle=False))
    model.eval()
    with torch.no_grad():
        expected = (model(x).argmax(1) == y).double().mean().item()
    assert [entry["epoch"] for entry in guard.history] == [0, 1]
    assert guard.history[-1]["clean"]["acc"] == pytest.approx(expected, abs=1e-6)  # the noise was switched off
    assert list(guard.history[0]["validation"]) == [] and list(guard.history[1]["validation"]) == ["acc"]


def test_every_n_epochs_beyond_max_epochs_is_warned_about_at_fit_start(tmp_path):
    x, y = make_tensors(32)
    guard = EvalGuard({"acc": micro_accuracy()}, every_n_epochs=5, eval_transform=nn.Identity())
    with pytest.warns(EvalGuardWarning, match=r"every_n_epochs=5.*Trainer\(max_epochs=3\).*no clean pass will run"):
        trainer(tmp_path, max_epochs=3, callbacks=[guard]).fit(Classifier("linear"), loader(TensorData(x, y)))
    assert guard.history == []


def test_a_shuffling_clean_loader_is_named_as_such(tmp_path):
    x, y = make_tensors(32)
    shuffled = DataLoader(TensorData(x, y), batch_size=16, shuffle=True)
    guard = EvalGuard({"acc": micro_accuracy()}, dataloader=shuffled)
    with pytest.raises(EvalGuardError, match=r"clean loader shuffles: its sampler \(RandomSampler\).*shuffle=False"):
        trainer(tmp_path, callbacks=[guard]).fit(NoTraining("linear"), loader(TensorData(x, y)))
    seeded = DataLoader(TensorData(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3))
    state = seeded.generator.get_state()  # type: ignore[union-attr]
    guard = EvalGuard({"acc": micro_accuracy()}, dataloader=seeded)
    with pytest.raises(EvalGuardError, match=r"clean loader shuffles"):
        trainer(tmp_path, callbacks=[guard]).fit(NoTraining("linear"), loader(TensorData(x, y)))
    assert torch.equal(state, seeded.generator.get_state())  # type: ignore[union-attr]


class LazyCache(Classifier):
    """Builds a tensor it keeps on its first forward, as rotary tables or attention masks are built."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "scale"):
            self.scale = torch.ones(x.shape[1])
        return super().forward(x * self.scale)


@pytest.mark.parametrize("guards", ["raise", "off"])
def test_a_tensor_built_by_the_fit_start_forward_can_be_used_in_training(tmp_path, guards):
    # the checks before training run under no_grad: an inference tensor kept by the model would break backward
    x, y = make_tensors(32)
    guard = EvalGuard({"acc": micro_accuracy()}, eval_transform=nn.Identity(), guards=guards)
    model = LazyCache("linear")
    trainer(tmp_path, max_epochs=1, callbacks=[guard]).fit(model, loader(TensorData(x, y, NumpyNoise())))
    assert not model.scale.is_inference()
    assert [entry["epoch"] for entry in guard.history] == [0]


class OpenedInWorkers(TensorData):
    """Usable only after worker_init_fn opened its handle, as an HDF5 or LMDB dataset often is."""

    handle: Any = None

    def __getitem__(self, index: int) -> Any:
        assert self.handle is not None, "read before worker_init_fn opened the handle"
        return super().__getitem__(index)


def open_handle(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    info.dataset.handle = object()  # type: ignore[union-attr]


def test_with_guards_off_the_first_batch_comes_through_the_loaders_workers(tmp_path):
    x, y = make_tensors(32)
    data = loader(OpenedInWorkers(x, y), num_workers=1, worker_init_fn=open_handle)
    guard = EvalGuard({"acc": micro_accuracy()}, guards="off")
    trainer(tmp_path, max_epochs=1, callbacks=[guard]).fit(Classifier("linear"), data)
    assert [entry["epoch"] for entry in guard.history] == [0]
