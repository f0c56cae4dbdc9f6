"""The batch cache of ``cache=True``: copying and sizing batches, where the cache lives, its budget, its release.

With augmentation off the clean batches are the same every epoch, so after the first full pass EvalGuard can keep
them (``BatchCache``) and later passes skip loading, worker start-up and transforms. At fit start each cache is sized
from the first clean batch and refused above ``cache_max_bytes`` (:func:`size_at_fit_start`); when it fills, it lives
on the CUDA device if the batches fit half of its free memory (:func:`device_cache_placement`), else in host memory;
at the end of fit the batches are freed (:func:`release`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from lightning_evalguard.distributed import any_rank
from lightning_evalguard.forward import batch_path, default_batch_path

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "DEVICE_CACHE_SHARE",
    "BatchCache",
    "DevicePlacement",
    "batch_nbytes",
    "device_cache_placement",
    "release",
    "size_at_fit_start",
    "uncopyable",
]


def _parts(batch: Any) -> list[Any] | None:
    # The items of a container a batch may be made of (mapping, tuple, list, dataclass), or None for a leaf.
    if isinstance(batch, Mapping):
        return list(batch.values())
    if isinstance(batch, (tuple, list)):
        return list(batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return [getattr(batch, item.name) for item in dataclasses.fields(batch)]
    return None


def batch_nbytes(batch: Any) -> int:
    """The bytes held by the tensors and numpy arrays of a batch (in mappings, tuples, lists and dataclasses).

    Args:
        batch: A batch.

    Returns:
        The sum of ``element_size() * nelement()`` over its tensors, plus its arrays' ``nbytes``.
    """
    if isinstance(batch, torch.Tensor):
        return batch.element_size() * batch.nelement()
    if isinstance(batch, np.ndarray):
        return int(batch.nbytes)
    parts = _parts(batch)
    return sum(batch_nbytes(part) for part in parts) if parts is not None else 0


def uncopyable(batch: Any) -> str | None:
    """The type of the first part of a batch that the cache cannot copy, or None when it can copy all of it.

    The cache copies tensors and numpy arrays inside mappings, tuples, lists and dataclasses. Any other object with a
    ``to`` method (which Lightning's transfer would move, e.g. a PyTorch Geometric ``Batch``) could be changed in
    place by a hook or a forward without the cache knowing, and holds memory the cache cannot count.

    Args:
        batch: A batch.

    Returns:
        The offending part's type name, or None.
    """
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        return None
    parts = _parts(batch)
    if parts is None:
        return type(batch).__name__ if callable(getattr(batch, "to", None)) else None
    for part in parts:
        found = uncopyable(part)
        if found is not None:
            return found
    return None


def _copy(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.clone()
    if isinstance(batch, np.ndarray):
        return batch.copy()
    if isinstance(batch, Mapping):
        return type(batch)({key: _copy(value) for key, value in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_copy(value) for value in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_copy(value) for value in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        copied = copy.copy(batch)
        for item in dataclasses.fields(batch):
            object.__setattr__(copied, item.name, _copy(getattr(batch, item.name)))
        return copied
    return batch


class DevicePlacement(NamedTuple):
    """Where a filling :class:`BatchCache` keeps its batches when not in host memory.

    Attributes:
        device: The accelerator device.
        move: Brings a loader batch to ``device`` (idempotent).
        max_bytes: The most device memory the batches may take.
    """

    device: torch.device
    move: Callable[[Any], Any]
    max_bytes: int


class BatchCache:
    """The clean batches of one source kept in memory after the first full pass, up to ``max_bytes``.

    With augmentation off the clean batches are the same every epoch, so later passes skip loading, worker start-up
    and transforms. The batches live in host memory as the loader yields them, or, when the pass that fills the
    cache is given a ``to_device`` function, on the device as that function returns them (later passes then skip the
    transfer too). Each pass reads copies, so a hook or a forward that changes a batch in place cannot change the
    cache. If the batches outgrow ``max_bytes`` while filling, the cache is dropped and passes read the loader as
    before.

    Attributes:
        max_bytes: The most memory the batches may take.
        batches: The cached batches once a pass has filled the cache, else None.
        nbytes: The bytes the cached batches take.
        overflowed: Whether the batches outgrew ``max_bytes`` (the cache stays empty).
        estimate: The size estimated at fit start (first batch times number of batches), or None.
        device_estimate: The same for the batches as they reach the model (after the precision plugin's input
            conversion), when they could live on the device; else None.
        device: Where the cached batches live: None for host memory, as the loader yields them.
        num_batches: How many batches the cache held when full (kept after :meth:`release`).
    """

    def __init__(self, max_bytes: int) -> None:
        """Create an empty cache.

        Args:
            max_bytes: The most memory the batches may take.
        """
        self.max_bytes = max_bytes
        self.batches: list[Any] | None = None
        self.nbytes = 0
        self.overflowed = False
        self.estimate: int | None = None
        self.device_estimate: int | None = None
        self.device: torch.device | None = None
        self.num_batches = 0

    def release(self) -> None:
        """Drop the cached batches (at the end of fit), keeping ``nbytes``, ``device`` and ``num_batches``."""
        self.batches = None

    @property
    def filling(self) -> bool:
        """Whether the next :meth:`read` would fill the cache (it is neither full nor dropped)."""
        return self.batches is None and not self.overflowed

    def read(
        self,
        loader: Iterable[Any],
        max_batches: int | None,
        to_device: DevicePlacement | None = None,
    ) -> Iterator[Any]:
        """Yield up to ``max_batches`` batches: from the cache once it is full, else from ``loader`` while filling it.

        Args:
            loader: The source's loader.
            max_batches: The most batches a pass reads.
            to_device: Keep the batches on ``to_device.device``: while filling, every loader batch goes through
                ``to_device.move`` (which must be idempotent: the pass applies its own transfer again), and the moved
                batch is yielded and cached, up to ``to_device.max_bytes`` as well. Ignored once the cache is full
                or dropped.

        Yields:
            The batches (copies of the cached ones).
        """
        if self.batches is not None:
            for batch in self.batches:
                yield _copy(batch)
            return
        kept: list[Any] | None = None if self.overflowed else []
        move = to_device.move if to_device is not None and kept is not None else None
        limit = self.max_bytes if move is None or to_device is None else min(self.max_bytes, to_device.max_bytes)
        size = 0
        for count, batch in enumerate(loader, start=1):
            if move is not None:
                batch = move(batch)
            if kept is not None:
                size += batch_nbytes(batch)
                if size > limit:
                    kept, self.overflowed = None, True
                else:
                    kept.append(_copy(batch))
            yield batch
            if max_batches is not None and count >= max_batches:
                break
        if kept is not None:
            self.batches, self.nbytes, self.num_batches = kept, size, len(kept)
            self.device = to_device.device if move is not None and to_device is not None else None


DEVICE_CACHE_SHARE = 0.5
"""The share of the device's free memory (measured when the cache fills) that a device cache may take."""


def device_cache_placement(
    trainer: pl.Trainer, pl_module: pl.LightningModule, estimate: int | None, max_bytes: int
) -> DevicePlacement | None:
    """Where a batch cache that is about to fill keeps its batches: on the CUDA device when they fit, else None.

    The device is chosen when the batches reach the model the default way (:func:`default_batch_path`: with a
    transfer hook, the hook must see every batch, so the cache keeps the loader's batches in host memory) and the
    estimated size is at most ``DEVICE_CACHE_SHARE`` of the device memory free at that moment. The cache fills during
    the first clean pass, after a training epoch has reserved what training needs, so half of what is left stays
    free for training to grow. While filling, the batches may take at most that share and ``max_bytes`` (else the
    cache is dropped).

    Args:
        trainer: The Trainer.
        pl_module: The LightningModule.
        estimate: The estimated bytes of the batches as they reach the model, or None if they cannot live on the
            device (see ``BatchCache.device_estimate``).
        max_bytes: The cache's budget (``cache_max_bytes``).

    Returns:
        The placement, or None for host memory.
    """
    device = trainer.strategy.root_device
    if device.type != "cuda" or estimate is None or not default_batch_path(trainer, pl_module):
        return None
    free, _total = torch.cuda.mem_get_info(device)
    budget = min(int(free * DEVICE_CACHE_SHARE), max_bytes)
    if estimate > budget:
        return None
    return DevicePlacement(device, batch_path(trainer, pl_module), budget)


def size_at_fit_start(
    trainer: pl.Trainer,
    cache: BatchCache,
    first: Any,
    converted: Any,
    device_path: bool,
    batches: int,
    where: str,
    warn: Callable[[str, str], None],
) -> BatchCache | None:
    """Estimate a cache's size from the first clean batch before training, and refuse one over its budget.

    Called on every rank (the budget decision is reduced across ranks, see ``distributed``).

    Args:
        trainer: The Trainer.
        cache: The source's cache.
        first: The first clean batch as the loader yields it, or None for an empty loader.
        converted: The same batch after the precision plugin's input conversion (None for an empty loader).
        device_path: Whether batches reach the model the default way, so the cache could live on the device.
        batches: The number of batches a pass reads.
        where: How to name the source in messages (e.g. ``" training loader 'a'"``; ``""`` for a single loader).
        warn: ``(key, message)``: gives a warning once.

    Returns:
        ``cache`` with its estimates set, or None when the batches hold an object the cache cannot copy (warned:
        that source is not cached).

    Raises:
        ValueError: If the estimate exceeds ``cache.max_bytes`` on any rank.
    """
    opaque = uncopyable(first)
    # Decided across ranks: a rank with an empty shard has no batch to look at, and must drop its cache too.
    if any_rank(trainer, opaque is not None):
        warn(
            f"uncopyable:{where}",
            "EvalGuard(cache=True) copies tensors and numpy arrays in dicts, tuples, lists and dataclasses; the clean"
            f" batches hold a {opaque or 'type it cannot copy'}, which it cannot copy or size, so"
            + (where or " the clean data")
            + " is not cached. Return tensors in a dict or tuple from the dataset or collate_fn to cache them.",
        )
        return None
    per_batch = batch_nbytes(first)
    cache.estimate = per_batch * batches
    if device_path:
        cache.device_estimate = batch_nbytes(converted) * batches
    if any_rank(trainer, cache.estimate > cache.max_bytes):  # every rank refuses together, or none does
        mib = 1 << 20
        raise ValueError(
            f"EvalGuard(cache=True) would keep about {cache.estimate / mib:.0f} MiB of clean batches ({batches}"
            f" batches of {per_batch / mib:.1f} MiB), more than cache_max_bytes={cache.max_bytes}"
            f" ({cache.max_bytes / mib:.0f} MiB). Evaluate a subset with `limit_batches=`, raise `cache_max_bytes=`,"
            " or pass cache=False."
        )
    return cache


def release(caches: Iterable[BatchCache | None]) -> None:
    """Free the cached batches (host or device memory) once the fit is over; their sizes stay readable.

    Args:
        caches: The sources' caches (None where a source has none).
    """
    for cache in caches:
        if cache is not None:
            cache.release()
