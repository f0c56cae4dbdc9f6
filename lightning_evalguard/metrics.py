"""Metric naming: the values a collection computes as scalars, logged keys, and where reference values are looked up."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import torch
from torchmetrics import Metric, MetricCollection

from lightning_evalguard.errors import add_note

__all__ = [
    "MetricInfo",
    "SampleMoments",
    "check_fits",
    "collection_keys",
    "flatten_scalars",
    "is_mean_of_samples",
    "is_micro_accuracy",
    "metric_infos",
    "per_sample_values",
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


def is_mean_of_samples(metric: Metric) -> bool:
    """Whether ``metric`` is the mean of one value per sample, with the sample standard error of that mean.

    Args:
        metric: A torchmetrics metric.

    Returns:
        True for ``MeanSquaredError`` (squared, one output) and ``MeanAbsoluteError`` (one output), not for a
        subclass that overrides ``update`` or ``compute``. Their value over
        a pass is the mean over samples of each sample's mean squared (absolute) error, when every sample has the
        same number of elements.
    """
    from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError

    if int(getattr(metric, "num_outputs", 1) or 1) != 1:
        return False
    for kind in (MeanSquaredError, MeanAbsoluteError):
        # A subclass with its own update (or compute) may measure something else: its per-sample values are unknown.
        if isinstance(metric, kind):
            own = type(metric).update is kind.update and type(metric).compute is kind.compute
            return own and (kind is MeanAbsoluteError or bool(getattr(metric, "squared", True)))
    return False


def per_sample_values(metric: Metric, preds: Any, target: Any) -> torch.Tensor | None:
    """Each sample's value of a mean-of-samples metric (see :func:`is_mean_of_samples`) for one batch.

    Args:
        metric: A ``MeanSquaredError`` or ``MeanAbsoluteError``.
        preds: The batch's predictions (the metric has accepted them).
        target: Its targets.

    Returns:
        A 1-D tensor, one value per sample (the mean over the sample's elements), or None when the batch has no
        sample dimension. No host sync.
    """
    from torchmetrics.regression import MeanSquaredError

    if not isinstance(preds, torch.Tensor) or not isinstance(target, torch.Tensor) or preds.ndim == 0:
        return None
    count = preds.shape[0]
    if count == 0 or target.numel() != preds.numel():
        return None
    dtype = torch.float32 if preds.device.type == "mps" else torch.float64  # MPS has no float64
    difference = preds.reshape(count, -1).to(dtype) - target.reshape(count, -1).to(dtype)
    values = difference.square() if isinstance(metric, MeanSquaredError) else difference.abs()
    return values.mean(1)


class SampleMoments:
    """Count, sum and sum of squares of the per-sample values of mean-of-samples metrics over one pass.

    Kept on the model's device (two small operations per metric and batch, no host sync); the count on the host.
    """

    def __init__(self, metrics: Mapping[str, Metric]) -> None:
        """Start a pass.

        Args:
            metrics: The mean-of-samples metrics (see :func:`is_mean_of_samples`), by logged name.
        """
        self.metrics = dict(metrics)
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = dict.fromkeys(self.metrics, 0)

    def observe(self, batch: Any, preds: Any, target: Any) -> None:
        """Add one batch's per-sample values.

        Args:
            batch: The batch (unused; the signature of a pass observer).
            preds: Its predictions.
            target: Its targets.
        """
        for name, metric in self.metrics.items():
            values = per_sample_values(metric, preds, target)
            if values is None:
                continue
            sums = torch.stack([values.sum(), values.square().sum()])
            self._sums[name] = self._sums[name] + sums if name in self._sums else sums
            self._counts[name] += int(values.shape[0])

    def table(self, device: torch.device) -> torch.Tensor:
        """``(count, sum, sum of squares)`` per metric, in the order of ``metrics``, as one tensor to reduce.

        Args:
            device: Where to put it (the module's device, which the strategy's collectives accept).

        Returns:
            A tensor of shape (len(metrics), 3).
        """
        dtype = torch.float32 if device.type == "mps" else torch.float64
        rows = [
            torch.cat(
                [
                    torch.tensor([float(self._counts[name])], dtype=dtype, device=device),
                    self._sums[name].to(device, dtype)
                    if name in self._sums
                    else torch.zeros(2, dtype=dtype, device=device),
                ]
            )
            for name in self.metrics
        ]
        return torch.stack(rows) if rows else torch.zeros((0, 3), dtype=dtype, device=device)


StderrKind = Literal["binomial", "samples"]


class MetricInfo(NamedTuple):
    """What EvalGuard's words and standard errors need to know about a metric.

    Attributes:
        bounded: Its values lie in [0, 1] (torchmetrics' ``plot_lower_bound`` 0 and ``plot_upper_bound`` 1): the
            summary gives differences in points.
        higher_is_better: torchmetrics' ``higher_is_better`` (None when the metric does not say).
        stderr: How its standard error on a random subset is estimated: ``"binomial"`` for a micro-averaged
            accuracy, ``"samples"`` for a mean of per-sample values, None for any other metric (none is logged).
        decomposable: Whether its value over an epoch equals Lightning's batch-size-weighted mean of its per-batch
            values: True for micro-averaged accuracies and torchmetrics' means of per-sample (per-element) errors;
            False for torchmetrics' metrics known not to be (macro and weighted averages over classes, binary and
            multilabel F1, precision and recall, AUROC, correlations, RMSE, ...); None when EvalGuard does not know
            (your own ``Metric`` subclass, other torchmetrics metrics): then nothing is warned about.
    """

    bounded: bool
    higher_is_better: bool | None
    stderr: StderrKind | None
    decomposable: bool | None = None


#: torchmetrics' means of per-element values besides MSE and MAE: decomposable, but without a standard error here.
_MEAN_OF_ELEMENTS = (
    "MeanAbsolutePercentageError",
    "SymmetricMeanAbsolutePercentageError",
    "MeanSquaredLogError",
    "LogCoshError",
)

#: Parts of the names of torchmetrics' metrics that are not a mean over samples: ratios of counts pooled over the
#: epoch (binary and multilabel F1, precision, recall, ...), rankings (AUROC, average precision) and correlations.
#: A multiclass one with ``average="micro"`` is the accuracy, which is a mean.
_NOT_MEANS = (
    "F1Score",
    "FBetaScore",
    "Precision",
    "Recall",
    "Specificity",
    "NegativePredictiveValue",
    "AUROC",
    "JaccardIndex",
    "MatthewsCorrCoef",
    "CohenKappa",
    "CalibrationError",
    "R2Score",
    "PearsonCorrCoef",
    "SpearmanCorrCoef",
    "KendallRankCorrCoef",
    "ConcordanceCorrCoef",
    "ExplainedVariance",
)


#: Multiclass metrics that, micro-averaged over single-label samples, are a mean over samples.
_MICRO_MEANS = frozenset({"F1Score", "FBetaScore", "Precision", "Recall", "Specificity"})


def _decomposable(metric: Metric, stderr: StderrKind | None) -> bool | None:
    # True: a mean over samples; False: torchmetrics says otherwise; None: not known (then nothing is warned about).
    if stderr is not None:
        return True
    module = type(metric).__module__ or ""
    if not module.startswith("torchmetrics."):
        return None  # a metric of the user's: unknown
    name = type(metric).__name__
    if name.startswith("Multiclass") and hasattr(metric, "average"):
        average = metric.average
        if average in ("macro", "weighted"):
            return False  # a mean over classes of per-class ratios
        if average == "micro" and name.removeprefix("Multiclass") in _MICRO_MEANS:
            return None  # micro-averaged over single-label samples: the accuracy (or 1 - a mean), a mean
    if any(part in name for part in _NOT_MEANS):
        return False
    if name == "MeanSquaredError" and not getattr(metric, "squared", True):
        return False  # RMSE: the root of a mean
    if name in _MEAN_OF_ELEMENTS and int(getattr(metric, "num_outputs", 1) or 1) == 1:
        return True
    return None


def metric_info(metric: Metric) -> MetricInfo:
    """What EvalGuard needs to know about ``metric`` (see :class:`MetricInfo`).

    Args:
        metric: A torchmetrics metric.

    Returns:
        Its info.
    """
    lower, upper = getattr(metric, "plot_lower_bound", None), getattr(metric, "plot_upper_bound", None)
    higher = getattr(metric, "higher_is_better", None)
    kind: StderrKind | None = None
    if is_micro_accuracy(metric):
        kind = "binomial"
    elif is_mean_of_samples(metric):
        kind = "samples"
    higher_is_better = None if higher is None else bool(higher)
    return MetricInfo(lower == 0.0 and upper == 1.0, higher_is_better, kind, _decomposable(metric, kind))


def metric_infos(metrics: MetricCollection) -> dict[str, MetricInfo]:
    """:func:`metric_info` of each metric of a collection, by the name it computes under.

    Args:
        metrics: A collection.

    Returns:
        ``{name: MetricInfo}``.
    """
    return {str(name): metric_info(metric) for name, metric in metrics.items(keep_base=False)}


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
