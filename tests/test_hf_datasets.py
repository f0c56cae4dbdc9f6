"""Hugging Face ``datasets``: augmentation set with ``with_transform`` is switched off through the format transform."""

from __future__ import annotations

from typing import Any

import datasets
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_evalguard import EvalGuard

from helpers import build_net, make_tensors, micro_accuracy, trainer


def augment(batch: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
    """A format transform that adds numpy noise: the training augmentation."""
    x = torch.tensor(batch["x"])
    noise = torch.from_numpy(np.random.normal(0.0, 2.0, size=tuple(x.shape))).to(x.dtype)
    return {"x": x + noise, "y": torch.tensor(batch["y"])}


def clean(batch: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
    """The same format transform without the noise."""
    return {"x": torch.tensor(batch["x"]), "y": torch.tensor(batch["y"])}


def make_dataset(n: int = 40) -> tuple[datasets.Dataset, torch.Tensor, torch.Tensor]:
    x, y = make_tensors(n)
    return datasets.Dataset.from_dict({"x": x.tolist(), "y": y.tolist()}), x, y


class DictClassifier(pl.LightningModule):
    """Takes {"x", "y"} batches, as a Hugging Face pipeline gives them."""

    def __init__(self) -> None:
        super().__init__()
        self.net = build_net("both")
        self.train_acc = micro_accuracy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["x"])
        self.train_acc(logits, batch["y"])
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return nn.functional.cross_entropy(logits, batch["y"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_acc", (self(batch["x"]).argmax(1) == batch["y"]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def dict_forward(module: pl.LightningModule, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return module(batch["x"]), batch["y"]


def independent_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_transform_replaces_the_format_transform_and_leaves_the_training_dataset_alone(tmp_path, num_workers):
    dataset, x, y = make_dataset()
    train = dataset.with_transform(augment)
    guard = EvalGuard({"acc": micro_accuracy()}, eval_transform=clean, forward=dict_forward)
    model = DictClassifier()
    loader = DataLoader(train, batch_size=16, shuffle=True, num_workers=num_workers)
    trainer(tmp_path, max_epochs=2, callbacks=[guard]).fit(model, loader)
    assert guard.history[-1]["clean"]["acc"] == pytest.approx(independent_accuracy(model, x, y), abs=1e-6)
    assert train.format["format_kwargs"]["transform"] is augment  # the training dataset is untouched
    assert guard.history[-1]["gap"]["acc"] == pytest.approx(
        guard.history[-1]["clean"]["acc"] - guard.history[-1]["running"]["acc"]
    )


def test_val_takes_the_validation_datasets_format_transform(tmp_path):
    dataset, x, y = make_dataset()
    guard = EvalGuard({"acc": micro_accuracy()}, eval_transform="val", forward=dict_forward)
    model = DictClassifier()
    train = DataLoader(dataset.with_transform(augment), batch_size=16, shuffle=True)
    val = DataLoader(dataset.with_transform(clean), batch_size=16)
    trainer(tmp_path, max_epochs=2, callbacks=[guard]).fit(model, train, val)
    assert guard.history[-1]["clean"]["acc"] == pytest.approx(independent_accuracy(model, x, y), abs=1e-6)
    assert guard.history[-1]["generalization"]["acc"] == pytest.approx(
        guard.history[-1]["clean"]["acc"] - guard.history[-1]["validation"]["acc"]
    )


def test_without_eval_transform_the_format_augmentation_is_caught_before_training(tmp_path):
    dataset, _, _ = make_dataset()
    guard = EvalGuard({"acc": micro_accuracy()}, forward=dict_forward)

    class NoTraining(DictClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            raise AssertionError("a training step ran")

    from lightning_evalguard import EvalGuardError

    with pytest.raises(EvalGuardError, match="producing the first clean batch drew from the numpy RNG"):
        trainer(tmp_path, callbacks=[guard]).fit(
            NoTraining(), DataLoader(dataset.with_transform(augment), batch_size=16)
        )


def test_decompose_on_a_hugging_face_dataset_trains_bit_identically(tmp_path):
    weights = []
    for with_guard in (False, True):
        pl.seed_everything(0, verbose=False)
        dataset, _, _ = make_dataset(48)
        model = DictClassifier()
        callbacks = [EvalGuard({"acc": micro_accuracy()}, eval_transform=clean, forward=dict_forward, decompose=True)]
        loader = DataLoader(dataset.with_transform(augment), batch_size=16, shuffle=True)
        trainer(tmp_path, max_epochs=3, deterministic=True, callbacks=callbacks if with_guard else []).fit(
            model, loader
        )
        weights.append({key: value.clone() for key, value in model.state_dict().items()})
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    guard = callbacks[0]
    last = guard.history[-1]
    effects = sum(last[f"effect/{kind}"]["acc"] for kind in ("train_mode", "augmentation", "weight_drift"))
    assert effects == pytest.approx(last["gap"]["acc"])


def test_a_dataset_with_no_transform_attribute_and_no_format_names_the_mechanisms(tmp_path):
    from helpers import TensorData

    class Plain(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __init__(self) -> None:
            self.inner = TensorData(*make_tensors(16))

        def __len__(self) -> int:
            return 16

        def __getitem__(self, index: int) -> Any:
            return self.inner[index]

    guard = EvalGuard({"acc": micro_accuracy()}, eval_transform=nn.Identity())
    with pytest.raises(
        ValueError, match=r"has none.*not a Hugging Face datasets.Dataset.*transform_attr=.*dataloader="
    ):
        trainer(tmp_path, callbacks=[guard]).fit(DictClassifier(), DataLoader(Plain(), batch_size=8))


def test_val_with_a_validation_set_without_format_transform_says_what_to_pass(tmp_path):
    dataset, _, _ = make_dataset()
    guard = EvalGuard({"acc": micro_accuracy()}, eval_transform="val", forward=dict_forward)
    train = DataLoader(dataset.with_transform(augment), batch_size=16)
    val = DataLoader(dataset.with_format("torch"), batch_size=16)
    with pytest.raises(ValueError, match=r"validation dataset is a Hugging Face datasets.Dataset without a format"):
        trainer(tmp_path, callbacks=[guard]).fit(DictClassifier(), train, val)
