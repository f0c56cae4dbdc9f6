"""Which dataset indices a clean pass reads, in which batches: samplers, the fixed subset, unpadded shards."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
    WeightedRandomSampler,
)

from lightning_evalguard._lightning import is_unrepeated_sampler, unwrap_distributed_sampler

__all__ = [
    "IndexSampler",
    "MergedLastBatchSampler",
    "fixed_subset",
    "pads_samples",
    "sampled_indices",
    "shard",
]


class MergedLastBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` indices in order; a last batch of a single sample joins the batch before it.

    BatchNorm in train mode cannot normalise a batch of one sample, and the decomposition runs train-mode passes over
    the very batches of the clean pass.
    """

    def __init__(self, indices: Sequence[int], batch_size: int) -> None:
        """Store the indices and the batch size.

        Args:
            indices: The dataset indices, in order.
            batch_size: The batch size.
        """
        self.indices, self.batch_size = list(indices), batch_size

    def _batches(self) -> list[list[int]]:
        batches = [self.indices[i : i + self.batch_size] for i in range(0, len(self.indices), self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) == 1:
            batches[-2].extend(batches.pop())
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        """Iterate over the batches."""
        return iter(self._batches())

    def __len__(self) -> int:
        """The number of batches."""
        return len(self._batches())


class IndexSampler(Sampler[int]):
    """Yield a fixed list of dataset indices, in order, every epoch."""

    def __init__(self, indices: Sequence[int]) -> None:
        """Store the indices.

        Args:
            indices: The dataset indices to yield.
        """
        self.indices = list(indices)

    def __iter__(self) -> Iterator[int]:
        """Iterate over the indices in their stored order."""
        return iter(self.indices)

    def __len__(self) -> int:
        """The number of indices."""
        return len(self.indices)


def fixed_subset(
    universe: int | Sequence[int],
    limit_batches: int | float | None,
    batch_size: int,
    seed: int,
    stored: Sequence[int] | None,
) -> list[int] | None:
    """The fixed random subset of dataset indices that ``limit_batches`` selects, the same at every call.

    It is drawn from a generator seeded with ``seed``, so every rank draws the same subset without communicating
    and a resumed run draws it again; a subset restored from a checkpoint (``stored``) is reused when it still fits.

    Args:
        universe: The dataset indices the training loader reads (an int ``n`` for ``range(n)``).
        limit_batches: A fraction of samples (float), a number of batches (int), or None for all.
        batch_size: The clean-pass batch size, for an int ``limit_batches``.
        seed: The seed of the draw.
        stored: A subset restored from a checkpoint, or None.

    Returns:
        Sorted dataset indices, or None when the whole universe is evaluated.
    """
    candidates = range(universe) if isinstance(universe, int) else universe
    num_samples = len(candidates)
    if limit_batches is None:
        return None
    if isinstance(limit_batches, float):
        size = min(num_samples, math.ceil(limit_batches * num_samples))
    else:
        size = min(num_samples, limit_batches * batch_size)
    if size >= num_samples:
        return None
    allowed = set(candidates)
    if stored is not None and len(stored) == size and all(index in allowed for index in stored):
        return list(stored)
    generator = torch.Generator().manual_seed(seed)
    return sorted(candidates[position] for position in torch.randperm(num_samples, generator=generator)[:size].tolist())


def sampled_indices(train_loader: DataLoader[Any]) -> tuple[list[int] | None, bool]:
    """The dataset indices the training loader's sampler draws from.

    ``SequentialSampler``, ``RandomSampler``, ``WeightedRandomSampler`` and the ``DistributedSampler`` Lightning
    injects read the whole dataset; a sampler with an ``indices`` attribute (``SubsetRandomSampler``) reads those;
    Lightning's ``DistributedSamplerWrapper`` is looked through.

    Args:
        train_loader: The training DataLoader.

    Returns:
        ``(sorted indices or None for the whole dataset, whether the sampler was of a kind not recognised)``.
    """
    sampler: Any = train_loader.sampler
    batch_sampler = train_loader.batch_sampler
    if batch_sampler is not None and not isinstance(batch_sampler, BatchSampler):
        sampler = getattr(batch_sampler, "sampler", None)
    sampler = unwrap_distributed_sampler(sampler)
    indices = getattr(sampler, "indices", None)
    if indices is not None:
        return sorted({int(index) for index in indices}), False
    whole = (SequentialSampler, RandomSampler, WeightedRandomSampler, DistributedSampler)
    return None, not isinstance(sampler, whole)


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's share of ``indices``, without padding: every index goes to exactly one rank.

    The same split as Lightning's ``UnrepeatedDistributedSampler``: rank ``r`` takes ``indices[r::world_size]``.

    Args:
        indices: All indices, in order.
        rank: This process's rank.
        world_size: The number of processes.

    Returns:
        The indices this rank evaluates.
    """
    return list(indices[rank::world_size])


def pads_samples(loader: Any) -> bool:
    """Whether ``loader`` shards with a ``DistributedSampler`` that repeats samples to even out the ranks.

    Args:
        loader: A clean loader supplied by the user.

    Returns:
        True when its sampler is a padding ``DistributedSampler`` and the dataset does not divide evenly.
    """
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return False
    if is_unrepeated_sampler(sampler):
        return False
    return bool(sampler.total_size != len(sampler.dataset))  # type: ignore[arg-type]
