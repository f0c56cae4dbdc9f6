"""Checks of EvalGuard's constructor arguments: each names the argument, what was expected and what was given."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.utils.data import DataLoader

__all__ = [
    "check_batch_size",
    "check_bool",
    "check_dataloader",
    "check_eval_transform",
    "check_every_n_epochs",
    "check_forward",
    "check_limit_batches",
    "check_positive_int",
    "check_running",
    "check_str",
]


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


def check_limit_batches(value: Any) -> int | float | None:
    """Check ``limit_batches``: None, an int >= 1 (batches) or a float in (0, 1] (fraction of samples).

    Raises:
        TypeError: If it is neither None, an int nor a float.
        ValueError: If the int is < 1 or the float is outside (0, 1].
    """
    if value is None:
        return None
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
        f"`limit_batches` must be None, an int >= 1 (a number of batches) or a float in (0, 1] ({_got(value)})."
    )


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
    raise TypeError(
        f"`dataloader` must be a DataLoader, a callable (trainer) -> DataLoader, or None ({_got(value)})."
    )


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
