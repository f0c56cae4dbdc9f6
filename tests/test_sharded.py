"""Under DDP every rank makes the same number of forwards in every pass, so a model whose forward is itself a
collective (FSDP, DeepSpeed ZeRO-3, tensor parallel) does not deadlock on uneven shards; the values stay exact.

Each fit runs in a subprocess with a timeout (tests/ddp_collective_script.py, 2 CPU ranks, ddp_fork): a regression
fails the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_evalguard.sampling import fixed_subset

from helpers import NUM_CLASSES, NUM_FEATURES, make_tensors

SCRIPT = Path(__file__).with_name("ddp_collective_script.py")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def run(
    tmp_path: Path, n: int, batch_size: int, limit: str, decompose: bool, cache: bool, *extra: str
) -> dict[str, object]:
    command = [sys.executable, str(SCRIPT), str(tmp_path), str(n), str(batch_size), limit, str(int(decompose))]
    command += [str(int(cache)), *extra]
    # A session of its own, so that a hang is ended with every rank the launcher forked.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("the 2-rank fit did not end: a rank waits in a forward the other rank never makes")
    assert process.returncode == 0, stderr[-3000:]
    forwards = [json.loads((tmp_path / f"forwards{rank}.json").read_text()) for rank in (0, 1)]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    state = torch.load(tmp_path / "weights.pt", weights_only=True)
    return {"forwards": forwards, "metrics": metrics, "state": state}


def clean_accuracy(state: dict[str, torch.Tensor], n: int, indices: list[int]) -> float:
    """Independent of EvalGuard: rank 0's final weights, one process, eval mode, the evaluated samples."""
    linear = nn.Linear(NUM_FEATURES, NUM_CLASSES)
    linear.load_state_dict({"weight": state["net.1.weight"], "bias": state["net.1.bias"]})
    x, y = make_tensors(n)
    with torch.no_grad():
        return (linear(x[indices]).argmax(1) == y[indices]).double().mean().item()


def test_uneven_shards_with_a_collective_forward_end_and_stay_exact_also_from_the_cache(tmp_path):
    # 101 samples, batch 10: shards of 51 and 50 samples, 6 and 5 batches; the second pass reads the cache
    result = run(tmp_path, 101, 10, "none", decompose=False, cache=True)
    # fit start: one set-up forward and three for the guard on every rank; each pass: 6 forwards on both ranks
    assert result["forwards"] == [{"start": 4, "epoch0": 6, "epoch1": 6}] * 2
    metrics = result["metrics"]
    assert metrics["evalguard/clean/n"] == 101.0  # the padding forward updated no metric
    expected = clean_accuracy(result["state"], 101, list(range(101)))
    assert metrics["evalguard/clean/acc"] == pytest.approx(expected, abs=1e-6)


def test_an_empty_shard_takes_part_in_every_forward_and_contributes_nothing(tmp_path):
    # limit_batches=1 with batch 1 evaluates one sample: rank 1's shard is empty
    result = run(tmp_path, 40, 1, "1", decompose=False, cache=False)
    assert result["forwards"] == [{"start": 4, "epoch0": 1, "epoch1": 1}] * 2
    metrics = result["metrics"]
    assert metrics["evalguard/clean/n"] == 1.0
    subset = fixed_subset(40, 1, 1, 0, None)
    assert subset is not None and len(subset) == 1
    assert metrics["evalguard/clean/acc"] == pytest.approx(clean_accuracy(result["state"], 40, subset), abs=1e-6)


def test_a_subset_with_decompose_pads_every_pass_by_at_most_one_batch(tmp_path):
    # limit_batches=0.5 of 101: 51 samples, shards of 26 and 25; batch 4 with a merged last batch: 7 and 6 batches
    result = run(tmp_path, 101, 4, "0.5", decompose=True, cache=False)
    # three passes (clean, B, C) of 7 forwards on both ranks: rank 1 pads each by one
    assert result["forwards"] == [{"start": 4, "epoch0": 3 * 7, "epoch1": 3 * 7}] * 2
    metrics = result["metrics"]
    subset = fixed_subset(101, 0.5, 4, 0, None)
    assert subset is not None and metrics["evalguard/clean/n"] == float(len(subset)) == 51.0
    assert metrics["evalguard/clean/acc"] == pytest.approx(clean_accuracy(result["state"], 101, subset), abs=1e-6)
    effects = sum(metrics[f"evalguard/effect/{kind}/acc"] for kind in ("train_mode", "augmentation", "weight_drift"))
    assert effects == pytest.approx(metrics["evalguard/gap/acc"], abs=1e-6)


def test_a_cache_over_batches_it_cannot_copy_is_dropped_on_every_rank_also_one_with_an_empty_shard(tmp_path):
    # rank 1 has no batch to look at: the decision to drop the cache is taken together, or rank 1 would wait alone
    result = run(tmp_path, 40, 1, "1", False, True, "opaque")
    assert result["forwards"] == [{"start": 4, "epoch0": 1, "epoch1": 1}] * 2
    assert result["metrics"]["evalguard/clean/n"] == 1.0


def test_per_sample_statistics_are_gathered_and_the_same_on_every_rank(tmp_path):
    from helpers import reference_sample_stats

    run(tmp_path, 101, 10, "none", False, False, "track")
    stats = [torch.load(tmp_path / f"samples{rank}.pt", weights_only=True) for rank in (0, 1)]
    for name, value in stats[0].items():
        assert value == stats[1][name] if isinstance(value, int) else torch.equal(value, stats[1][name]), name
    assert stats[0]["passes"] == 2 and stats[0]["indices"].tolist() == list(range(101))
    logits = torch.load(tmp_path / "logits0.pt", weights_only=True)
    _, y = make_tensors(101)
    expected = reference_sample_stats(list(logits), y)
    for name in ("mean_margin", "confidence", "variability"):
        assert stats[0][name].double().tolist() == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
    for name in ("correct", "forgetting", "first_learned", "last_prediction"):
        assert stats[0][name].tolist() == expected[name], name
