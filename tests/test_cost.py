"""What the pass costs is visible (duration, progress bar, subset noise) and can be cut (a bounded batch cache)."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_evalguard import EvalGuard

from helpers import (
    NUM_FEATURES,
    CacheWatcher,
    Classifier,
    HooklessClassifier,
    MeanLogit,
    NoTraining,
    NumpyNoise,
    TensorData,
    assert_training_unchanged_by,
    clean_sources,
    loader,
    macro_accuracy,
    make_tensors,
    micro_accuracy,
    trainer,
)


class EpochEndClock(pl.Callback):
    """Notes, at each train epoch end, time.perf_counter() and the pass duration logged so far (None before any)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.logged: list[float | None] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.times.append(time.perf_counter())
        value = trainer.callback_metrics.get("evalguard/time/pass_seconds")
        self.logged.append(None if value is None else float(value))


def test_pass_duration_is_logged_in_seconds_each_epoch(tmp_path):
    naps = [0.005, 0.1]  # what the forward sleeps per clean batch in the passes after epochs 0 and 1

    def slow_forward(module: pl.LightningModule, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(naps[module.current_epoch])
        return module(batch[0]), batch[1]

    x, y = make_tensors(32)  # two clean batches of 16
    guard = EvalGuard({"acc": micro_accuracy()}, forward=slow_forward)
    before, after = EpochEndClock(), EpochEndClock()  # around EvalGuard's epoch-end hook, where the pass runs
    pl_trainer = trainer(tmp_path, max_epochs=2, callbacks=[before, guard, after])
    pl_trainer.fit(Classifier("linear"), loader(TensorData(x, y)))
    seconds = [entry["time"]["pass_seconds"] for entry in guard.history]
    assert before.logged == [None, pytest.approx(seconds[0], rel=1e-6)]
    assert after.logged == pytest.approx(seconds, rel=1e-6)  # each epoch logs its own pass, in the history too
    assert float(pl_trainer.callback_metrics["evalguard/time/pass_seconds"]) == pytest.approx(seconds[-1], rel=1e-6)
    for nap, duration, start, end in zip(naps, seconds, before.times, after.times, strict=True):
        # at least the forward's naps, at most the wall time of the hook: seconds, measured for this pass
        assert 2 * nap <= duration <= end - start


def test_a_progress_bar_shows_during_the_pass_only_when_the_trainers_does(tmp_path, capsys, monkeypatch):
    import sys

    x, y = make_tensors(32)
    trainer(
        tmp_path,
        max_epochs=1,
        callbacks=[EvalGuard({"acc": micro_accuracy()}, print_summary=False)],
        enable_progress_bar=True,
    ).fit(Classifier("linear"), loader(TensorData(x, y)))
    assert "EvalGuard clean pass" not in capsys.readouterr().out  # not a terminal: no cursor codes in logs
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    trainer(
        tmp_path,
        max_epochs=1,
        callbacks=[EvalGuard({"acc": micro_accuracy()}, print_summary=False)],
        enable_progress_bar=True,
    ).fit(Classifier("linear"), loader(TensorData(x, y)))
    assert "EvalGuard clean pass" in capsys.readouterr().out
    trainer(
        tmp_path,
        max_epochs=1,
        callbacks=[EvalGuard({"acc": micro_accuracy()}, print_summary=False)],
        enable_progress_bar=False,
    ).fit(Classifier("linear"), loader(TensorData(x, y)))
    assert "EvalGuard clean pass" not in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:EvalGuard found no running metric")
def test_standard_error_is_logged_for_micro_accuracies_on_a_subset(tmp_path):
    x, y = make_tensors(64)
    metrics = {"acc": micro_accuracy(), "macro": macro_accuracy()}
    guard = EvalGuard(metrics, limit_batches=0.5)
    pl_trainer = trainer(tmp_path, max_epochs=1, callbacks=[guard])
    pl_trainer.fit(Classifier("linear"), loader(TensorData(x, y)))
    p = guard.history[-1]["clean"]["acc"]
    expected = math.sqrt(p * (1 - p) / 32 * (64 - 32) / (64 - 1))  # 32 of 64 samples, drawn without replacement
    assert guard.history[-1]["stderr"] == {"acc": pytest.approx(expected)}
    assert float(pl_trainer.callback_metrics["evalguard/stderr/acc"]) == pytest.approx(expected)
    assert float(pl_trainer.callback_metrics["evalguard/clean_low/acc"]) == pytest.approx(p - 2 * expected)
    assert float(pl_trainer.callback_metrics["evalguard/clean_high/acc"]) == pytest.approx(p + 2 * expected)
    assert "evalguard/stderr/macro" not in pl_trainer.callback_metrics
    assert "evalguard/clean_low/macro" not in pl_trainer.callback_metrics

    whole = EvalGuard({"acc": micro_accuracy()}, limit_batches=1.0)  # the whole set: no sampling error
    trainer(tmp_path, max_epochs=1, callbacks=[whole]).fit(Classifier("linear"), loader(TensorData(x, y)))
    assert "stderr" not in whole.history[-1] and "clean_low" not in whole.history[-1]


def regression_forward(module: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return module(batch[0])[:, :2].contiguous(), torch.stack(
        [batch[1].float(), -batch[1].float()], 1
    )  # two outputs per sample


@pytest.mark.filterwarnings("ignore:EvalGuard found no running metric")
def test_mean_of_per_sample_metrics_get_the_standard_error_of_their_per_sample_values(tmp_path):
    from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError

    x, y = make_tensors(60)
    metrics = {"mse": MeanSquaredError(), "mae": MeanAbsoluteError(), "rmse": MeanSquaredError(squared=False)}
    guard = EvalGuard(metrics, limit_batches=0.4, batch_size=7, forward=regression_forward)
    model = Classifier("linear")
    trainer(tmp_path, max_epochs=1, callbacks=[guard]).fit(model, loader(TensorData(x, y)))
    subset = guard.state_dict()["subsets"][""]
    assert len(subset) == 24
    with torch.no_grad():
        preds, target = regression_forward(model.eval(), (x[subset], y[subset]))
    correction = math.sqrt((60 - 24) / (60 - 1))
    for name, per_sample in (("mse", (preds - target).square()), ("mae", (preds - target).abs())):
        values = per_sample.double().mean(1)
        assert guard.history[-1]["clean"][name] == pytest.approx(float(values.mean()), rel=1e-5)
        expected = float(values.std()) / math.sqrt(24) * correction
        assert guard.history[-1]["stderr"][name] == pytest.approx(expected, rel=1e-6), name
    assert "rmse" not in guard.history[-1]["stderr"]  # a root of a mean: no per-sample standard error


class CountingData(TensorData):
    """Counts __getitem__ calls and does some CPU work per sample (a stand-in for decoding)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads = 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += 1
        return super().__getitem__(index)


class InPlaceHook(Classifier):
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch[0].mul_(1.0 if self.trainer.training else 2.0)  # changes the clean batch in place
        return batch


def run_cached(tmp_path: Any, cache: bool, epochs: int = 3) -> tuple[EvalGuard, CountingData]:
    x, y = make_tensors(48)
    data = CountingData(x, y, NumpyNoise())
    metrics = {"acc": micro_accuracy(), "logit": MeanLogit()}
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
    # the set-up check at fit start reads one batch (16), then every pass the 24 subset samples
    assert plain_data.reads - training_reads == 16 + 3 * 24
    # the set-up check and the budget check read one batch each (16); then only the first pass reads the subset
    assert cached_data.reads - training_reads == 16 + 16 + 24
    assert [e["clean"] for e in cached.history] == [e["clean"] for e in plain.history]


def test_training_with_a_cache_is_bit_identical(tmp_path):
    guard = assert_training_unchanged_by(
        tmp_path, lambda: CacheWatcher({"acc": micro_accuracy()}, eval_transform=nn.Identity(), cache=True), seed=1
    )
    assert [entry["epoch"] for entry in guard.history] == [0, 1, 2]
    # the passes did read a cache: the 48 samples' three batches, kept in host memory
    assert guard.seen == [(None, [(torch.float32, "cpu")] * 3)]


def test_a_cache_over_its_budget_is_refused_before_training(tmp_path):
    x, y = make_tensors(48)
    model = NoTraining("linear")
    guard = EvalGuard({"acc": micro_accuracy()}, cache=True, cache_max_bytes=1000)
    with pytest.raises(
        ValueError,
        match=r"cache=True\) would keep about 0 MiB of clean batches \(3 batches of .* more than\s+cache_max_bytes=1000",
    ):
        trainer(tmp_path, callbacks=[guard]).fit(model, loader(TensorData(x, y)))


def test_cache_max_bytes_is_checked_at_construction():
    with pytest.raises(ValueError, match=r"`cache_max_bytes` must be an int >= 1 \(got 0\)"):
        EvalGuard({"acc": micro_accuracy()}, cache=True, cache_max_bytes=0)
    with pytest.raises(TypeError, match=r"`cache` must be a bool"):
        EvalGuard({"acc": micro_accuracy()}, cache="yes")


STARTS = None


def count_start(worker_id: int) -> None:
    with STARTS.get_lock():  # type: ignore[union-attr]
        STARTS.value += 1  # type: ignore[union-attr]


def test_clean_loader_keeps_its_workers_alive_when_the_training_loader_does(tmp_path):
    import multiprocessing

    global STARTS
    x, y = make_tensors(48)
    for persistent, expected in ((True, 2), (False, 3 + 3)):
        STARTS = multiprocessing.get_context("fork").Value("i", 0)
        train = torch.utils.data.DataLoader(
            TensorData(x, y, NumpyNoise()),
            batch_size=16,
            num_workers=1,
            persistent_workers=persistent,
            multiprocessing_context="fork",
            worker_init_fn=count_start,
        )
        guard = EvalGuard({"acc": micro_accuracy()}, eval_transform=nn.Identity())
        trainer(tmp_path, max_epochs=3, callbacks=[guard]).fit(Classifier("linear"), train)
        # persistent: one start for training, one for the clean loader (its three passes); otherwise: each training
        # epoch and each of the three passes. The fit-start checks produce their batch in the main process.
        assert STARTS.value == expected, persistent
    decomposed = EvalGuard({"acc": micro_accuracy()}, eval_transform=nn.Identity(), decompose=True)
    trainer(tmp_path, max_epochs=1, callbacks=[decomposed]).fit(Classifier("linear"), train)
    assert not clean_sources(decomposed)[0].loader.persistent_workers


def batches_of(n: int, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = make_tensors(n)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


def test_a_cache_given_a_placement_keeps_the_moved_batches_and_reads_copies():
    from lightning_evalguard.cache import BatchCache, DevicePlacement

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
    from lightning_evalguard.cache import BatchCache

    source = batches_of(12)
    cache = BatchCache(max_bytes=1 << 20)
    assert [b[0].dtype for b in cache.read(source, 2)] == [torch.float32] * 2
    assert cache.device is None and len(cache.batches or []) == 2


def test_a_placement_budget_smaller_than_the_batches_drops_the_cache():
    from lightning_evalguard.cache import BatchCache, DevicePlacement

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
    from lightning_evalguard.cache import device_cache_placement

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
    from lightning_evalguard.cache import device_cache_placement

    class Hooked(pl.LightningDataModule):
        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            return batch

    pl_trainer = cuda_trainer(tmp_path, monkeypatch, free=1000)
    module = HooklessClassifier("linear")
    assert device_cache_placement(pl_trainer, module, 10, 1 << 30) is not None
    monkeypatch.setattr(pl_trainer, "datamodule", Hooked(), raising=False)
    assert device_cache_placement(pl_trainer, module, 10, 1 << 30) is None


def test_on_the_cpu_the_cache_stays_in_host_memory(tmp_path):
    from lightning_evalguard.cache import device_cache_placement

    assert device_cache_placement(trainer(tmp_path), HooklessClassifier("linear"), 10, 1 << 30) is None


def test_a_cache_filled_through_the_batch_path_keeps_the_converted_batches_and_gives_the_same_values(tmp_path):
    # What a CUDA device gets, on the CPU: the cache fills through the batch path, so it keeps the batches as they
    # reach the model (converted to float64 by the precision plugin); the sizes match the fit-start estimate, and a
    # pass over the cached batches measures what a pass over the loader does.
    from torchmetrics import MetricCollection

    from lightning_evalguard.cache import BatchCache, DevicePlacement, size_at_fit_start
    from lightning_evalguard.forward import batch_path, default_forward
    from lightning_evalguard.passes import run_pass

    pl_trainer = trainer(tmp_path, precision="64-true")
    model = HooklessClassifier("both").double().eval()
    batches = batches_of(48, size=16)
    cache = BatchCache(max_bytes=1 << 30)
    first, converted = batches[0], pl_trainer.precision_plugin.convert_input(batches[0])
    assert size_at_fit_start(pl_trainer, cache, first, converted, True, len(batches), "", lambda *a: None) is cache
    assert cache.estimate == 48 * (NUM_FEATURES * 4 + 8)  # the loader's float32 inputs and int64 labels
    assert cache.device_estimate == 48 * (NUM_FEATURES * 8 + 8)  # converted: float64 inputs

    def measure(loader: Any) -> list[float]:
        metrics = MetricCollection({"acc": micro_accuracy(), "logit": MeanLogit()})
        with torch.inference_mode():
            assert run_pass(pl_trainer, model, loader, metrics, default_forward) == 3
        return [float(value) for value in metrics.compute().values()]

    placement = DevicePlacement(torch.device("cpu"), batch_path(pl_trainer, model), 1 << 30)
    from_loader = measure(batches)
    filling = measure(cache.read(batches, None, placement))
    assert cache.device == torch.device("cpu") and cache.nbytes == cache.device_estimate
    assert [(batch[0].dtype, batch[0].device.type) for batch in cache.batches or []] == [(torch.float64, "cpu")] * 3
    from_cache = measure(cache.read(batches, None))
    assert from_loader == filling == from_cache
    cache.release()  # what the end of fit does: the batches go, what they were stays
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

    guard = EvalGuard({"acc": micro_accuracy()}, cache=True, forward=lambda m, b: (m(b.x), b.y), guards="off")
    with pytest.warns(
        UserWarning,
        match=r"the clean batches hold a Encoding, which it cannot copy or size, so the"
        r" clean data is not cached",
    ):
        trainer(tmp_path, max_epochs=2, callbacks=[guard]).fit(
            HooklessClassifier("linear"), loader(data, collate_fn=collate)
        )
    assert [source.cache for source in clean_sources(guard)] == [None]
    # training, the set-up check's and the budget check's batches, two uncached passes
    assert data.reads == 2 * 32 + 16 + 16 + 2 * 32


def test_the_cache_copies_and_sizes_dataclass_and_numpy_batches():
    import dataclasses

    import numpy as np

    from lightning_evalguard.cache import _copy, batch_nbytes, uncopyable

    @dataclasses.dataclass(frozen=True)
    class Batch:
        x: torch.Tensor
        extra: dict[str, np.ndarray]

    batch = Batch(torch.zeros(2, 3), {"mask": np.zeros(4, dtype=np.int64)})
    assert batch_nbytes(batch) == 2 * 3 * 4 + 4 * 8
    assert (
        uncopyable(batch) is None
        and uncopyable((torch.zeros(1), Encoding(torch.zeros(1), torch.zeros(1)))) == "Encoding"
    )
    copied = _copy(batch)
    copied.x.add_(1)
    copied.extra["mask"][0] = 7
    assert batch.x.sum() == 0 and batch.extra["mask"][0] == 0


def test_a_dict_with_its_own_to_method_is_copied_and_sized_like_a_dict():
    # transformers' BatchEncoding is a UserDict with a `to` method: a mapping of tensors, which the cache copies
    from collections import UserDict

    from lightning_evalguard.cache import _copy, batch_nbytes, uncopyable

    class Encoding(UserDict):  # type: ignore[type-arg]
        def to(self, device: Any) -> Encoding:
            return Encoding({key: value.to(device) for key, value in self.items()})

    batch = Encoding({"input_ids": torch.zeros(2, 5, dtype=torch.int64), "attention_mask": torch.ones(2, 5)})
    assert uncopyable(batch) is None
    assert batch_nbytes(batch) == 2 * 5 * 8 + 2 * 5 * 4
    copied = _copy(batch)
    assert type(copied) is Encoding
    copied["input_ids"].add_(1)
    assert batch["input_ids"].sum() == 0


@pytest.mark.filterwarnings("ignore:EvalGuard found no running metric")
def test_flattened_regression_outputs_get_no_standard_error_and_one_warning(tmp_path):
    from torchmetrics.regression import MeanSquaredError

    from lightning_evalguard import EvalGuardWarning

    def flattened(module: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        preds, target = regression_forward(module, batch)
        return preds.reshape(-1), target.reshape(-1)  # two rows per sample: their spread is not the samples'

    x, y = make_tensors(60)
    guard = EvalGuard({"mse": MeanSquaredError()}, limit_batches=0.5, forward=flattened)
    with pytest.warns(EvalGuardWarning, match=r"no standard error for 'mse'.*one row per sample") as record:
        trainer(tmp_path, max_epochs=2, callbacks=[guard]).fit(Classifier("linear"), loader(TensorData(x, y)))
    assert sum("no standard error" in str(w.message) for w in record) == 1
    assert all("stderr" not in entry for entry in guard.history)


def test_an_empty_batch_has_no_per_sample_values():
    from torchmetrics.regression import MeanSquaredError

    from lightning_evalguard.metrics import per_sample_values

    assert per_sample_values(MeanSquaredError(), torch.zeros(0), torch.zeros(0)) is None
    values = per_sample_values(MeanSquaredError(), torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 0.0]]))
    assert values is not None and values.tolist() == [5.0]
