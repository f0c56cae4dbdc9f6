"""A progress bar for the clean pass, on rank zero, shown when the Trainer shows its own."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["pass_progress"]


@contextmanager
def pass_progress(trainer: pl.Trainer, total: int | None, description: str) -> Iterator[Callable[[], None]]:
    """Show a tqdm bar below the training bar while the pass runs; yield the function that advances it.

    Nothing is shown on other ranks, when the Trainer's progress bar is off (``enable_progress_bar=False``) or
    disabled, or when standard output is not a terminal (a second bar there writes cursor-movement codes into log
    files). The bar refreshes at the Trainer's progress bar ``refresh_rate`` and disappears when the pass ends.

    Args:
        trainer: The Trainer.
        total: The number of batches, when known.
        description: The bar's label.

    Yields:
        A function to call after every batch.
    """
    progress_bar = trainer.progress_bar_callback
    if progress_bar is None or not trainer.is_global_zero or not getattr(progress_bar, "is_enabled", False):
        yield _nothing
        return
    if not _is_terminal(sys.stdout):
        yield _nothing
        return
    from tqdm import tqdm

    refresh_rate = max(1, int(getattr(progress_bar, "refresh_rate", 1) or 1))
    position = 2 * int(getattr(progress_bar, "process_position", 0)) + 1
    bar: Any = tqdm(
        total=total,
        desc=description,
        leave=False,
        dynamic_ncols=True,
        file=sys.stdout,
        position=position,
        miniters=refresh_rate,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]",
    )
    try:
        yield bar.update
    finally:
        bar.close()


def _nothing() -> None:
    return None


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
