"""The clean number equals an independent eval-mode computation over the same samples."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_evalguard import EvalGuard

from helpers import (
    NUM_CLASSES,
    Classifier,
    CountSamples,
    NumpyNoise,
    TensorData,
    accuracy,
    loader,
    make_tensors,
    metric_clones,
    trainer,
)


@pytest.mark.parametrize("kind", ["linear", "dropout", "batchnorm"])
def test_clean_accuracy_equals_an_independent_eval_mode_computation(tmp_path, kind):
    x, y = make_tensors(70)  # 70 = 4 batches of 16 + a last batch of 6
    model = Classifier(kind, batch_noise=0.3)
    guard = EvalGuard(
        {"acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")}, eval_transform=nn.Identity()
    )
    trainer(tmp_path, max_epochs=2, callbacks=[guard]).fit(model, loader(TensorData(x, y, NumpyNoise())))
    assert len(guard.history) == 2
    assert guard.history[-1]["clean"]["acc"] == pytest.approx(accuracy(model, x, y), abs=1e-6)


class Calls(MulticlassAccuracy):
    """Counts update and compute calls on the instance."""

    updates = 0
    computes = 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        type(self).updates += 1
        super().update(*args, **kwargs)

    def compute(self) -> torch.Tensor:
        type(self).computes += 1
        return super().compute()


@pytest.mark.filterwarnings("ignore:EvalGuard found no running metric")
def test_metrics_are_reset_each_pass_updated_per_batch_and_computed_once(tmp_path):
    x, y = make_tensors(50)
    Calls.updates = Calls.computes = 0
    user_acc = Calls(num_classes=NUM_CLASSES)
    user_count = CountSamples()
    guard = EvalGuard({"acc": user_acc, "n": user_count}, batch_size=16)
    trainer(tmp_path, max_epochs=3, callbacks=[guard]).fit(Classifier("linear"), loader(TensorData(x, y)))
    assert [entry["clean"]["n"] for entry in guard.history] == [50.0, 50.0, 50.0]
    # ceil(50 / 16) batches, three passes; and once at fit start, on a clone, to check the metric fits the outputs
    assert Calls.updates == 3 * 4 + 1
    assert Calls.computes == 3
    assert not user_acc.update_called and not user_count.update_called


@pytest.mark.filterwarnings("ignore:EvalGuard found no running metric")
def test_metric_clones_live_on_the_module_device_and_never_on_the_user_object(tmp_path):
    x, y = make_tensors(32)
    user_metric = MulticlassAccuracy(num_classes=NUM_CLASSES)
    guard = EvalGuard({"acc": user_metric})
    trainer(tmp_path, max_epochs=1, callbacks=[guard]).fit(Classifier("linear"), loader(TensorData(x, y)))
    clones = list(metric_clones(guard).values())
    assert len(clones) == 1 and clones[0]["acc"] is not user_metric
    assert clones[0]["acc"].device == torch.device("cpu")
    assert not user_metric.update_called


@pytest.mark.filterwarnings("ignore:EvalGuard found no running metric")
def test_vector_metric_logs_one_key_per_element(tmp_path):
    x, y = make_tensors(48)
    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average=None)})
    pl_trainer = trainer(tmp_path, max_epochs=1, callbacks=[guard])
    pl_trainer.fit(Classifier("linear"), loader(TensorData(x, y)))
    keys = {key for key in pl_trainer.callback_metrics if key.startswith("evalguard/clean/")}
    assert keys == {f"evalguard/clean/acc/{index}" for index in range(NUM_CLASSES)}
