"""limit_batches="auto": subsets sized to a target standard error, prefixes of one permutation, kept on resume."""

from __future__ import annotations

import itertools
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_evalguard import EvalGuard
from lightning_evalguard.results import accuracy_stderr, binomial_stderr
from lightning_evalguard.sampling import AutoSubset, auto_sample_size, fixed_subset, seeded_permutation
from lightning_evalguard.summary import reading

from helpers import (
    Classifier,
    CountSamples,
    NoTraining,
    TensorData,
    accuracy,
    loader,
    macro_accuracy,
    make_tensors,
    micro_accuracy,
    trainer,
)

pytestmark = pytest.mark.filterwarnings("ignore:EvalGuard found no running metric")


@pytest.mark.parametrize(("population", "target", "p", "n"), [(50_000, 0.005, None, None), (400, 0.05, None, None),
                                                              (50_000, 0.005, 0.9, 8_000), (1_000, 0.01, 0.75, 500)])  # fmt: skip
def test_the_size_is_the_smallest_that_reaches_the_target_without_replacement(population, target, p, n):
    size = auto_sample_size(population, target, p, n)
    estimate = 0.5 if p is None else (p * n + 2) / (n + 4)
    n0 = estimate * (1 - estimate) / target**2
    assert size == min(population, math.ceil(n0 / (1 + (n0 - 1) / population)))
    assert binomial_stderr(estimate, size, population) <= target + 1e-12
    if size > 1:
        assert binomial_stderr(estimate, size - 1, population) > target  # one fewer would miss it


def test_the_first_pass_assumes_the_worst_case_and_a_perfect_pass_does_not_shrink_to_nothing():
    assert auto_sample_size(50_000, 0.005) == 8_334  # 10,000 / (1 + 9,999 / 50,000), rounded up
    assert auto_sample_size(50_000, 0.005, 0.99, 8_334) < auto_sample_size(50_000, 0.005, 0.9, 8_334) < 8_334
    assert auto_sample_size(50_000, 0.005, 1.0, 8_334) > 0  # (p n + 2) / (n + 4), not p = 1
    assert auto_sample_size(30, 0.005) == 30  # a small set: the whole of it
    assert auto_sample_size(0, 0.005) == 0


def test_every_subset_is_a_prefix_of_one_permutation_the_fixed_subset_of_that_size():
    candidates = list(range(3, 503))
    permutation = seeded_permutation(candidates, 7)
    assert sorted(permutation) == candidates
    auto = AutoSubset(permutation)
    first = auto.next_indices(0.05)
    auto.p, auto.n = 0.9, len(first)
    second = auto.next_indices(0.05)
    assert len(second) < len(first) and set(second) <= set(first)  # smaller: keeps what it shares
    assert first == fixed_subset(candidates, len(first) / len(candidates), 1, 7, None)
    restored = AutoSubset.from_state_dict(auto.state_dict())
    assert restored.permutation == permutation and (restored.p, restored.n) == (0.9, len(first))
    assert isinstance(auto.state_dict()["permutation"], torch.Tensor)


def test_each_pass_is_sized_from_the_last_and_its_value_is_exact(tmp_path):
    x, y = make_tensors(400)
    guard = EvalGuard({"acc": micro_accuracy()}, limit_batches="auto", target_stderr=0.05, batch_size=32)
    model = Classifier("linear")

    class Exact(pl.Callback):
        """After EvalGuard at each epoch end: the eval-mode accuracy on the prefix of the permutation."""

        def __init__(self) -> None:
            self.expected: list[float] = []

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            n = guard.history[-1]["n"]
            subset = sorted(seeded_permutation(list(range(400)), 0)[:n])
            self.expected.append(accuracy(pl_module, x[subset], y[subset]))

    exact = Exact()
    trainer(tmp_path, max_epochs=3, callbacks=[guard, exact]).fit(model, loader(TensorData(x, y)))
    sizes = [entry["n"] for entry in guard.history]
    assert sizes[0] == auto_sample_size(400, 0.05) == 81
    for before, entry in zip(guard.history, guard.history[1:], strict=False):
        sized = auto_sample_size(400, 0.05, before["clean"]["acc"], before["n"])
        assert entry["n"] == max(sized, math.ceil(before["n"] / 2))  # shrinking by half at most
    for entry, expected in zip(guard.history, exact.expected, strict=True):
        assert entry["clean"]["acc"] == pytest.approx(expected, abs=1e-6)
        assert entry["stderr"]["acc"] == pytest.approx(binomial_stderr(entry["clean"]["acc"], entry["n"], 400))
    assert guard.history[0]["stderr"]["acc"] <= 0.05  # p = 0.5 is the worst case the first size is made for


def test_a_resumed_run_continues_with_the_same_permutation_and_sizes(tmp_path):
    x, y = make_tensors(400)

    def run(epochs: int, ckpt_path: Any = None, save: Any = None) -> EvalGuard:
        guard = EvalGuard({"acc": micro_accuracy()}, limit_batches="auto", target_stderr=0.04, seed=3)
        pl_trainer = trainer(tmp_path, max_epochs=epochs, callbacks=[guard], enable_checkpointing=True)
        pl_trainer.fit(Classifier("linear"), loader(TensorData(x, y)), ckpt_path=ckpt_path)
        if save is not None:
            pl_trainer.save_checkpoint(save)
        return guard

    first = run(2, save=tmp_path / "two.ckpt")
    state = torch.load(tmp_path / "two.ckpt", weights_only=True)["callbacks"]
    (saved,) = [value["auto_subsets"][""] for value in state.values() if "auto_subsets" in value]
    assert saved["permutation"].tolist() == seeded_permutation(list(range(400)), 3)
    assert (saved["p"], saved["n"]) == (first.history[-1]["clean"]["acc"], first.history[-1]["n"])
    resumed = run(3, ckpt_path=tmp_path / "two.ckpt")
    last, before = resumed.history[-1], resumed.history[-2]
    assert len(resumed.history) == 3 and before == first.history[-1]
    assert last["n"] == max(
        auto_sample_size(400, 0.04, before["clean"]["acc"], before["n"]), math.ceil(before["n"] / 2)
    )


def test_a_full_sized_subset_is_a_whole_pass_without_standard_error(tmp_path):
    x, y = make_tensors(60)
    guard = EvalGuard({"acc": micro_accuracy()}, limit_batches="auto", target_stderr=0.005)
    trainer(tmp_path, max_epochs=1, callbacks=[guard]).fit(Classifier("linear"), loader(TensorData(x, y)))
    assert guard.history[-1]["n"] == 60 and "stderr" not in guard.history[-1]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"limit_batches": "AUTO"}, ValueError, r"`limit_batches` as a string must be 'auto'"),
        ({"limit_batches": "auto", "target_stderr": 0.0}, ValueError, r"`target_stderr` must be in \(0, 0.5\)"),
        ({"limit_batches": "auto", "target_stderr": 0.5}, ValueError, r"`target_stderr` must be in \(0, 0.5\)"),
        ({"limit_batches": "auto", "target_stderr": -0.01}, ValueError, r"`target_stderr` must be in \(0, 0.5\)"),
        ({"limit_batches": "auto", "target_stderr": 1}, TypeError, r"`target_stderr` must be a float.*got 1"),
        ({"limit_batches": "auto", "target_stderr": "0.01"}, TypeError, r"`target_stderr` must be a float"),
        ({"limit_batches": "auto", "target_stderr": True}, TypeError, r"`target_stderr` must be a float"),
        ({"limit_batches": 0.5, "target_stderr": 0.01}, ValueError, r"only with limit_batches='auto'"),
        ({"limit_batches": "auto", "cache": True}, ValueError, r"`cache=True` has no fixed batches"),
    ],
)
def test_bad_auto_arguments_are_refused_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        EvalGuard({"acc": micro_accuracy()}, **kwargs)


def test_auto_needs_a_micro_averaged_accuracy_to_size_for():
    with pytest.raises(ValueError, match=r"limit_batches='auto'.*`metrics` holds none"):
        EvalGuard({"macro": macro_accuracy()}, limit_batches="auto")


def test_auto_with_a_user_loader_fails_before_training(tmp_path):
    x, y = make_tensors(40)
    guard = EvalGuard({"acc": micro_accuracy()}, limit_batches="auto", dataloader=loader(TensorData(x, y)))
    with pytest.raises(ValueError, match=r"limit_batches='auto'.*`dataloader=`, whose samples it cannot index"):
        trainer(tmp_path, callbacks=[guard]).fit(NoTraining("linear"), loader(TensorData(x, y)))


def test_auto_keeps_training_bit_identical(tmp_path):
    from helpers import assert_training_unchanged_by

    assert_training_unchanged_by(
        tmp_path,
        lambda: EvalGuard(
            {"acc": micro_accuracy()}, eval_transform=nn.Identity(), limit_batches="auto", target_stderr=0.1
        ),
    )


def test_auto_over_an_iterable_training_set_fails_before_training(tmp_path):
    from torch.utils.data import DataLoader, IterableDataset

    x, y = make_tensors(32)

    class Stream(IterableDataset):
        def __iter__(self) -> Any:
            return iter(zip(x, y, strict=True))

    guard = EvalGuard({"acc": micro_accuracy()}, limit_batches="auto")
    with pytest.raises(ValueError, match=r"IterableDataset.*\(limit_batches='auto'\).*int `limit_batches=`"):
        trainer(tmp_path, callbacks=[guard]).fit(NoTraining("linear"), DataLoader(Stream(), batch_size=8))


def test_the_auto_state_of_a_checkpoint_does_not_take_over_a_run_without_auto(tmp_path):
    x, y = make_tensors(400)
    auto = EvalGuard({"acc": micro_accuracy()}, limit_batches="auto", target_stderr=0.05)
    first = trainer(tmp_path, max_epochs=1, callbacks=[auto], enable_checkpointing=True)
    first.fit(Classifier("linear"), loader(TensorData(x, y)))
    first.save_checkpoint(tmp_path / "auto.ckpt")
    for limit, expected in ((None, 400), (0.5, 200)):
        guard = EvalGuard({"acc": micro_accuracy(), "n": CountSamples()}, limit_batches=limit)
        again = trainer(tmp_path, max_epochs=2, callbacks=[guard], enable_checkpointing=True)
        again.fit(Classifier("linear"), loader(TensorData(x, y)), ckpt_path=tmp_path / "auto.ckpt")
        assert guard.history[-1]["clean"]["n"] == expected
        assert "auto_subsets" not in guard.state_dict()


def test_near_an_accuracy_of_one_the_sizes_shrink_by_half_at_most_and_the_error_bar_stays_open():
    auto = AutoSubset(seeded_permutation(list(range(50_000)), 0))
    sizes = []
    for _ in range(12):  # every pass gets every sample right
        sizes.append(len(auto.next_indices(0.005)))
        auto.p, auto.n = 1.0, sizes[-1]
    assert sizes[0] == 8_334
    assert all(later >= (earlier + 1) // 2 for earlier, later in itertools.pairwise(sizes))
    assert max(sizes[6:]) <= 2 * min(sizes[6:])  # settled, no swing between a handful and thousands
    stderr = accuracy_stderr(1.0, sizes[-1], 50_000)
    assert 0.0 < stderr < 0.02  # Agresti-Coull instead of the plug-in 0
    assert accuracy_stderr(0.9, 100, 1000) == binomial_stderr(0.9, 100, 1000)
    assert "standard errors: real" in reading("acc", 0.8, 1.0, stderr=stderr)


def test_tracked_samples_of_auto_subsets_count_the_passes_that_saw_them(tmp_path):
    x, y = make_tensors(400)
    guard = EvalGuard(
        {"acc": micro_accuracy()}, limit_batches="auto", target_stderr=0.04, track_samples=True, print_summary=False
    )
    trainer(tmp_path, max_epochs=3, callbacks=[guard]).fit(Classifier("linear"), loader(TensorData(x, y)))
    stats = guard.samples
    assert stats is not None and stats.passes == 3
    permutation = seeded_permutation(list(range(400)), 0)
    subsets = [set(permutation[: entry["n"]]) for entry in guard.history]
    assert stats.indices.tolist() == sorted(set().union(*subsets))
    expected = [sum(index in subset for subset in subsets) for index in stats.indices.tolist()]
    assert stats.seen.tolist() == expected and stats.to_dict()["seen"].tolist() == expected
    assert bool((stats.correct <= stats.seen).all())
