"""Checks of EvalGuard's constructor arguments: each names the argument, what was expected and what was given."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torch.utils.data import DataLoader
from torchmetrics import Metric, MetricCollection

__all__ = [
    "GuardMode",
    "check_batch_size",
    "check_bool",
    "check_callable",
    "check_dataloader",
    "check_eval_transform",
    "check_every_n_epochs",
    "check_forward",
    "check_guards",
    "check_limit_batches",
    "check_metrics",
    "check_positive_int",
    "check_running",
    "check_seed",
    "check_str",
]

GuardMode = Literal["raise", "warn", "off"]


def _got(value: Any) -> str:
    return f"got {value!r} that is a {type(value).__name__}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_str(name: str, value: Any, *, allow_empty: bool) -> str:
    """Check that argument ``name`` is a string (non-empty unless ``allow_empty``).

    Raises:
        TypeError: If it is not a string.
        ValueError: If it is empty and that is not allowed.
    """
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a str ({_got(value)}).")
    if not value and not allow_empty:
        raise ValueError(f"`{name}` must be a non-empty str (got '').")
    return value


def check_positive_int(name: str, value: Any) -> int:
    """Check that argument ``name`` is an int >= 1.

    Raises:
        TypeError: If it is not an int.
        ValueError: If it is < 1.
    """
    if not _is_int(value):
        raise TypeError(f"`{name}` must be an int >= 1 ({_got(value)}).")
    if value < 1:
        raise ValueError(f"`{name}` must be an int >= 1 (got {value}).")
    return int(value)


def check_every_n_epochs(value: Any) -> int:
    """Check ``every_n_epochs``: an int >= 1.

    Raises:
        TypeError: If it is not an int.
        ValueError: If it is < 1.
    """
    return check_positive_int("every_n_epochs", value)


def check_limit_batches(value: Any) -> int | float | str | None:
    """Check ``limit_batches``: None, an int >= 1 (batches), a float in (0, 1] (fraction of samples) or ``"auto"``.

    Raises:
        TypeError: If it is neither None, an int, a float nor ``"auto"``.
        ValueError: If the int is < 1, the float is outside (0, 1], or the string is not ``"auto"``.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(
                f"`limit_batches` as a string must be 'auto' (a subset sized to `target_stderr`) (got {value!r})."
            )
        return value
    if _is_int(value):
        if value < 1:
            raise ValueError(
                f"`limit_batches` must be an int >= 1 (a number of batches) or a float in (0, 1] (a fraction of"
                f" samples) (got {value})."
            )
        return int(value)
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(
                f"`limit_batches` as a float is a fraction of samples and must be in (0, 1] (got {value}). For a"
                " number of batches pass an int."
            )
        return value
    raise TypeError(
        f"`limit_batches` must be None, an int >= 1 (a number of batches), a float in (0, 1] or 'auto' ({_got(value)})."
    )


#: ``target_stderr``'s default.
DEFAULT_TARGET_STDERR = 0.005


def check_target_stderr(value: Any, limit_batches: Any, accuracies: Sequence[str], cache: bool) -> float:
    """Check ``target_stderr`` (a float in (0, 0.5)) and what ``limit_batches="auto"`` needs.

    Raises:
        TypeError: If it is not a float.
        ValueError: If it is outside (0, 0.5); if it was changed without ``limit_batches="auto"``; if
            ``limit_batches="auto"`` comes with no micro-averaged accuracy to size the subset for, or with
            ``cache=True`` (the subset changes from pass to pass).
    """
    if not isinstance(value, float):
        raise TypeError(
            f"`target_stderr` must be a float in (0, 0.5), a standard error of an accuracy ({_got(value)})."
        )
    if not 0.0 < value < 0.5:
        raise ValueError(
            f"`target_stderr` must be in (0, 0.5): a standard error of an accuracy, e.g. 0.005 for half a point (got"
            f" {value})."
        )
    if limit_batches != "auto":
        if value != DEFAULT_TARGET_STDERR:
            raise ValueError(
                f"`target_stderr={value}` sizes the subset only with limit_batches='auto' (got limit_batches="
                f"{limit_batches!r}). Pass limit_batches='auto', or leave `target_stderr` out."
            )
        return value
    if not accuracies:
        raise ValueError(
            "limit_batches='auto' sizes the subset so that the standard error of each micro-averaged accuracy is at"
            " most `target_stderr`, but `metrics` holds none (BinaryAccuracy, MulticlassAccuracy(average='micro'),"
            " Accuracy(task=...)). Add one, or pass a fixed `limit_batches` (a fraction or a number of batches)."
        )
    if cache:
        raise ValueError(
            "limit_batches='auto' changes the subset from pass to pass, so `cache=True` has no fixed batches to"
            " keep. Pass a fixed `limit_batches` with cache=True, or leave `cache` out."
        )
    return value


def check_batch_size(value: Any) -> int | None:
    """Check ``batch_size``: None or an int >= 1.

    Raises:
        TypeError: If it is neither None nor an int.
        ValueError: If it is < 1.
    """
    if value is None:
        return None
    if not _is_int(value):
        raise TypeError(f"`batch_size` must be None or an int >= 1 ({_got(value)}).")
    if value < 1:
        raise ValueError(f"`batch_size` must be None or an int >= 1 (got {value}).")
    return int(value)


def check_eval_transform(value: Any) -> Any:
    """Check ``eval_transform``: None, a callable, or ``"val"``.

    Raises:
        ValueError: If it is a string other than ``"val"``.
        TypeError: If it is neither None, a callable nor a string.
    """
    if value is None or callable(value):
        return value
    if isinstance(value, str):
        if value != "val":
            raise ValueError(
                "`eval_transform` must be a callable, 'val' (the validation dataset's transform) or None"
                f" (got {value!r})."
            )
        return value
    raise TypeError(f"`eval_transform` must be a callable, 'val' or None ({_got(value)}).")


def check_dataloader(value: Any) -> Any:
    """Check ``dataloader``: None, a DataLoader, or a callable building one from the Trainer.

    Raises:
        TypeError: If it is none of those.
    """
    if value is None or isinstance(value, DataLoader) or callable(value):
        return value
    raise TypeError(f"`dataloader` must be a DataLoader, a callable (trainer) -> DataLoader, or None ({_got(value)}).")


def check_callable(name: str, value: Any, expected: str) -> Any:
    """Check that argument ``name`` is None or a callable.

    Args:
        name: The argument's name.
        value: The argument.
        expected: What the callable does, for the message, e.g. ``"(preds, target) -> Tensor[B]"``.

    Raises:
        TypeError: If it is neither.
    """
    if value is None or callable(value):
        return value
    raise TypeError(f"`{name}` must be a callable {expected}, or None ({_got(value)}).")


def check_forward(value: Any) -> Any:
    """Check ``forward``: None or a callable ``(module, batch) -> (preds, target)``.

    Raises:
        TypeError: If it is neither.
    """
    if value is None or callable(value):
        return value
    raise TypeError(f"`forward` must be a callable (module, batch) -> (preds, target), or None ({_got(value)}).")


def check_bool(name: str, value: Any) -> bool:
    """Check that argument ``name`` is a bool.

    Raises:
        TypeError: If it is not.
    """
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool ({_got(value)}).")
    return value


def check_running(value: Any, names: list[str], name: str = "running") -> dict[str, str] | None:
    """Check ``running`` (or ``val``): None or a mapping from metric names to ``trainer.callback_metrics`` keys.

    Args:
        value: The argument.
        names: The metric names, which the mapping's keys must be among.
        name: The argument's name, for messages.

    Raises:
        TypeError: If it is not a mapping of str to str.
        ValueError: If a key is not a metric name.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"`{name}` must be a mapping of metric names to logged keys, or None ({_got(value)}).")
    for metric, key in value.items():
        if not isinstance(metric, str) or not isinstance(key, str):
            raise TypeError(f"`{name}` must map str metric names to str keys (got {metric!r}: {key!r}).")
        if not any(f"/{known}/" in f"/{metric}/" for known in names):
            raise ValueError(f"`{name}` names metric {metric!r}, which is not among the metrics {names}.")
    return dict(value)


def check_guards(value: Any) -> GuardMode:
    """Check ``guards``: ``"raise"``, ``"warn"`` or ``"off"``.

    Raises:
        TypeError: If it is not a string.
        ValueError: If it is a string other than those three.
    """
    if not isinstance(value, str):
        raise TypeError(f"`guards` must be 'raise', 'warn' or 'off' ({_got(value)}).")
    if value not in ("raise", "warn", "off"):
        raise ValueError(f"`guards` must be 'raise', 'warn' or 'off' (got {value!r}).")
    return value  # type: ignore[return-value]


#: The seeds numpy accepts: EvalGuard seeds torch, numpy and Python's RNGs with the same value.
SEED_RANGE = (0, 2**32 - 1)


def check_seed(value: Any) -> int:
    """Check ``seed``: an int in [0, 2**32 - 1], the range every RNG EvalGuard seeds accepts (numpy's is the narrowest).

    Raises:
        TypeError: If it is not an int.
        ValueError: If it is outside [0, 2**32 - 1].
    """
    if not _is_int(value):
        raise TypeError(f"`seed` must be an int in [0, 2**32 - 1] ({_got(value)}).")
    low, high = SEED_RANGE
    if not low <= value <= high:
        raise ValueError(f"`seed` must be an int in [0, 2**32 - 1] (got {value}): numpy's RNG accepts no other seed.")
    return int(value)


def _check_not_a_metric_class(name: str, value: Any) -> None:
    if isinstance(value, type) and issubclass(value, (Metric, MetricCollection)):
        raise TypeError(
            f"`{name}` must be a torchmetrics Metric object, but got the class {value.__name__} itself: instantiate it,"
            f" e.g. {value.__name__}(...) with its arguments (such as num_classes=)."
        )


def check_metrics(metrics: Any) -> MetricCollection:
    """Check ``metrics`` and turn it into a private ``MetricCollection`` of clones.

    The user's metric objects are never updated: each is cloned. Names are the mapping's keys, the names a
    ``MetricCollection`` gives without its prefix and postfix (its base names), or a single ``Metric``'s class name.

    Args:
        metrics: A ``Metric``, a ``MetricCollection`` or a mapping of names to ``Metric`` objects.

    Returns:
        A new ``MetricCollection`` holding clones of the metrics.

    Raises:
        TypeError: If ``metrics`` is of another type, or a mapping holds a key that is not a string or a value that
            is not a ``Metric``.
        ValueError: If the mapping is empty or a name is empty or contains ``"."``.
    """
    _check_not_a_metric_class("metrics", metrics)
    if isinstance(metrics, MetricCollection):
        collection = metrics.clone()
        collection.prefix = collection.postfix = None  # base names: the collection's own keys are the running keys
        return collection
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
            _check_not_a_metric_class(f"metrics[{name!r}]", metric)
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
