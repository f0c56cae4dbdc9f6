"""Which dataset indices a clean pass reads, in which batches: samplers, the fixed subset, unpadded shards."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
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
    "AutoSubset",
    "IndexSampler",
    "MergedLastBatchSampler",
    "auto_sample_size",
    "fixed_subset",
    "seeded_permutation",
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


def seeded_permutation(candidates: Sequence[int], seed: int) -> list[int]:
    """The candidates in the order of one seeded permutation: ``limit_batches="auto"`` reads a prefix of it.

    The same draw as :func:`fixed_subset`: its subset of size n is the first n of this permutation.

    Args:
        candidates: The dataset indices the training loader reads.
        seed: The seed of the draw.

    Returns:
        The permuted indices.
    """
    generator = torch.Generator().manual_seed(seed)
    return [candidates[position] for position in torch.randperm(len(candidates), generator=generator).tolist()]


def auto_sample_size(population: int, target_stderr: float, p: float | None = None, n: int | None = None) -> int:
    """The subset size whose accuracy has a standard error of at most ``target_stderr``, drawn without replacement.

    se = sqrt(p (1 - p) / n * (N - n) / (N - 1)), so n = n0 / (1 + (n0 - 1) / N) with n0 = p (1 - p) / se^2. The
    first pass assumes p = 0.5, the worst case; later passes use the previous pass's value, moved toward 0.5 as
    Agresti and Coull do, (p n + 2) / (n + 4), so that a pass that got every sample right does not size the next
    one to a handful.

    Args:
        population: N, the samples the subset is drawn from.
        target_stderr: The standard error to reach.
        p: The previous pass's accuracy (the one nearest 0.5 of several), or None before the first pass.
        n: The number of samples that measured it.

    Returns:
        The size, in [min(N, 1), N].
    """
    if population <= 0:
        return 0
    estimate = 0.5 if p is None or n is None else (min(max(p, 0.0), 1.0) * n + 2.0) / (n + 4.0)
    n0 = estimate * (1.0 - estimate) / target_stderr**2
    size = math.ceil(n0 / (1.0 + (n0 - 1.0) / population) - 1e-9)
    return min(max(size, 1), population)


class AutoSubset:
    """The state of a ``limit_batches="auto"`` subset: one permutation, and the pass that sizes the next.

    Attributes:
        permutation: The candidates in a fixed seeded order; every subset is a prefix of it.
        p: The last pass's accuracy (nearest 0.5 of several), None before the first pass.
        n: The number of samples that measured it.
    """

    def __init__(self, permutation: Sequence[int], p: float | None = None, n: int | None = None) -> None:
        """Store the state.

        Args:
            permutation: The candidates in a fixed seeded order.
            p: The last pass's accuracy, or None.
            n: The number of samples that measured it, or None.
        """
        self.permutation = list(permutation)
        self.p, self.n = p, n

    def next_indices(self, target_stderr: float) -> list[int]:
        """The sorted dataset indices of the next pass: the prefix of the size :func:`auto_sample_size` gives.

        A subset shrinks by at most half from one pass to the next (it may grow by any amount). Near an accuracy
        of 1 the sizes would otherwise swing: a large pass that got everything right sizes a handful, whose weak
        estimate sizes a large one again.

        Args:
            target_stderr: The standard error to reach.

        Returns:
            Sorted indices.
        """
        size = auto_sample_size(len(self.permutation), target_stderr, self.p, self.n)
        if self.n:  # shrink by at most half a pass: a small subset's estimate would size the next one large again
            size = min(max(size, math.ceil(self.n / 2)), len(self.permutation))
        return sorted(self.permutation[:size])

    def state_dict(self) -> dict[str, Any]:
        """The permutation (an integer tensor) and the last pass's ``p`` and ``n``: plain types for a checkpoint.

        Returns:
            The state.
        """
        small = not self.permutation or max(self.permutation) < 2**31  # int32 halves it (5 MB for 1.28M samples)
        dtype = torch.int32 if small else torch.long
        return {"permutation": torch.tensor(self.permutation, dtype=dtype), "p": self.p, "n": self.n}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> AutoSubset:
        """Rebuild what :meth:`state_dict` saved.

        Args:
            state: The state.

        Returns:
            The subset state.
        """
        permutation = state["permutation"]
        indices = permutation.tolist() if isinstance(permutation, torch.Tensor) else list(permutation)
        p, n = state.get("p"), state.get("n")
        return cls(indices, None if p is None else float(p), None if n is None else int(n))


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
