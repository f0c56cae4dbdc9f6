"""CUDA checks, run where a GPU is present (CI has none; the device sessions run this file)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch import Callback
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


@pytest.mark.parametrize("track_samples", [False, True])
def test_the_batch_loop_does_not_sync_with_the_host(tmp_path, track_samples):
    x, y = make_tensors(64)
    guard = EvalGuard(
        {"correct": StrictCorrect()},
        eval_transform=nn.Identity(),
        running={},
        guards="off",
        forward=strict_forward,
        track_samples=track_samples,  # per-sample values gathered on the device, moved to the host once per pass
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


class FullPassAtTrainEnd(Callback):
    """At the end of training (the weights of the last clean pass), an eval-mode pass over the full parameters."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.accuracy: float | None = None

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():  # a sharded module gathers its parameters for the forward
            logits = pl_module(self.x.to(pl_module.device))
        pl_module.train(was_training)
        self.accuracy = (logits.argmax(1).cpu() == self.y).double().mean().item()


def sharded_fit(tmp_path: Any, strategy: Any, model: Classifier) -> tuple[EvalGuard, FullPassAtTrainEnd]:
    x, y = make_tensors(101)
    guard = EvalGuard(
        {"acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")}, eval_transform=nn.Identity()
    )
    full = FullPassAtTrainEnd(x, y)
    devices = torch.cuda.device_count()
    pl_trainer = trainer(
        tmp_path, max_epochs=2, accelerator="cuda", devices=devices, strategy=strategy, callbacks=[guard, full]
    )
    pl_trainer.fit(model, loader(TensorData(x, y, NumpyNoise()), batch_size=10))
    return guard, full


def test_an_fsdp_fit_ends_and_its_clean_value_is_the_full_parameters_pass(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = FSDPStrategy(auto_wrap_policy={nn.Linear})  # every Linear a unit: each forward gathers
    guard, full = sharded_fit(tmp_path, strategy, Classifier("both"))
    assert [entry["epoch"] for entry in guard.history] == [0, 1]
    assert full.accuracy is not None
    assert guard.history[-1]["clean"]["acc"] == pytest.approx(full.accuracy, abs=1e-6)


class FullyShardedClassifier(Classifier):
    """A Classifier whose layers are sharded with FSDP2 (fully_shard) in configure_model."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]  # type: ignore[attr-defined]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def test_a_model_parallel_fsdp2_fit_ends_and_its_clean_value_is_the_full_parameters_pass(tmp_path):
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=torch.cuda.device_count(), tensor_parallel_size=1)
    guard, full = sharded_fit(tmp_path, strategy, FullyShardedClassifier("both"))
    assert [entry["epoch"] for entry in guard.history] == [0, 1]
    assert full.accuracy is not None
    assert guard.history[-1]["clean"]["acc"] == pytest.approx(full.accuracy, abs=1e-6)
