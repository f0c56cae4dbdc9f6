"""Metric normalisation and naming, running-key resolution, and the gap arithmetic."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torchmetrics import Metric, MetricCollection

__all__ = [
    "clean_collection",
    "flatten_scalars",
    "is_micro_accuracy",
    "join_key",
    "running_candidates",
    "validation_candidates",
]


def clean_collection(metrics: Any) -> MetricCollection:
    """Turn the user's ``metrics`` argument into a private ``MetricCollection`` of clones.

    The user's metric objects are never updated: each is cloned. Names are the mapping's keys, or for a single
    ``Metric`` or a ``MetricCollection`` the names ``MetricCollection`` gives them (class name, prefix, postfix).

    Args:
        metrics: A ``Metric``, a ``MetricCollection`` or a mapping of names to ``Metric`` objects.

    Returns:
        A new ``MetricCollection`` holding clones of the metrics.

    Raises:
        TypeError: If ``metrics`` is of another type, or a mapping holds a key that is not a string or a value that
            is not a ``Metric``.
        ValueError: If the mapping is empty or a name is empty or contains ``"."``.
    """
    if isinstance(metrics, MetricCollection):
        return metrics.clone()
    if isinstance(metrics, Metric):
        return MetricCollection(metrics.clone())
    if isinstance(metrics, Mapping):
        if not metrics:
            raise ValueError("`metrics` must hold at least one metric (got an empty mapping).")
        for name, metric in metrics.items():
            if not isinstance(name, str):
                raise TypeError(f"`metrics` keys must be str (got {name!r} that is a {type(name).__name__}).")
            if not name or "." in name:
                raise ValueError(f"`metrics` keys must be non-empty and contain no '.' (got {name!r}).")
            if not isinstance(metric, Metric):
                raise TypeError(
                    f"`metrics[{name!r}]` must be a torchmetrics.Metric (got {metric!r} that is a"
                    f" {type(metric).__name__})."
                )
        return MetricCollection({name: metric.clone() for name, metric in metrics.items()})
    raise TypeError(
        "`metrics` must be a torchmetrics Metric, a MetricCollection or a mapping of names to Metric objects"
        f" (got {metrics!r} that is a {type(metrics).__name__})."
    )


def flatten_scalars(computed: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Split each computed value into scalars: a scalar keeps its name, element ``i`` of a vector is ``name/i``.

    Args:
        computed: What ``MetricCollection.compute()`` returned.

    Returns:
        A mapping of names to 0-dim tensors.

    Raises:
        TypeError: If a metric computed something that is not a number or a tensor.
    """
    scalars: dict[str, torch.Tensor] = {}
    for name, value in computed.items():
        if isinstance(value, (int, float)):
            value = torch.tensor(float(value))
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"EvalGuard logs numbers, but metric {name!r} computed a {type(value).__name__}. Use a metric that"
                " computes a tensor."
            )
        if value.ndim == 0:
            scalars[name] = value
        else:
            for index, element in enumerate(value.reshape(-1)):
                scalars[f"{name}/{index}"] = element
    return scalars


def is_micro_accuracy(metric: Metric) -> bool:
    """Whether ``metric`` is a micro-averaged accuracy: a proportion of samples, with binomial standard error.

    Args:
        metric: A torchmetrics metric.

    Returns:
        True for ``BinaryAccuracy`` and ``MulticlassAccuracy(average="micro")`` (what ``Accuracy(task=...)`` builds).
    """
    from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy

    if isinstance(metric, BinaryAccuracy):
        return True
    return isinstance(metric, MulticlassAccuracy) and getattr(metric, "average", None) == "micro"


def running_candidates(name: str) -> list[str]:
    """The ``trainer.callback_metrics`` keys looked up, in order, for the running value of metric ``name``.

    Args:
        name: The metric name.

    Returns:
        ``train_<name>``, ``train/<name>``, ``train_<name>_epoch``, ``train/<name>_epoch``.
    """
    return [f"train_{name}", f"train/{name}", f"train_{name}_epoch", f"train/{name}_epoch"]


def validation_candidates(name: str) -> list[str]:
    """The ``trainer.callback_metrics`` keys looked up, in order, for the validation value of metric ``name``.

    Args:
        name: The metric name.

    Returns:
        ``val_<name>``, ``val/<name>``.
    """
    return [f"val_{name}", f"val/{name}"]


def join_key(*parts: str | None) -> str:
    """Join the non-empty parts of a logged key with ``/``.

    Args:
        *parts: Prefix, kind, loader name, metric name; empty or None parts are left out.

    Returns:
        The key, e.g. ``"evalguard/clean/acc"``.
    """
    return "/".join(part for part in parts if part)
