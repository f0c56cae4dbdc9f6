"""CUDA checks, run where a GPU is present (CI has none; the device sessions run this file)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from lightning_evalguard import EvalGuard

from helpers import (
    NUM_CLASSES,
    CacheWatcher,
    Classifier,
    HooklessClassifier,
    NumpyNoise,
    TensorData,
    clean_sources,
    loader,
    make_tensors,
    metric_clones,
    trainer,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Correct(Metric):
    """Counts correct predictions with device-only operations (no validation, no host sync)."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.correct += (preds.argmax(dim=1) == target).sum()
        self.total += target.numel()

    def compute(self) -> torch.Tensor:
        return self.correct.double() / self.total


def test_clean_accuracy_on_cuda_equals_an_independent_computation(tmp_path):
    x, y = make_tensors(70)
    guard = EvalGuard(
        {"acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")}, eval_transform=nn.Identity()
    )
    model = Classifier("both", batch_noise=0.3)
    pl_trainer = trainer(tmp_path, max_epochs=2, accelerator="cuda", callbacks=[guard])
    pl_trainer.fit(model, loader(TensorData(x, y, NumpyNoise()), pin_memory=True))
    (collection,) = metric_clones(guard).values()
    assert collection["acc"].device.type == "cuda"
    model.eval()
    with torch.no_grad():
        expected = (model(x.cuda()).argmax(1) == y.cuda()).double().mean().item()
    assert guard.history[-1]["clean"]["acc"] == pytest.approx(expected, abs=1e-6)


class StrictCorrect(Correct):
    """``Correct`` whose compute leaves the sync debug mode that the strict forward below turns on."""

    def compute(self) -> torch.Tensor:
        torch.cuda.set_sync_debug_mode("default")
        return super().compute()


def strict_forward(module: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    # From the first forward of the pass to the metrics' compute, any host sync raises: the transfer of every later
    # batch, the forwards and the metric updates run in "error" mode.
    torch.cuda.set_sync_debug_mode("error")
    return module(batch[0]), batch[1]


def test_the_batch_loop_does_not_sync_with_the_host(tmp_path):
    x, y = make_tensors(64)
    guard = EvalGuard(
        {"correct": StrictCorrect()}, eval_transform=nn.Identity(), running={}, guards="off", forward=strict_forward
    )
    pl_trainer = trainer(tmp_path, max_epochs=1, accelerator="cuda", callbacks=[guard])
    try:
        with pytest.warns(UserWarning, match="no running metric"):
            pl_trainer.fit(Classifier("linear"), loader(TensorData(x, y), pin_memory=True))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [entry["epoch"] for entry in guard.history] == [0]  # the pass ran to its end in "error" mode


def test_the_cache_lives_on_the_device_and_its_passes_are_exact(tmp_path):
    x, y = make_tensors(70)
    guard = CacheWatcher(
        {"acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")}, eval_transform=nn.Identity(), cache=True
    )
    model = HooklessClassifier("both")
    pl_trainer = trainer(tmp_path, max_epochs=3, accelerator="cuda", callbacks=[guard])
    pl_trainer.fit(model, loader(TensorData(x, y, NumpyNoise()), pin_memory=True))
    assert [{kind for _, kind in batches} for _, batches in guard.seen] == [{"cuda"}]
    (source,) = clean_sources(guard)
    assert source.cache.device is not None and source.cache.device.type == "cuda"
    assert source.cache.batches is None  # freed at the end of fit
    assert len(guard.history) == 3  # passes 2 and 3 read the device cache
    model.eval()
    with torch.no_grad():
        expected = (model(x.cuda()).argmax(1) == y.cuda()).double().mean().item()
    assert guard.history[-1]["clean"]["acc"] == pytest.approx(expected, abs=1e-6)
