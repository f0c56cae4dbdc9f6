"""Under DDP (CPU, gloo, 2 processes) the clean pass is exact: each sample once, the single-process number."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed_helpers import LogitSum, SameOnEveryRank, regression_forward
from torch import nn
from torch.utils.data import DistributedSampler
from torchmetrics.classification import MulticlassAccuracy

from lightning_evalguard import EvalGuard, EvalGuardWarning
from lightning_evalguard.sampling import fixed_subset, pads_samples, shard

from helpers import (
    NUM_CLASSES,
    Classifier,
    CountSamples,
    NumpyNoise,
    TensorData,
    accuracy,
    loader,
    make_tensors,
    trainer,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")

N = 65  # odd: 33 + 32 samples on two ranks


def subset_indices(limit: float | None) -> list[int]:
    subset = fixed_subset(N, limit, 8, 0, None)
    return list(range(N)) if subset is None else subset


def guard(limit: float | None) -> EvalGuard:
    return EvalGuard(
        {
            "acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro"),
            "n": CountSamples(),
            "logit": LogitSum(),
        },
        eval_transform=nn.Identity(),
        batch_size=8,
        limit_batches=limit,
    )


def check(metrics: dict[str, Any], model: torch.nn.Module, limit: float | None) -> None:
    x, y = make_tensors(N)
    indices = subset_indices(limit)
    assert float(metrics["evalguard/clean/n"]) == len(indices)  # every sample exactly once across the ranks
    expected = accuracy(model, x[indices], y[indices])  # single process, on the final (rank 0) weights and buffers
    assert float(metrics["evalguard/clean/acc"]) == pytest.approx(expected, abs=1e-6)
    model.eval()
    with torch.no_grad():
        logit_sum = model(x[indices])[:, 0].double().sum().item()
    assert float(metrics["evalguard/clean/logit"]) == pytest.approx(logit_sum, rel=1e-5, abs=1e-4)


@pytest.mark.parametrize(
    ("strategy", "limit"), [("ddp_fork", None), ("ddp_fork", 0.5), ("ddp_spawn", None), ("ddp_spawn", 0.5)]
)
def test_ddp_pass_counts_each_sample_once_and_equals_a_single_process_computation(tmp_path, strategy, limit):
    x, y = make_tensors(N)
    model = Classifier("batchnorm")
    pl_trainer = trainer(
        tmp_path,
        max_epochs=2,
        devices=2,
        strategy=strategy,
        callbacks=[guard(limit), SameOnEveryRank(tmp_path / "history.json")],
    )
    pl_trainer.fit(model, loader(TensorData(x, y, NumpyNoise()), batch_size=11))
    check(pl_trainer.callback_metrics, model, limit)
    history = json.loads((tmp_path / "history.json").read_text())["history"]
    assert [entry["clean"]["n"] for entry in history] == [len(subset_indices(limit))] * 2


def test_ddp_standard_error_of_a_per_sample_metric_counts_the_samples_of_every_rank(tmp_path):
    from torchmetrics.regression import MeanSquaredError

    x, y = make_tensors(N)
    model = Classifier("linear")
    callback = EvalGuard(
        {"mse": MeanSquaredError()}, batch_size=8, limit_batches=0.5, forward=regression_forward, running={}
    )
    pl_trainer = trainer(
        tmp_path, max_epochs=1, devices=2, strategy="ddp_fork", callbacks=[callback, SameOnEveryRank(tmp_path / "h")]
    )
    pl_trainer.fit(model, loader(TensorData(x, y), batch_size=11))
    indices = subset_indices(0.5)
    with torch.no_grad():
        preds, target = regression_forward(model.eval(), (x[indices], y[indices]))
    values = (preds - target).double().square().mean(1)
    n = len(indices)
    expected = float(values.std()) / n**0.5 * ((N - n) / (N - 1)) ** 0.5
    assert float(pl_trainer.callback_metrics["evalguard/clean/mse"]) == pytest.approx(float(values.mean()), rel=1e-5)
    assert float(pl_trainer.callback_metrics["evalguard/stderr/mse"]) == pytest.approx(expected, rel=1e-5)


def test_ddp_auto_subsets_are_the_same_on_every_rank_and_exact(tmp_path):
    from lightning_evalguard.sampling import auto_sample_size, seeded_permutation

    x, y = make_tensors(N)
    model = Classifier("batchnorm")
    callback = EvalGuard(
        {"acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro"), "n": CountSamples()},
        eval_transform=nn.Identity(),
        batch_size=8,
        limit_batches="auto",
        target_stderr=0.1,
    )
    pl_trainer = trainer(
        tmp_path,
        max_epochs=2,
        devices=2,
        strategy="ddp_fork",
        callbacks=[callback, SameOnEveryRank(tmp_path / "history.json")],  # the sizes too
    )
    pl_trainer.fit(model, loader(TensorData(x, y, NumpyNoise()), batch_size=11))
    history = json.loads((tmp_path / "history.json").read_text())["history"]
    assert history[0]["n"] == auto_sample_size(N, 0.1) == 19
    assert history[1]["n"] == max(auto_sample_size(N, 0.1, history[0]["clean"]["acc"], 19), 10)  # half at most
    assert [entry["clean"]["n"] for entry in history] == [entry["n"] for entry in history]  # each sample once
    subset = sorted(seeded_permutation(list(range(N)), 0)[: history[1]["n"]])
    expected = accuracy(model, x[subset], y[subset])  # single process, rank 0's final weights and buffers
    assert float(pl_trainer.callback_metrics["evalguard/clean/acc"]) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("limit", [None, 0.5])
def test_ddp_strategy_through_a_launched_script(tmp_path, limit):
    script = Path(__file__).resolve().parent / "ddp_script.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    argument = "none" if limit is None else str(limit)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), argument], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model = Classifier("batchnorm")
    model.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    check(json.loads((tmp_path / "metrics.json").read_text()), model, limit)
    assert json.loads((tmp_path / "history.json").read_text())["world_size"] == 2


def test_checkpoint_resumes_across_world_sizes(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    x, y = make_tensors(N)
    data = loader(TensorData(x, y), batch_size=11)

    def run(devices: int, epochs: int, out: str, ckpt: Any = None) -> list[dict[str, Any]]:
        save = ModelCheckpoint(dirpath=tmp_path / out, save_last=True)
        strategy = "ddp_fork" if devices > 1 else "auto"
        callbacks = [guard(0.5), SameOnEveryRank(tmp_path / f"{out}.json"), save]
        pl_trainer = trainer(
            tmp_path,
            max_epochs=epochs,
            devices=devices,
            strategy=strategy,
            callbacks=callbacks,
            enable_checkpointing=True,
        )
        pl_trainer.fit(Classifier("linear"), data, ckpt_path=ckpt)
        return json.loads((tmp_path / f"{out}.json").read_text())["history"]

    two = run(2, 1, "two")
    one = run(1, 2, "one", tmp_path / "two" / "last.ckpt")
    assert [entry["epoch"] for entry in one] == [0, 1] and one[0] == two[0]
    back = run(2, 3, "back", tmp_path / "one" / "last.ckpt")
    assert [entry["epoch"] for entry in back] == [0, 1, 2] and back[:2] == one
    assert {entry["clean"]["n"] for entry in back} == {len(subset_indices(0.5))}


def test_shards_cover_every_index_once_without_padding():
    indices = subset_indices(None)
    shards = [shard(indices, rank, 2) for rank in range(2)]
    assert [len(part) for part in shards] == [33, 32]
    assert sorted(shards[0] + shards[1]) == indices


def test_a_padding_distributed_sampler_is_detected():
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    x, y = make_tensors(N)
    data = TensorData(x, y)
    padding = torch.utils.data.DataLoader(data, sampler=DistributedSampler(data, num_replicas=2, rank=0))
    unrepeated = torch.utils.data.DataLoader(data, sampler=UnrepeatedDistributedSampler(data, num_replicas=2, rank=0))
    even = torch.utils.data.DataLoader(
        TensorData(x[:64], y[:64]), sampler=DistributedSampler(data, num_replicas=2, rank=0)
    )
    assert pads_samples(padding)
    assert not pads_samples(unrepeated)
    assert not pads_samples(even) or len(even.sampler.dataset) % 2  # type: ignore[attr-defined]


def test_a_user_clean_loader_with_a_padding_sampler_is_warned_about_under_ddp(tmp_path):
    x, y = make_tensors(N)
    data = TensorData(x, y)

    def build(pl_trainer: Any) -> torch.utils.data.DataLoader:
        sampler = DistributedSampler(
            data, num_replicas=pl_trainer.world_size, rank=pl_trainer.global_rank, shuffle=False
        )
        return torch.utils.data.DataLoader(data, batch_size=8, sampler=sampler)

    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")}, dataloader=build)
    pl_trainer = trainer(tmp_path, max_epochs=1, devices=2, strategy="ddp_fork", callbacks=[guard])
    # the warning, made an error here, is raised on rank zero inside the forked process
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvalGuardWarning)
        with pytest.raises(Exception, match=r"pads the ranks with repeated samples.*UnrepeatedDistributedSampler"):
            pl_trainer.fit(Classifier("linear"), loader(data, batch_size=11))


def test_decompose_with_sync_batchnorm_under_ddp_is_refused_before_training():
    # SyncBatchNorm runs on GPUs only, so the check is exercised with a stand-in two-rank trainer
    from unittest.mock import Mock

    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES)}, decompose=True)
    model = nn.Sequential(nn.Linear(3, 3), nn.SyncBatchNorm(3))
    with pytest.raises(ValueError, match=r"SyncBatchNorm synchronises\s+every batch across ranks"):
        guard.on_train_start(Mock(world_size=2), model)  # type: ignore[arg-type]


def test_a_guard_failing_on_one_rank_stops_every_rank_instead_of_hanging(tmp_path):
    script = Path(__file__).resolve().parent / "ddp_guard_script.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=240, env=env
    )
    # each rank writes what it raised before it exits; the exit itself is not judged (gloo may abort at teardown)
    files = [tmp_path / f"rank{rank}.txt" for rank in (0, 1)]
    deadline = time.monotonic() + 60
    while not all(file.exists() for file in files) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert all(file.exists() for file in files), result.stderr[-3000:]
    rank0, rank1 = (file.read_text() for file in files)
    assert rank1.startswith("EvalGuardError: EvalGuard's clean pass is not clean"), rank1
    assert rank0.startswith("EvalGuardError: EvalGuard's augmentation guard failed on another rank"), rank0
