"""Arithmetic on measured numbers: gaps, effects, standard errors and history entries. Pure functions, no Trainer."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from lightning_evalguard.metrics import join_key

__all__ = [
    "Decomposition",
    "Subset",
    "accuracy_stderr",
    "binomial_stderr",
    "finite_population_correction",
    "history_entry",
    "mean_stderr",
    "result_groups",
    "rowless_moments",
    "standard_errors",
]

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
    """How many samples a source's clean values were measured on, out of how many.

    Attributes:
        name: The training loader's name (None for a single loader).
        total_samples: The samples all processes evaluated together (n), when known.
        sampled: Whether they are a random subset drawn by ``limit_batches``.
        population: The samples the subset was drawn from (N), when known; None leaves out the finite-population
            correction.
    """

    name: str | None
    total_samples: int | None
    sampled: bool
    population: int | None = None


def finite_population_correction(n: int, population: int | None) -> float:
    """sqrt((N - n) / (N - 1)): how much less a mean varies when n samples are drawn from N without replacement.

    Args:
        n: The samples drawn.
        population: N, or None (no correction).

    Returns:
        The factor (1.0 without a population, 0.0 when n >= N).
    """
    if population is None or population <= 1:
        return 1.0
    if n >= population:
        return 0.0
    return math.sqrt((population - n) / (population - 1))


def binomial_stderr(p: float, n: int, population: int | None = None) -> float:
    """sqrt(p (1 - p) / n) (times the finite-population correction): the standard error of a proportion.

    Args:
        p: The proportion (clamped to [0, 1]).
        n: The number of samples (> 0).
        population: The samples they were drawn from without replacement, or None.

    Returns:
        The standard error.
    """
    p = min(max(p, 0.0), 1.0)
    return math.sqrt(p * (1.0 - p) / n) * finite_population_correction(n, population)


def accuracy_stderr(p: float, n: int, population: int | None = None) -> float:
    """The standard error EvalGuard logs for an accuracy ``p`` measured on ``n`` of ``population`` samples.

    :func:`binomial_stderr`, except when every sample was right (or every one wrong): the plug-in value is then 0,
    and the Agresti-Coull one is given instead, sqrt(p~ (1 - p~) / (n + 4)) with p~ = (p n + 2) / (n + 4), times the
    finite-population correction, so that the band around the clean value never has zero width on a subset.

    Args:
        p: The accuracy.
        n: The number of samples (> 0).
        population: The samples they were drawn from without replacement, or None.

    Returns:
        The standard error.
    """
    if 0.0 < p < 1.0:
        return binomial_stderr(p, n, population)
    adjusted = (min(max(p, 0.0), 1.0) * n + 2.0) / (n + 4.0)
    return math.sqrt(adjusted * (1.0 - adjusted) / (n + 4.0)) * finite_population_correction(n, population)


def mean_stderr(count: float, total: float, squares: float, population: int | None = None) -> float | None:
    """The standard error of a mean of per-sample values: s / sqrt(n), s their sample standard deviation.

    Times the finite-population correction when ``population`` is given.

    Args:
        count: n, the number of values.
        total: Their sum.
        squares: The sum of their squares.
        population: The samples they were drawn from without replacement, or None.

    Returns:
        The standard error of their mean, or None with fewer than two values.
    """
    n = round(count)
    if n < 2:
        return None
    variance = max((squares - total * total / n) / (n - 1), 0.0)
    return math.sqrt(variance / n) * finite_population_correction(n, population)


def standard_errors(
    clean: Values,
    accuracies: Iterable[str],
    subsets: Iterable[Subset],
    moments: Mapping[str, tuple[float, float, float]] | None = None,
) -> dict[str, float]:
    """The standard error of each clean value measured on a random subset, where EvalGuard can estimate one.

    Micro-averaged accuracies get the binomial standard error (:func:`accuracy_stderr`), means of per-sample values
    (``moments``) the sample standard deviation over sqrt(n), when there is one value per sample of the subset; both
    with the finite-population correction when the subset's population is known. A whole pass has no sampling
    error: nothing is returned for it.

    Args:
        clean: The clean values by logged name (``<loader>/<metric>`` with several loaders).
        accuracies: The metric names that are micro-averaged accuracies.
        subsets: One entry per clean source.
        moments: ``(count, sum, sum of squares)`` of the per-sample values of mean-of-samples metrics, by logged
            name, for the sources that evaluated a random subset.

    Returns:
        ``{name: stderr}`` for the sources that evaluated a non-empty random subset.
    """
    names = list(accuracies)
    moments = moments or {}
    stderr: dict[str, float] = {}
    for subset in subsets:
        if not subset.sampled or not subset.total_samples:
            continue
        for name in names:
            key = join_key(subset.name, name)
            if key in clean and not math.isnan(clean[key]):
                stderr[key] = accuracy_stderr(clean[key], subset.total_samples, subset.population)
        for key, (count, total, squares) in moments.items():
            if key not in clean or not _belongs(key, subset):
                continue
            if round(count) == subset.total_samples:  # else the preds' rows are not the samples (e.g. flattened)
                value = mean_stderr(count, total, squares, subset.population)
                if value is not None:
                    stderr[key] = value
    return stderr


def _belongs(key: str, subset: Subset) -> bool:
    # Whether a logged name (``<loader>/<metric>`` with several loaders) was measured on this source.
    return subset.name is None or key.startswith(f"{subset.name}/")


def rowless_moments(moments: Mapping[str, tuple[float, float, float]], subsets: Iterable[Subset]) -> list[str]:
    """The mean-of-samples metrics whose per-sample values were not one per sample of their random subset.

    Their preds had more or fewer rows than the subset has samples (a ``forward`` that flattens them), so the spread
    of their values is not the samples' and :func:`standard_errors` gives them none.

    Args:
        moments: ``(count, sum, sum of squares)`` by logged name, as for :func:`standard_errors`.
        subsets: One entry per clean source.

    Returns:
        Their logged names.
    """
    sampled = [subset for subset in subsets if subset.sampled and subset.total_samples]
    return [
        key
        for key, (count, _, _) in moments.items()
        if any(_belongs(key, subset) and round(count) != subset.total_samples for subset in sampled)
    ]


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
        (C - running), which add up to the gap, and when standard errors are given ``stderr`` with the band of
        the clean value, ``clean_low`` and ``clean_high`` (clean -/+ 2 standard errors).
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
        groups["clean_low"] = {name: clean[name] - 2 * value for name, value in stderr.items() if name in clean}
        groups["clean_high"] = {name: clean[name] + 2 * value for name, value in stderr.items() if name in clean}
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
