"""Arithmetic on measured numbers: gaps, effects, standard errors and history entries. Pure functions, no Trainer."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from lightning_evalguard.metrics import join_key

__all__ = ["Decomposition", "Subset", "binomial_stderr", "history_entry", "result_groups", "standard_errors"]

Values = Mapping[str, float]


class Decomposition(NamedTuple):
    """The values of the two extra passes of ``decompose=True``, by metric name.

    Attributes:
        train_mode: Pass B: the modules' own training flags, augmentation off.
        augmented: Pass C: training flags, augmentation on.
    """

    train_mode: Values
    augmented: Values


class Subset(NamedTuple):
    """How many samples a source's clean values were measured on.

    Attributes:
        name: The training loader's name (None for a single loader).
        total_samples: The samples all processes evaluated together, when known.
        sampled: Whether they are a random subset drawn by ``limit_batches``.
    """

    name: str | None
    total_samples: int | None
    sampled: bool


def binomial_stderr(p: float, n: int) -> float:
    """sqrt(p (1 - p) / n): the standard error of a proportion measured on ``n`` samples.

    Args:
        p: The proportion (clamped to [0, 1]).
        n: The number of samples (> 0).

    Returns:
        The standard error.
    """
    p = min(max(p, 0.0), 1.0)
    return math.sqrt(p * (1.0 - p) / n)


def standard_errors(clean: Values, accuracies: Iterable[str], subsets: Iterable[Subset]) -> dict[str, float]:
    """The binomial standard error of each micro-averaged accuracy measured on a random subset.

    Args:
        clean: The clean values by logged name (``<loader>/<metric>`` with several loaders).
        accuracies: The metric names that are micro-averaged accuracies.
        subsets: One entry per clean source.

    Returns:
        ``{name: stderr}`` for the accuracies of the sources that evaluated a non-empty random subset.
    """
    names = list(accuracies)
    stderr: dict[str, float] = {}
    for subset in subsets:
        if not subset.sampled or not subset.total_samples:
            continue
        for name in names:
            key = join_key(subset.name, name)
            if key in clean:
                stderr[key] = binomial_stderr(clean[key], subset.total_samples)
    return stderr


def result_groups(
    clean: Values,
    running: Values,
    validation: Values,
    decomposition: Decomposition | None = None,
    stderr: Values | None = None,
) -> dict[str, dict[str, float]]:
    """Every group of values EvalGuard logs at an epoch end, by group name (the middle part of the logged key).

    Args:
        clean: The clean values.
        running: The running values found (a subset of the clean names).
        validation: The validation values found, for epochs where validation ran.
        decomposition: Passes B and C, with ``decompose=True``.
        stderr: The standard errors, when any.

    Returns:
        ``clean``, ``running``, ``gap`` (clean - running), ``generalization`` (clean - validation), with a
        decomposition ``effect/train_mode`` (clean - B), ``effect/augmentation`` (B - C) and ``effect/weight_drift``
        (C - running), which add up to the gap, and ``stderr`` when given and not empty.
    """
    groups: dict[str, dict[str, float]] = {
        "clean": dict(clean),
        "running": dict(running),
        "gap": {name: clean[name] - running[name] for name in running},
        "generalization": {name: clean[name] - validation[name] for name in validation},
    }
    if decomposition is not None:
        train_mode, augmented = decomposition
        groups["effect/train_mode"] = {n: clean[n] - train_mode[n] for n in clean if n in train_mode}
        groups["effect/augmentation"] = {n: train_mode[n] - augmented[n] for n in train_mode if n in augmented}
        groups["effect/weight_drift"] = {n: augmented[n] - running[n] for n in running if n in augmented}
    if stderr:
        groups["stderr"] = dict(stderr)
    return groups


def history_entry(
    epoch: int, step: int, groups: Mapping[str, Mapping[str, float]], validation: Values
) -> dict[str, Any]:
    """One entry of ``EvalGuard.history``.

    Args:
        epoch: The training epoch.
        step: The global step.
        groups: What :func:`result_groups` returned, plus ``time``.
        validation: The validation values compared with.

    Returns:
        ``{"epoch", "step", "clean", "running", "gap", "validation", ...}``: the groups, each a new dict.
    """
    entry: dict[str, Any] = {"epoch": epoch, "step": step}
    entry.update({name: dict(groups[name]) for name in ("clean", "running", "gap")})
    entry["validation"] = dict(validation)
    entry.update({name: dict(values) for name, values in groups.items() if name not in entry})
    return entry
