"""Where clean batches come from: the precedence of the mechanisms, the rebuilt loader, the fixed subset, sharding.

Precedence: ``dataloader=`` on the callback, then a ``clean_train_dataloader()`` method on the LightningDataModule
or else on the LightningModule, then a loader rebuilt over each training dataset (sequential, ``drop_last=False``,
the training loader's ``collate_fn``, workers and pinning), with ``eval_transform`` swapped in.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Union

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    WeightedRandomSampler,
)

from lightning_evalguard._lightning import unwrap_distributed_sampler, user_overrides
from lightning_evalguard.isolation import find_attribute_holders

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "BatchCache",
    "DevicePlacement",
    "CleanSource",
    "SourceOptions",
    "build_sources",
    "batch_nbytes",
    "uncopyable",
    "IndexSampler",
    "MergedLastBatchSampler",
    "fixed_subset",
    "sampled_indices",
    "named_loaders",
    "pads_samples",
    "rebuild_loader",
    "resolve_batch_size",
    "shard",
    "user_clean_loader",
]

LoaderArg = Union["DataLoader[Any]", Callable[["pl.Trainer"], "DataLoader[Any]"], None]

HOOK_NAME = "clean_train_dataloader"


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
    ``to`` method (which Lightning's transfer would move, e.g. a ``BatchEncoding``) could be changed in place by a
    hook or a forward without the cache knowing, and holds memory the cache cannot count.

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


@dataclass
class CleanSource:
    """One stream of clean batches and how to read it.

    Attributes:
        name: The training loader's name when the Trainer has several (dict key or list index), else None.
        loader: The iterable of batches.
        mechanism: ``"dataloader"``, ``"hook"`` or ``"rebuilt"``.
        max_batches: Stop after this many batches (None: read the loader to its end).
        transform_holders: Datasets whose transform attribute is swapped for the pass (rebuilt loaders only).
        generator: The loader's own generator, re-seeded before each pass (rebuilt loaders only).
        num_samples: Samples this process evaluates, when known.
        total_samples: Samples all processes evaluate together, when known.
        sampled: Whether ``limit_batches`` drew a random subset (smaller than the dataset).
        cache: The batch cache (``cache=True``, rebuilt loaders only).
    """

    name: str | None
    loader: Iterable[Any]
    mechanism: str
    max_batches: int | None = None
    transform_holders: list[Any] = field(default_factory=list)
    generator: torch.Generator | None = None
    num_samples: int | None = None
    total_samples: int | None = None
    sampled: bool = False
    cache: BatchCache | None = None


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


def named_loaders(train_dataloader: Any) -> list[tuple[str | None, Any]]:
    """Split what ``trainer.train_dataloader`` returned into named loaders.

    Args:
        train_dataloader: One loader, or a dict or list of loaders as given to ``Trainer.fit``.

    Returns:
        ``[(None, loader)]`` for one loader; ``[(key, loader), ...]`` for a dict; ``[("0", loader), ...]`` for a list.
    """
    if isinstance(train_dataloader, Mapping):
        return [(str(key), loader) for key, loader in train_dataloader.items()]
    if isinstance(train_dataloader, (list, tuple)):
        return [(str(index), loader) for index, loader in enumerate(train_dataloader)]
    return [(None, train_dataloader)]


def user_clean_loader(
    trainer: pl.Trainer, pl_module: pl.LightningModule, dataloader: LoaderArg
) -> tuple[str, Iterable[Any]] | None:
    """The clean loader the user supplied, by precedence: ``dataloader=``, then the ``clean_train_dataloader`` hook.

    Args:
        trainer: The Trainer.
        pl_module: The LightningModule.
        dataloader: The callback's ``dataloader`` argument.

    Returns:
        ``(mechanism, loader)``, or None when the user supplied none.

    Raises:
        TypeError: If the callable or the hook returned something that is not iterable.
    """
    if dataloader is not None:
        if isinstance(dataloader, DataLoader):
            return "dataloader", dataloader
        loader = dataloader(trainer)
        _check_iterable(loader, "the `dataloader` callable passed to EvalGuard")
        return "dataloader", loader
    for owner in (getattr(trainer, "datamodule", None), pl_module):
        hook = getattr(owner, HOOK_NAME, None) if owner is not None else None
        if callable(hook):
            loader = hook()
            _check_iterable(loader, f"{type(owner).__name__}.{HOOK_NAME}()")
            return "hook", loader
    return None


def _check_iterable(loader: Any, where: str) -> None:
    if not isinstance(loader, Iterable):
        raise TypeError(f"{where} must return a DataLoader or another iterable of batches (got {loader!r}).")


def resolve_batch_size(train_loader: Any, batch_size: int | None) -> int:
    """The clean-pass batch size: ``batch_size`` if given, else the training loader's.

    Args:
        train_loader: The training DataLoader.
        batch_size: The callback's ``batch_size`` argument.

    Returns:
        The batch size.

    Raises:
        ValueError: If the training loader has no readable batch size and none was given.
    """
    if batch_size is not None:
        return batch_size
    found = getattr(train_loader, "batch_size", None)
    if found is None:
        found = getattr(getattr(train_loader, "batch_sampler", None), "batch_size", None)
    if not isinstance(found, int) or found < 1:
        raise ValueError(
            "EvalGuard cannot read a batch size from the training DataLoader (it uses a custom batch_sampler)."
            " Pass `batch_size=` to EvalGuard."
        )
    return found


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


def rebuild_loader(
    train_loader: DataLoader[Any],
    indices: Sequence[int] | None,
    batch_size: int,
    generator: torch.Generator,
    merge_single_last: bool = False,
    persistent_workers: bool = False,
) -> DataLoader[Any]:
    """A sequential loader over the training loader's dataset, keeping how it loads (collate, workers, pinning).

    Args:
        train_loader: The training DataLoader.
        indices: The dataset indices to read in order, or None for an ``IterableDataset``.
        batch_size: The clean-pass batch size.
        generator: The loader's own generator, so creating its iterator draws nothing from the global RNG.
        merge_single_last: Join a last batch of one sample to the batch before it (for train-mode passes).
        persistent_workers: Keep the worker processes alive between passes (when the training loader does). They
            keep the dataset as it was when they started, with the eval transform set: only for clean passes.

    Returns:
        The clean DataLoader (``drop_last=False``, no shuffling).
    """
    kwargs: dict[str, Any] = {
        "collate_fn": train_loader.collate_fn,
        "num_workers": train_loader.num_workers,
        "pin_memory": train_loader.pin_memory,
        "worker_init_fn": train_loader.worker_init_fn,
        "generator": generator,
        "timeout": train_loader.timeout,
    }
    if train_loader.num_workers > 0:
        kwargs["multiprocessing_context"] = train_loader.multiprocessing_context
        kwargs["prefetch_factor"] = train_loader.prefetch_factor
        kwargs["persistent_workers"] = persistent_workers
    if train_loader.pin_memory:
        kwargs["pin_memory_device"] = train_loader.pin_memory_device
    if indices is not None and merge_single_last:
        kwargs["batch_sampler"] = MergedLastBatchSampler(indices, batch_size)
    else:
        kwargs.update(batch_size=batch_size, shuffle=False, drop_last=False)
        if indices is not None:
            kwargs["sampler"] = IndexSampler(indices)
    return DataLoader(train_loader.dataset, **kwargs)


def is_iterable_dataset(loader: Any) -> bool:
    """Whether ``loader`` is a DataLoader over an ``IterableDataset`` (no length, no indices).

    Args:
        loader: A training loader.

    Returns:
        True for a DataLoader whose dataset is an ``IterableDataset``.
    """
    return isinstance(loader, DataLoader) and isinstance(loader.dataset, IterableDataset)


def transform_holders(train_loader: DataLoader[Any], attr: str) -> list[Any]:
    """The datasets under ``train_loader`` that hold the transform attribute ``attr``.

    Args:
        train_loader: The training DataLoader.
        attr: The transform attribute, e.g. ``"transform"``.

    Returns:
        The holders, looked for through ``Subset`` and ``ConcatDataset``.
    """
    return find_attribute_holders(train_loader.dataset, attr)


def validation_transform(
    trainer: pl.Trainer, pl_module: pl.LightningModule, attr: str, training_holders: Sequence[Any] = ()
) -> Any:
    """The transform of the validation dataset, for ``eval_transform="val"``.

    The validation loaders the Trainer has loaded come first; before validation has run they are asked from the
    datamodule's or the module's ``val_dataloader()``.

    Args:
        trainer: The Trainer.
        pl_module: The LightningModule.
        attr: The transform attribute.
        training_holders: The training datasets whose transform is swapped.

    Returns:
        The first validation dataset's value of ``attr``.

    Raises:
        ValueError: If there is no validation loader, its dataset holds no ``attr``, or it is the very dataset object
            the training set reads (both ``Subset`` of one dataset), whose transform is the training one.
    """
    loaders = trainer.val_dataloaders
    if loaders is None:
        for owner in (getattr(trainer, "datamodule", None), pl_module):
            # `val_dataloader` exists on every LightningModule/LightningDataModule and raises unless overridden.
            if owner is not None and user_overrides(owner, "val_dataloader"):
                loaders = owner.val_dataloader()
                break
    if loaders is None:
        raise ValueError(
            "EvalGuard(eval_transform='val') takes the transform from the validation dataset, but this fit has no"
            " validation dataloader. Pass the clean transform itself: eval_transform=<callable>."
        )
    for _, loader in named_loaders(loaders):
        holders = find_attribute_holders(getattr(loader, "dataset", None), attr)
        if holders:
            if any(holders[0] is holder for holder in training_holders):
                raise ValueError(
                    f"EvalGuard(eval_transform='val'): the validation and training sets read the same"
                    f" {type(holders[0]).__name__} object (e.g. two Subsets of one dataset), so its {attr!r} is the"
                    " training transform. Pass the clean transform itself: eval_transform=<callable>."
                )
            return getattr(holders[0], attr)
    raise ValueError(
        f"EvalGuard(eval_transform='val') found no attribute {attr!r} on the validation dataset (looked through"
        " Subset and ConcatDataset). Pass the clean transform itself (eval_transform=<callable>) or set"
        " transform_attr= to the attribute your dataset uses."
    )


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
    if type(sampler).__name__.startswith("Unrepeated"):
        return False
    return bool(sampler.total_size != len(sampler.dataset))  # type: ignore[arg-type]



@dataclass(frozen=True)
class SourceOptions:
    """The callback's arguments that decide where clean batches come from (see ``EvalGuard``)."""

    dataloader: LoaderArg
    eval_transform: Any
    transform_attr: str
    limit_batches: int | float | None
    batch_size: int | None
    seed: int
    decompose: bool
    cache_max_bytes: int | None  # None: no cache


def build_sources(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    options: SourceOptions,
    subsets: MutableMapping[str, list[int]],
    warn: Callable[[str, str], None],
) -> list[CleanSource]:
    """The clean sources, by precedence: ``dataloader=``, the ``clean_train_dataloader`` hook, rebuilt loaders.

    Args:
        trainer: The Trainer, with its training loaders loaded.
        pl_module: The LightningModule.
        options: The callback's arguments.
        subsets: Fixed subsets by loader name (``""`` for a single loader): read, and updated with new draws.
        warn: ``(key, message)``: gives a warning once.

    Returns:
        One source for a user loader; one per training loader otherwise.

    Raises:
        TypeError: If a training loader to rebuild is not a DataLoader, or a user loader is not iterable.
        ValueError: If the clean data cannot be built from these arguments (the message says what to pass).
    """
    user = user_clean_loader(trainer, pl_module, options.dataloader)
    if user is None:
        loaders = named_loaders(trainer.train_dataloader)
        return [_rebuilt_source(trainer, name, loader, options, subsets, warn) for name, loader in loaders]
    mechanism, loader = user
    where = "`dataloader=`" if mechanism == "dataloader" else "`clean_train_dataloader()`"
    if trainer.world_size > 1 and pads_samples(loader):
        warn(
            "padding-sampler",
            f"EvalGuard's clean loader from {where} uses a DistributedSampler that pads the ranks with repeated"
            " samples, which biases the clean metric. Shard it without padding:"
            " sampler=UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size,"
            " rank=trainer.global_rank, shuffle=False) (from lightning.pytorch.overrides.distributed).",
        )
    limit = options.limit_batches
    if isinstance(limit, float):
        try:
            length = len(loader)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(
                f"EvalGuard(limit_batches={limit}) is a fraction, but the loader from {where} has no length. Pass"
                " an int `limit_batches` (a number of batches) instead."
            ) from None
        return [CleanSource(None, loader, mechanism, max_batches=max(1, math.ceil(limit * length)))]
    return [CleanSource(None, loader, mechanism, max_batches=limit)]


def _rebuilt_source(
    trainer: pl.Trainer,
    name: str | None,
    train_loader: Any,
    options: SourceOptions,
    subsets: MutableMapping[str, list[int]],
    warn: Callable[[str, str], None],
) -> CleanSource:
    where = f"training loader {name!r}" if name is not None else "the training loader"
    if not isinstance(train_loader, DataLoader):
        raise TypeError(
            f"EvalGuard rebuilds {where} to switch augmentation off, but it is a {type(train_loader).__name__},"
            " not a torch DataLoader. Pass `dataloader=` to EvalGuard or define `clean_train_dataloader()` on"
            " your LightningDataModule or LightningModule."
        )
    batch_size = resolve_batch_size(train_loader, options.batch_size)
    holders: list[Any] = []
    if options.eval_transform is not None:
        holders = transform_holders(train_loader, options.transform_attr)
        if not holders:
            raise ValueError(
                f"EvalGuard(eval_transform=...) sets the dataset attribute {options.transform_attr!r}, but the"
                f" dataset of {where} ({type(train_loader.dataset).__name__}) has none, also through Subset and"
                " ConcatDataset. Set `transform_attr=` to the attribute your dataset uses, or pass"
                " `dataloader=` to EvalGuard."
            )
    generator = torch.Generator()
    cache = BatchCache(options.cache_max_bytes) if options.cache_max_bytes is not None else None
    if is_iterable_dataset(train_loader):
        if not isinstance(options.limit_batches, int):
            raise ValueError(
                f"The dataset of {where} is an IterableDataset: EvalGuard cannot index it or know its length."
                " Pass `dataloader=` to EvalGuard, define `clean_train_dataloader()` on your LightningDataModule"
                " or LightningModule, or pass an int `limit_batches=` (a number of batches to evaluate)."
            )
        if trainer.world_size > 1:
            warn(
                f"iterable-ddp:{name}",
                f"The dataset of {where} is an IterableDataset: under DDP every rank evaluates the first"
                f" {options.limit_batches} batches of its own stream, and they are the same samples on every rank"
                " unless the dataset shards itself by rank (torch.utils.data.get_worker_info and the rank). Counts"
                " then multiply by the number of ranks; pass `dataloader=` with a sharded loader to avoid it.",
            )
        loader = rebuild_loader(train_loader, None, batch_size, generator)
        return CleanSource(name, loader, "rebuilt", options.limit_batches, holders, generator, cache=cache)
    num_samples = len(train_loader.dataset)  # type: ignore[arg-type]
    if num_samples == 0:
        warn(f"empty:{name}", f"The dataset of {where} is empty: EvalGuard logs nothing for it.")
    universe, unknown = sampled_indices(train_loader)
    if unknown:
        warn(
            f"sampler:{name}",
            f"The sampler of {where} is a {type(train_loader.sampler).__name__}, which EvalGuard does not know: the"
            " clean pass evaluates every sample of its dataset. If the sampler reads only part of it, pass"
            " `dataloader=` with a clean loader over that part.",
        )
    key = name or ""
    candidates = universe if universe is not None else range(num_samples)
    subset = fixed_subset(candidates, options.limit_batches, batch_size, options.seed, subsets.get(key))
    if subset is None:
        subsets.pop(key, None)
    else:
        subsets[key] = subset
    indices = subset if subset is not None else candidates
    sampler_kwargs = trainer.distributed_sampler_kwargs or {}
    local = shard(indices, int(sampler_kwargs.get("rank", 0)), int(sampler_kwargs.get("num_replicas", 1)))
    # Persistent workers would keep the eval transform for pass C too: only without decomposition.
    persistent = bool(train_loader.persistent_workers) and not options.decompose
    loader = rebuild_loader(
        train_loader, local, batch_size, generator, merge_single_last=options.decompose, persistent_workers=persistent
    )
    return CleanSource(
        name,
        loader,
        "rebuilt",
        None,
        holders,
        generator,
        num_samples=len(local),
        total_samples=len(indices),
        sampled=subset is not None,
        cache=cache,
    )
