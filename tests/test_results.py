"""The arithmetic on measured numbers, without a Trainer: gaps, effects, standard errors, history entries."""

from __future__ import annotations

import math
import statistics

import pytest

from lightning_evalguard.results import (
    Decomposition,
    Subset,
    binomial_stderr,
    finite_population_correction,
    history_entry,
    mean_stderr,
    result_groups,
    rowless_moments,
    standard_errors,
)


def test_gap_is_clean_minus_running_for_the_metrics_with_a_running_value():
    groups = result_groups({"acc": 0.9, "loss": 0.3}, {"acc": 0.8}, {})
    assert groups["gap"] == {"acc": pytest.approx(0.1)}
    assert groups["running"] == {"acc": 0.8} and groups["clean"] == {"acc": 0.9, "loss": 0.3}
    assert groups["generalization"] == {} and "effect/train_mode" not in groups and "stderr" not in groups


def test_generalization_is_clean_minus_validation():
    groups = result_groups({"acc": 0.9}, {}, {"acc": 0.7})
    assert groups["generalization"] == {"acc": pytest.approx(0.2)} and groups["gap"] == {}


def test_the_three_effects_add_up_to_the_gap():
    clean, running = {"acc": 0.91, "f1": 0.5}, {"acc": 0.74}
    groups = result_groups(clean, running, {}, Decomposition({"acc": 0.85, "f1": 0.4}, {"acc": 0.8, "f1": 0.3}))
    effects = [groups[f"effect/{kind}"] for kind in ("train_mode", "augmentation", "weight_drift")]
    assert effects[0] == {"acc": pytest.approx(0.06), "f1": pytest.approx(0.1)}
    assert effects[1] == {"acc": pytest.approx(0.05), "f1": pytest.approx(0.1)}
    assert effects[2] == {"acc": pytest.approx(0.06)}  # only where a running value exists
    assert sum(effect["acc"] for effect in effects) == pytest.approx(groups["gap"]["acc"])


def test_standard_errors_only_for_accuracies_on_random_subsets():
    clean = {"a/acc": 0.75, "a/f1": 0.5, "b/acc": 0.5, "c/acc": 0.9}
    subsets = [Subset("a", 48, True), Subset("b", 100, False), Subset("c", 0, True)]
    assert standard_errors(clean, ["acc"], subsets) == {"a/acc": pytest.approx(math.sqrt(0.75 * 0.25 / 48))}
    assert standard_errors({"acc": 0.5}, ["acc"], [Subset(None, 25, True)]) == {"acc": pytest.approx(0.1)}


def test_binomial_stderr_clamps_the_proportion():
    assert binomial_stderr(1.0000001, 10) == 0.0 and binomial_stderr(-1e-9, 10) == 0.0
    assert binomial_stderr(0.5, 100) == pytest.approx(0.05)


def test_stderr_group_appears_only_when_there_are_standard_errors():
    assert "stderr" not in result_groups({"acc": 0.5}, {}, {}, stderr={})
    assert "clean_low" not in result_groups({"acc": 0.5}, {}, {}, stderr={})
    groups = result_groups({"acc": 0.5, "f1": 0.4}, {}, {}, stderr={"acc": 0.1})
    assert groups["stderr"] == {"acc": 0.1}
    assert groups["clean_low"] == {"acc": pytest.approx(0.3)} and groups["clean_high"] == {"acc": pytest.approx(0.7)}


def test_the_finite_population_correction_shrinks_the_standard_error_of_a_subset():
    assert finite_population_correction(32, 64) == pytest.approx(math.sqrt(32 / 63))
    assert finite_population_correction(64, 64) == 0.0 and finite_population_correction(10, None) == 1.0
    assert binomial_stderr(0.75, 48, 100) == pytest.approx(math.sqrt(0.75 * 0.25 / 48 * 52 / 99))
    subsets = [Subset("a", 48, True, 100)]
    clean = {"a/acc": 0.75}
    assert standard_errors(clean, ["acc"], subsets) == {"a/acc": pytest.approx(binomial_stderr(0.75, 48, 100))}


def test_the_standard_error_of_a_mean_of_per_sample_values():
    values = [0.5, 2.0, 1.25, 3.0, 0.0]
    count, total, squares = len(values), sum(values), sum(v * v for v in values)
    expected = statistics.stdev(values) / math.sqrt(5)
    assert mean_stderr(count, total, squares) == pytest.approx(expected)
    assert mean_stderr(count, total, squares, 20) == pytest.approx(expected * math.sqrt(15 / 19))
    assert mean_stderr(1, 2.0, 4.0) is None
    clean = {"a/mse": total / count, "b/mse": 1.0}
    moments = {"a/mse": (count, total, squares), "b/mse": (count, total, squares)}
    subsets = [Subset("a", 5, True, 20), Subset("b", 5, False, 5)]
    assert standard_errors(clean, [], subsets, moments) == {"a/mse": pytest.approx(expected * math.sqrt(15 / 19))}


def test_a_history_entry_holds_every_group_as_a_new_dict():
    groups = result_groups({"acc": 0.9}, {"acc": 0.8}, {"acc": 0.7})
    groups["time"] = {"pass_seconds": 0.25}
    entry = history_entry(3, 120, groups, {"acc": 0.7})
    assert list(entry) == ["epoch", "step", "clean", "running", "gap", "validation", "generalization", "time"]
    assert (entry["epoch"], entry["step"], entry["validation"], entry["time"]) == (3, 120, {"acc": 0.7}, groups["time"])
    entry["clean"]["acc"] = 0.0
    assert groups["clean"]["acc"] == 0.9


def test_rowless_moments_are_those_whose_count_is_not_the_subsets_samples():
    moments = {"a/mse": (10.0, 1.0, 1.0), "b/mse": (14.0, 1.0, 1.0), "c/mse": (3.0, 1.0, 1.0)}
    subsets = [Subset("a", 10, True, 20), Subset("b", 7, True, 20), Subset("c", 5, False, 5)]
    assert rowless_moments(moments, subsets) == ["b/mse"]  # 14 rows for 7 samples; c is a whole pass
