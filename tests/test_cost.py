"""What the pass costs is visible (duration, progress bar, subset noise) and can be cut (a bounded batch cache)."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_evalguard import EvalGuard

from helpers import (
    NUM_CLASSES,
    NUM_FEATURES,
    CacheWatcher,
    Classifier,
    HooklessClassifier,
    NoTraining,
    NumpyNoise,
    TensorData,
    assert_training_unchanged_by,
    loader,
    make_tensors,
    trainer,
)


def micro() -> MulticlassAccuracy:
    return MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")


def test_pass_duration_is_logged(tmp_path):
    x, y = make_tensors(32)
    guard = EvalGuard({"acc": micro()})
    pl_trainer = trainer(tmp_path, max_epochs=2, callbacks=[guard])
    pl_trainer.fit(Classifier("linear"), loader(TensorData(x, y)))
    seconds = float(pl_trainer.callback_metrics["evalguard/time/pass_seconds"])
    assert 0 < seconds < 60
    assert seconds == pytest.approx(guard.history[-1]["time"]["pass_seconds"], rel=1e-6)


def test_a_progress_bar_shows_during_the_pass_only_when_the_trainers_does(tmp_path, capsys, monkeypatch):
    import sys

    x, y = make_tensors(32)
    trainer(tmp_path, max_epochs=1, callbacks=[EvalGuard({"acc": micro()}, print_summary=False)],
            enable_progress_bar=True).fit(Classifier("linear"), loader(TensorData(x, y)))
    assert "EvalGuard clean pass" not in capsys.readouterr().out  # not a terminal: no cursor codes in logs
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    trainer(tmp_path, max_epochs=1, callbacks=[EvalGuard({"acc": micro()}, print_summary=False)],
            enable_progress_bar=True).fit(Classifier("linear"), loader(TensorData(x, y)))
    assert "EvalGuard clean pass" in capsys.readouterr().out
    trainer(tmp_path, max_epochs=1, callbacks=[EvalGuard({"acc": micro()}, print_summary=False)],
            enable_progress_bar=False).fit(Classifier("linear"), loader(TensorData(x, y)))
    assert "EvalGuard clean pass" not in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:EvalGuard found no running metric")
def test_standard_error_is_logged_for_micro_accuracies_on_a_subset(tmp_path):
    x, y = make_tensors(64)
    metrics = {"acc": micro(), "macro": MulticlassAccuracy(num_classes=NUM_CLASSES, average="macro")}
    guard = EvalGuard(metrics, limit_batches=0.5)
    pl_trainer = trainer(tmp_path, max_epochs=1, callbacks=[guard])
    pl_trainer.fit(Classifier("linear"), loader(TensorData(x, y)))
    p = guard.history[-1]["clean"]["acc"]
    assert guard.history[-1]["stderr"] == {"acc": pytest.approx(math.sqrt(p * (1 - p) / 32))}
    assert float(pl_trainer.callback_metrics["evalguard/stderr/acc"]) == pytest.approx(math.sqrt(p * (1 - p) / 32))
    assert "evalguard/stderr/macro" not in pl_trainer.callback_metrics

    whole = EvalGuard({"acc": micro()}, limit_batches=1.0)  # the whole set: no sampling error
    trainer(tmp_path, max_epochs=1, callbacks=[whole]).fit(Classifier("linear"), loader(TensorData(x, y)))
    assert "stderr" not in whole.history[-1]


class CountingData(TensorData):
    """Counts __getitem__ calls and does some CPU work per sample (a stand-in for decoding)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads = 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += 1
        return super().__getitem__(index)


class MeanLogit(MeanMetric):
    def update(self, preds: Any, target: Any) -> None:  # type: ignore[override]
        super().update(preds[:, 0])


class InPlaceHook(Classifier):
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch[0].mul_(1.0 if self.trainer.training else 2.0)  # changes the clean batch in place
        return batch


def run_cached(tmp_path: Any, cache: bool, epochs: int = 3) -> tuple[EvalGuard, CountingData]:
    x, y = make_tensors(48)
    data = CountingData(x, y, NumpyNoise())
    metrics = {"acc": micro(), "logit": MeanLogit()}
    guard = EvalGuard(metrics, eval_transform=nn.Identity(), cache=cache, limit_batches=0.5, guards="off")
    pl.seed_everything(0, verbose=False)
    model = InPlaceHook("both")
    trainer(tmp_path, max_epochs=epochs, callbacks=[guard], deterministic=True).fit(model, loader(data))
    return guard, data


@pytest.mark.filterwarnings("ignore:EvalGuard found no running metric")
def test_cached_passes_read_the_dataset_once_and_give_the_same_values(tmp_path):
    plain, plain_data = run_cached(tmp_path, False)
    cached, cached_data = run_cached(tmp_path, True)
    training_reads = 3 * 48
    assert plain_data.reads - training_reads == 3 * 24
    # the budget check at fit start reads one batch (16); then only the first pass reads the 24 subset samples
    assert cached_data.reads - training_reads == 16 + 24
    assert [e["clean"] for e in cached.history] == [e["clean"] for e in plain.history]


def test_training_with_a_cache_is_bit_identical(tmp_path):
    guard = assert_training_unchanged_by(
        tmp_path, lambda: EvalGuard({"acc": micro()}, eval_transform=nn.Identity(), cache=True), seed=1
    )
    assert len(guard.history) == 3


def test_a_cache_over_its_budget_is_refused_before_training(tmp_path):
    x, y = make_tensors(48)
    model = NoTraining("linear")
    guard = EvalGuard({"acc": micro()}, cache=True, cache_max_bytes=1000)
    with pytest.raises(ValueError, match=r"cache=True\) would keep about 0 MiB of clean batches \(3 batches of .* more than\s+cache_max_bytes=1000"):
        trainer(tmp_path, callbacks=[guard]).fit(model, loader(TensorData(x, y)))


def test_cache_max_bytes_is_checked_at_construction():
    with pytest.raises(ValueError, match=r"`cache_max_bytes` must be an int >= 1 \(got 0\)"):
        EvalGuard({"acc": micro()}, cache=True, cache_max_bytes=0)
    with pytest.raises(TypeError, match=r"`cache` must be a bool"):
        EvalGuard({"acc": micro()}, cache="yes")


STARTS = None


def count_start(worker_id: int) -> None:
    with STARTS.get_lock():  # type: ignore[union-attr]
        STARTS.value += 1  # type: ignore[union-attr]


def test_clean_loader_keeps_its_workers_alive_when_the_training_loader_does(tmp_path):
    import multiprocessing

    global STARTS
    x, y = make_tensors(48)
    for persistent, expected in ((True, 2), (False, 3 + 2 + 3)):
        STARTS = multiprocessing.get_context("fork").Value("i", 0)
        train = torch.utils.data.DataLoader(
            TensorData(x, y, NumpyNoise()), batch_size=16, num_workers=1, persistent_workers=persistent,
            multiprocessing_context="fork", worker_init_fn=count_start,
        )
        guard = EvalGuard({"acc": micro()}, eval_transform=nn.Identity())
        trainer(tmp_path, max_epochs=3, callbacks=[guard]).fit(Classifier("linear"), train)
        # persistent: one start for training, one for the clean loader (guard draws and three passes);
        # otherwise: each training epoch, the two guard draws, and each of the three passes
        assert STARTS.value == expected, persistent
    decomposed = EvalGuard({"acc": micro()}, eval_transform=nn.Identity(), decompose=True)
    trainer(tmp_path, max_epochs=1, callbacks=[decomposed]).fit(Classifier("linear"), train)
    assert not decomposed._sources[0].loader.persistent_workers  # type: ignore[index, attr-defined]


def batches_of(n: int, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = make_tensors(n)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


def test_a_cache_given_a_placement_keeps_the_moved_batches_and_reads_copies():
    from lightning_evalguard.data import BatchCache, DevicePlacement

    source = batches_of(12)
    moves = []

    def move(batch: Any) -> Any:  # a stand-in for the transfer: a new tensor in another dtype
        moves.append(1)
        return batch[0].double(), batch[1]

    cache = BatchCache(max_bytes=1 << 20)
    assert cache.filling
    first = list(cache.read(source, None, DevicePlacement(torch.device("cpu"), move, 1 << 20)))
    assert len(moves) == 3 and all(batch[0].dtype == torch.float64 for batch in first)
    assert not cache.filling and cache.device == torch.device("cpu")
    assert cache.nbytes == sum(b[0].numel() * 8 + b[1].numel() * 8 for b in source)
    second = list(cache.read(source, None, DevicePlacement(torch.device("cpu"), move, 1 << 20)))
    assert len(moves) == 3  # a full cache moves nothing again
    assert all(torch.equal(a[0], b[0]) and a[0].dtype == torch.float64 for a, b in zip(first, second, strict=True))
    second[0][0].add_(1.0)  # a forward or hook that changes its input in place
    third = list(cache.read(source, None))
    assert torch.equal(third[0][0], first[0][0])


def test_a_host_cache_keeps_the_loader_batches():
    from lightning_evalguard.data import BatchCache

    source = batches_of(12)
    cache = BatchCache(max_bytes=1 << 20)
    assert [b[0].dtype for b in cache.read(source, 2)] == [torch.float32] * 2
    assert cache.device is None and len(cache.batches or []) == 2


def test_a_placement_budget_smaller_than_the_batches_drops_the_cache():
    from lightning_evalguard.data import BatchCache, DevicePlacement

    source = batches_of(12)
    cache = BatchCache(max_bytes=1 << 20)
    placement = DevicePlacement(torch.device("cpu"), lambda b: (b[0].double(), b[1]), max_bytes=200)
    read = list(cache.read(source, None, placement))
    assert len(read) == 3 and read[0][0].dtype == torch.float64  # the pass still gets every (moved) batch
    assert cache.overflowed and cache.batches is None and not cache.filling


def cuda_trainer(tmp_path: Any, monkeypatch: Any, free: int) -> pl.Trainer:
    """A CPU Trainer whose strategy reports a CUDA root device with ``free`` bytes free (nothing runs on it)."""
    pl_trainer = trainer(tmp_path)
    monkeypatch.setattr(type(pl_trainer.strategy), "root_device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 4 * free))
    return pl_trainer


def test_on_cuda_the_cache_goes_to_the_device_when_it_takes_at_most_half_the_free_memory(tmp_path, monkeypatch):
    from lightning_evalguard.clean_pass import device_cache_placement

    pl_trainer = cuda_trainer(tmp_path, monkeypatch, free=1000)
    module = HooklessClassifier("linear")
    placement = device_cache_placement(pl_trainer, module, 500, max_bytes=1 << 30)
    assert placement is not None
    assert placement.device == torch.device("cuda", 0) and placement.max_bytes == 500
    assert device_cache_placement(pl_trainer, module, 501, 1 << 30) is None  # over half the free memory: host
    assert device_cache_placement(pl_trainer, module, 400, max_bytes=300) is None  # over cache_max_bytes: host
    assert device_cache_placement(pl_trainer, module, 200, max_bytes=300).max_bytes == 300  # type: ignore[union-attr]
    assert device_cache_placement(pl_trainer, module, None, 1 << 30) is None  # cannot live on the device: host
    assert device_cache_placement(pl_trainer, Classifier("linear"), 10, 1 << 30) is None  # a transfer hook: host


def test_a_datamodule_transfer_hook_keeps_the_cache_in_host_memory(tmp_path, monkeypatch):
    from lightning_evalguard.clean_pass import device_cache_placement

    class Hooked(pl.LightningDataModule):
        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            return batch

    pl_trainer = cuda_trainer(tmp_path, monkeypatch, free=1000)
    module = HooklessClassifier("linear")
    assert device_cache_placement(pl_trainer, module, 10, 1 << 30) is not None
    monkeypatch.setattr(pl_trainer, "datamodule", Hooked(), raising=False)
    assert device_cache_placement(pl_trainer, module, 10, 1 << 30) is None


def test_on_the_cpu_the_cache_stays_in_host_memory(tmp_path):
    from lightning_evalguard.clean_pass import device_cache_placement

    assert device_cache_placement(trainer(tmp_path), HooklessClassifier("linear"), 10, 1 << 30) is None


@pytest.mark.filterwarnings("ignore:EvalGuard found no running metric")
def test_a_cache_filled_through_the_batch_path_gives_the_same_values(tmp_path, monkeypatch):
    import lightning_evalguard.callback as callback_module
    from lightning_evalguard.clean_pass import batch_path
    from lightning_evalguard.data import DevicePlacement

    estimates: list[int | None] = []

    def run(placed: bool) -> CacheWatcher:
        if placed:  # what a CUDA device gets: the batches as the batch path returns them (here: float64)

            def placement(t: Any, m: Any, estimate: int | None, max_bytes: int) -> DevicePlacement:
                estimates.append(estimate)
                return DevicePlacement(t.strategy.root_device, batch_path(t, m), max_bytes)

            monkeypatch.setattr(callback_module, "device_cache_placement", placement)
        x, y = make_tensors(48)
        guard = CacheWatcher({"acc": micro(), "logit": MeanLogit()}, eval_transform=nn.Identity(), cache=True)
        pl.seed_everything(0, verbose=False)
        pl_trainer = trainer(tmp_path, max_epochs=3, callbacks=[guard], precision="64-true")
        pl_trainer.fit(HooklessClassifier("both"), loader(TensorData(x, y, NumpyNoise())))
        return guard

    host, placed = run(False), run(True)
    assert host.seen == [(None, [(torch.float32, "cpu")] * 3)]  # the loader's batches
    assert placed.seen == [(torch.device("cpu"), [(torch.float64, "cpu")] * 3)]  # converted by the precision plugin
    assert [e["clean"] for e in placed.history] == [e["clean"] for e in host.history]
    # the device estimate counts the converted batches: float64 inputs, int64 labels
    (cache,) = [source.cache for source in placed._sources]
    assert estimates == [48 * (NUM_FEATURES * 8 + 8)] == [cache.nbytes]
    assert cache.estimate == 48 * (NUM_FEATURES * 4 + 8)
    # the end of fit frees the batches and keeps what they were
    assert cache.batches is None and cache.num_batches == 3 and cache.device == torch.device("cpu")


class Encoding:
    """A batch type with its own ``to`` (like transformers' BatchEncoding): the cache cannot copy it."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def to(self, device: Any) -> Encoding:
        return Encoding(self.x.to(device), self.y.to(device))

    def __getitem__(self, index: int) -> torch.Tensor:
        return (self.x, self.y)[index]


@pytest.mark.filterwarnings("ignore:EvalGuard found no running metric")
def test_a_batch_the_cache_cannot_copy_is_not_cached_and_says_so(tmp_path):
    x, y = make_tensors(32)
    data = CountingData(x, y)

    def collate(items: list[Any]) -> Encoding:
        return Encoding(torch.stack([item[0] for item in items]), torch.stack([item[1] for item in items]))

    guard = EvalGuard({"acc": micro()}, cache=True, forward=lambda m, b: (m(b.x), b.y), guards="off")
    with pytest.warns(UserWarning, match=r"the clean batches hold a Encoding, which it cannot copy or size, so the"
                      r" clean data is not cached"):
        trainer(tmp_path, max_epochs=2, callbacks=[guard]).fit(
            HooklessClassifier("linear"), loader(data, collate_fn=collate)
        )
    assert [source.cache for source in guard._sources] == [None]
    assert data.reads == 2 * 32 + 16 + 2 * 32  # training, the budget check's batch, two uncached passes


def test_the_cache_copies_and_sizes_dataclass_and_numpy_batches():
    import dataclasses

    import numpy as np

    from lightning_evalguard.data import _copy, batch_nbytes, uncopyable

    @dataclasses.dataclass(frozen=True)
    class Batch:
        x: torch.Tensor
        extra: dict[str, np.ndarray]

    batch = Batch(torch.zeros(2, 3), {"mask": np.zeros(4, dtype=np.int64)})
    assert batch_nbytes(batch) == 2 * 3 * 4 + 4 * 8
    assert uncopyable(batch) is None and uncopyable((torch.zeros(1), Encoding(torch.zeros(1), torch.zeros(1)))) == "Encoding"
    copied = _copy(batch)
    copied.x.add_(1)
    copied.extra["mask"][0] = 7
    assert batch.x.sum() == 0 and batch.extra["mask"][0] == 0
