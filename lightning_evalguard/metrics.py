"""Metric naming: the values a collection computes as scalars, logged keys, and where reference values are looked up."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torchmetrics import Metric, MetricCollection

from lightning_evalguard.errors import add_note

__all__ = [
    "check_fits",
    "collection_keys",
    "flatten_scalars",
    "is_micro_accuracy",
    "micro_accuracy_names",
    "join_key",
    "running_candidates",
    "validation_candidates",
]


def collection_keys(metrics: Any) -> dict[str, str]:
    """The keys a ``MetricCollection`` with a prefix or postfix logs under, by base name (the running keys).

    A module that logs ``self.log_dict(self.train_metrics(preds, target))`` with
    ``train_metrics = MetricCollection(..., prefix="train_")`` logs ``train_<name>``; passed to EvalGuard, that
    collection's metrics are named by their base names and compared with those keys.

    Args:
        metrics: The callback's ``metrics`` argument.

    Returns:
        ``{base name: prefixed and postfixed key}``; empty for anything but a collection with a prefix or postfix.
    """
    if not isinstance(metrics, MetricCollection) or not (metrics.prefix or metrics.postfix):
        return {}
    return {str(base): str(key) for base, key in zip(metrics.keys(keep_base=True), metrics.keys(), strict=True)}


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


def micro_accuracy_names(metrics: MetricCollection) -> list[str]:
    """The names of the micro-averaged accuracies in ``metrics`` (see :func:`is_micro_accuracy`).

    Args:
        metrics: A collection.

    Returns:
        Their names, as the collection computes them.
    """
    return [str(name) for name, metric in metrics.items(keep_base=False) if is_micro_accuracy(metric)]


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


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


def check_fits(metrics: MetricCollection, preds: Any, target: Any, device: torch.device) -> None:
    """Update a clone of each metric with one batch's ``(preds, target)``, so a metric that does not fit fails now.

    Args:
        metrics: The metrics (never updated: each is cloned).
        preds: The first clean batch's predictions, as the passes give them.
        target: Its targets.
        device: Where the passes keep the metrics (the module's device).

    Raises:
        Exception: The metric's own error (torchmetrics' ``ValueError`` or ``RuntimeError``), with a note naming the
            metric and the shapes and dtypes of ``preds`` and ``target``.
    """
    for name, metric in metrics.items(keep_base=False):
        probe = metric.clone().to(device)
        try:
            probe.reset()  # as before every pass
            probe.update(preds, target)
        except Exception as exc:
            add_note(
                exc,
                f"EvalGuard updated a clone of metric {name!r} ({type(metric).__name__}) with the first clean batch"
                f" before training: preds {_describe(preds)}, target {_describe(target)}. Pass metrics that accept"
                " the model's outputs (e.g. the right num_classes or task), or `forward=` returning the (preds, target)"
                " they expect.",
            )
            raise
