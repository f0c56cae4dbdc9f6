"""Where clean batches come from: the precedence of the mechanisms, the rebuilt loader, the fixed subset, sharding.

Precedence: ``dataloader=`` on the callback, then a ``clean_train_dataloader()`` method on the LightningDataModule
or else on the LightningModule, then a loader rebuilt over each training dataset (sequential, ``drop_last=False``,
the training loader's ``collate_fn``, workers and pinning), with ``eval_transform`` swapped in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_evalguard._lightning import fit_validation_loaders, user_overrides
from lightning_evalguard.cache import BatchCache, release
from lightning_evalguard.isolation import find_attribute_holders
from lightning_evalguard.metrics import join_key
from lightning_evalguard.sampling import (
    AutoSubset,
    IndexSampler,
    MergedLastBatchSampler,
    fixed_subset,
    pads_samples,
    sampled_indices,
    seeded_permutation,
    shard,
)

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "HOOK_NAME",
    "CleanData",
    "CleanSource",
    "FormatTransformView",
    "LoaderArg",
    "SourceOptions",
    "build_sources",
    "fetch_in_main_process",
    "first_indices",
    "format_transform",
    "is_hf_dataset",
    "is_iterable_dataset",
    "named_loaders",
    "rebuild_loader",
    "resolve_batch_size",
    "transform_holders",
    "user_clean_loader",
    "validation_transform",
]

LoaderArg = Union["DataLoader[Any]", Callable[["pl.Trainer"], "DataLoader[Any]"], None]

#: The method of a LightningDataModule or LightningModule that supplies a clean loader.
HOOK_NAME = "clean_train_dataloader"

Warn = Callable[[str, str], None]


@dataclass
class CleanSource:
    """One stream of clean batches and how to read it.

    Attributes:
        name: The training loader's name when the Trainer has several (dict key or list index), else None.
        loader: The iterable of batches.
        mechanism: ``"dataloader"``, ``"hook"`` or ``"rebuilt"``.
        max_batches: Stop after this many batches (None: read the loader to its end).
        transform_holders: Datasets whose transform attribute is swapped for the pass (rebuilt loaders only).
        transform_attr: The attribute swapped on them (``transform`` on a :class:`FormatTransformView`).
        generator: The loader's own generator, re-seeded before each pass (rebuilt loaders only).
        num_samples: Samples this process evaluates, when known.
        total_samples: Samples all processes evaluate together, when known.
        sampled: Whether ``limit_batches`` drew a random subset (smaller than the dataset).
        population: The samples that subset was drawn from (the training sampler's), when known.
        cache: The batch cache (``cache=True``, rebuilt loaders only).
        order: The dataset indices this process reads, in the order of its batches (rebuilt map-style loaders).
    """

    name: str | None
    loader: Iterable[Any]
    mechanism: str
    max_batches: int | None = None
    transform_holders: list[Any] = field(default_factory=list)
    transform_attr: str = "transform"
    generator: torch.Generator | None = None
    num_samples: int | None = None
    total_samples: int | None = None
    sampled: bool = False
    population: int | None = None
    cache: BatchCache | None = None
    order: list[int] | None = None

    @property
    def num_batches(self) -> int | None:
        """The number of batches a pass over this source reads, when known."""
        try:
            length = len(self.loader)  # type: ignore[arg-type]
        except TypeError:
            return self.max_batches
        return length if self.max_batches is None else min(length, self.max_batches)

    @property
    def where(self) -> str:
        """How messages name this source: ``" training loader 'a'"`` with several loaders, else ``""``."""
        return f" training loader {self.name!r}" if self.name else ""


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
        if getattr(train_loader, "batch_sampler", None) is None:
            raise ValueError(
                "EvalGuard cannot read a batch size from the training DataLoader: it has batch_size=None (automatic"
                " batching off), so each item of its dataset is already a batch, or a single sample. If the items"
                " are single samples, pass `batch_size=` to EvalGuard; if they are batches, pass `dataloader=` with a"
                " clean loader (or define `clean_train_dataloader()`)."
            )
        raise ValueError(
            "EvalGuard cannot read a batch size from the training DataLoader (it uses a custom batch_sampler)."
            " Pass `batch_size=` to EvalGuard."
        )
    return found


def _batching_collate(train_loader: DataLoader[Any]) -> Any:
    # The training loader's collate_fn; for a loader without automatic batching (batch_size=None) whose collate_fn is
    # torch's default_convert, torch's default_collate, which batches the single samples the clean loader groups.
    from torch.utils.data import default_collate, default_convert

    unbatched = train_loader.batch_size is None and train_loader.batch_sampler is None
    if unbatched and train_loader.collate_fn is default_convert:
        return default_collate
    if unbatched:
        raise ValueError(
            "EvalGuard groups the samples of a training DataLoader with batch_size=None into batches of `batch_size`,"
            f" but its collate_fn ({getattr(train_loader.collate_fn, '__name__', train_loader.collate_fn)!r}) was"
            " written for one sample at a time. Pass `dataloader=` with a clean loader (or define"
            " `clean_train_dataloader()`)."
        )
    return train_loader.collate_fn


def rebuild_loader(
    train_loader: DataLoader[Any],
    indices: Sequence[int] | None,
    batch_size: int,
    generator: torch.Generator,
    merge_single_last: bool = False,
    persistent_workers: bool = False,
    dataset: Any = None,
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
        dataset: The dataset to read instead of the training loader's (a :class:`FormatTransformView` of it).

    Returns:
        The clean DataLoader (``drop_last=False``, no shuffling).
    """
    kwargs: dict[str, Any] = {
        "collate_fn": _batching_collate(train_loader),
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
    return DataLoader(train_loader.dataset if dataset is None else dataset, **kwargs)


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

    Found the way Lightning will find them: the loaders the Trainer has loaded; before validation has run, those
    passed to ``fit(val_dataloaders=...)``, else the datamodule's or the module's ``val_dataloader()``.

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
        loaders = fit_validation_loaders(trainer)
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
        dataset = getattr(loader, "dataset", None)
        holders = find_attribute_holders(dataset, attr)
        if not holders and is_hf_dataset(dataset):
            if any(getattr(holder, "dataset", None) is dataset for holder in training_holders):
                raise ValueError(
                    "EvalGuard(eval_transform='val'): the validation and training sets are the same Hugging Face"
                    " dataset object, so its format transform is the training one. Pass the clean transform itself:"
                    " eval_transform=<callable>."
                )
            transform = format_transform(dataset)
            if transform is None:
                raise ValueError(
                    "EvalGuard(eval_transform='val'): the validation dataset is a Hugging Face datasets.Dataset without"
                    " a format transform (set_transform / with_transform), so there is none to take. Pass the clean"
                    " transform itself: eval_transform=<callable>."
                )
            return transform
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


@dataclass(frozen=True)
class SourceOptions:
    """The callback's arguments that decide where clean batches come from (see ``EvalGuard``)."""

    dataloader: LoaderArg
    eval_transform: Any
    transform_attr: str
    limit_batches: int | float | str | None
    batch_size: int | None
    seed: int
    decompose: bool
    cache_max_bytes: int | None  # None: no cache
    target_stderr: float = 0.005  # with limit_batches="auto"


def build_sources(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    options: SourceOptions,
    subsets: MutableMapping[str, list[int]],
    warn: Warn,
    autos: MutableMapping[str, AutoSubset] | None = None,
) -> list[CleanSource]:
    """The clean sources, by precedence: ``dataloader=``, the ``clean_train_dataloader`` hook, rebuilt loaders.

    Args:
        trainer: The Trainer, with its training loaders loaded.
        pl_module: The LightningModule.
        options: The callback's arguments.
        subsets: Fixed subsets by loader name (``""`` for a single loader): read, and updated with new draws.
        warn: ``(key, message)``: gives a warning once.
        autos: The ``limit_batches="auto"`` states by loader name: read, and updated with new permutations.

    Returns:
        One source for a user loader; one per training loader otherwise.

    Raises:
        TypeError: If a training loader to rebuild is not a DataLoader, or a user loader is not iterable.
        ValueError: If the clean data cannot be built from these arguments (the message says what to pass).
    """
    user = user_clean_loader(trainer, pl_module, options.dataloader)
    autos = {} if autos is None else autos
    if user is None:
        loaders = named_loaders(trainer.train_dataloader)
        return [_rebuilt_source(trainer, name, loader, options, subsets, warn, autos) for name, loader in loaders]
    mechanism, loader = user
    where = "`dataloader=`" if mechanism == "dataloader" else "`clean_train_dataloader()`"
    if options.limit_batches == "auto":
        raise ValueError(
            f"EvalGuard(limit_batches='auto') draws subsets of the training set's dataset indices, but the clean data"
            f" comes from {where}, whose samples it cannot index. Pass a fixed `limit_batches` (a fraction or a"
            " number of batches), or let EvalGuard rebuild the training loader (eval_transform=...)."
        )
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
    assert not isinstance(limit, str)  # "auto" was refused above
    return [CleanSource(None, loader, mechanism, max_batches=limit)]


def _rebuilt_source(
    trainer: pl.Trainer,
    name: str | None,
    train_loader: Any,
    options: SourceOptions,
    subsets: MutableMapping[str, list[int]],
    warn: Warn,
    autos: MutableMapping[str, AutoSubset],
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
    dataset, attr = train_loader.dataset, options.transform_attr
    if options.eval_transform is not None:
        holders = transform_holders(train_loader, attr)
        if not holders and is_hf_dataset(dataset):
            dataset = FormatTransformView(dataset)
            holders, attr = [dataset], "transform"
        if not holders:
            raise ValueError(
                f"EvalGuard(eval_transform=...) switches augmentation off by setting the dataset attribute {attr!r},"
                f" but the dataset of {where} ({type(train_loader.dataset).__name__}) has none, also through Subset"
                " and ConcatDataset, and it is not a Hugging Face datasets.Dataset (whose format transform EvalGuard"
                " replaces with with_transform). Set `transform_attr=` to the attribute that holds your transform,"
                " or give the clean data yourself: `dataloader=` to EvalGuard, or `clean_train_dataloader()` on your"
                " LightningDataModule or LightningModule."
            )
    generator = torch.Generator()
    cache = BatchCache(options.cache_max_bytes) if options.cache_max_bytes is not None else None
    if is_iterable_dataset(train_loader):
        if not isinstance(options.limit_batches, int):
            raise ValueError(
                f"The dataset of {where} is an IterableDataset: EvalGuard cannot index it or know its length"
                f" (limit_batches={options.limit_batches!r}). Pass `dataloader=` to EvalGuard, define"
                " `clean_train_dataloader()` on your LightningDataModule or LightningModule, or pass an int"
                " `limit_batches=` (a number of batches to evaluate)."
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
        return CleanSource(name, loader, "rebuilt", options.limit_batches, holders, attr, generator, cache=cache)
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
    if options.limit_batches == "auto":
        auto = autos.get(key)
        if auto is None or sorted(auto.permutation) != list(candidates):  # a new fit, or the data changed
            auto = autos[key] = AutoSubset(seeded_permutation(candidates, options.seed))
        subset: list[int] | None = auto.next_indices(options.target_stderr)
        if subset is not None and len(subset) >= len(candidates):
            subset = None
    else:
        limit = options.limit_batches if not isinstance(options.limit_batches, str) else None
        subset = fixed_subset(candidates, limit, batch_size, options.seed, subsets.get(key))
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
        train_loader,
        local,
        batch_size,
        generator,
        merge_single_last=options.decompose,
        persistent_workers=persistent,
        dataset=dataset,
    )
    return CleanSource(
        name,
        loader,
        "rebuilt",
        None,
        holders,
        attr,
        generator,
        num_samples=len(local),
        total_samples=len(indices),
        sampled=subset is not None,
        population=len(candidates),
        cache=cache,
        order=local,
    )


def resize_source(trainer: pl.Trainer, source: CleanSource, indices: Sequence[int], population: int) -> None:
    """Make a rebuilt source read ``indices`` from its next pass on (``limit_batches="auto"``).

    The loader is kept (and so are its persistent workers): its sampler's indices are replaced, and this rank reads
    its unpadded shard of them.

    Args:
        trainer: The Trainer (its rank and world size shard the indices).
        source: A rebuilt source over a map-style dataset.
        indices: The dataset indices of the subset, sorted.
        population: The number of samples they are drawn from.
    """
    sampler_kwargs = trainer.distributed_sampler_kwargs or {}
    local = shard(indices, int(sampler_kwargs.get("rank", 0)), int(sampler_kwargs.get("num_replicas", 1)))
    loader: Any = source.loader
    batch_sampler = getattr(loader, "batch_sampler", None)
    holder = batch_sampler if isinstance(batch_sampler, MergedLastBatchSampler) else getattr(loader, "sampler", None)
    if not isinstance(holder, (MergedLastBatchSampler, IndexSampler)):
        raise TypeError(f"EvalGuard cannot resize a clean loader whose sampler is a {type(holder).__name__}.")
    holder.indices = list(local)
    source.order = list(local)
    source.num_samples, source.total_samples = len(local), len(indices)
    source.sampled, source.population = len(indices) < population, population


def is_hf_dataset(dataset: Any) -> bool:
    """Whether ``dataset`` is a map-style Hugging Face ``datasets.Dataset`` (checked without importing ``datasets``).

    Args:
        dataset: A training or validation dataset.

    Returns:
        True for a ``datasets.Dataset`` (or a subclass): it has ``with_transform`` and a ``format``.
    """
    module = type(dataset).__module__ or ""
    return (
        module.split(".")[0] == "datasets"
        and callable(getattr(dataset, "with_transform", None))
        and isinstance(getattr(dataset, "format", None), dict)
        and not isinstance(dataset, IterableDataset)
    )


def format_transform(dataset: Any) -> Any:
    """The format transform of a Hugging Face dataset (``set_transform``/``with_transform``), or None.

    Args:
        dataset: A ``datasets.Dataset``.

    Returns:
        The transform, or None when its format has none.
    """
    return dataset.format.get("format_kwargs", {}).get("transform")


class FormatTransformView(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """A Hugging Face ``datasets.Dataset`` read through a format transform that EvalGuard can swap.

    Setting ``transform`` makes the view read ``dataset.with_transform(value)`` (a new object, with the same columns);
    setting it back to the dataset's own transform reads the dataset itself. The training dataset is never changed.

    Attributes:
        dataset: The training dataset.
    """

    def __init__(self, dataset: Any) -> None:
        """Wrap the dataset; the view reads it with its own format until ``transform`` is set.

        Args:
            dataset: A ``datasets.Dataset``.
        """
        self.dataset = dataset
        self._own = format_transform(dataset)
        self._reading = dataset
        self._transform = self._own

    @property
    def transform(self) -> Any:
        """The format transform the view reads with."""
        return self._transform

    @transform.setter
    def transform(self, value: Any) -> None:
        self._transform = value
        if value is self._own:
            self._reading = self.dataset
        else:
            columns = self.dataset.format.get("columns")
            all_columns = bool(self.dataset.format.get("output_all_columns", False))
            self._reading = self.dataset.with_transform(value, columns=columns, output_all_columns=all_columns)

    def __len__(self) -> int:
        """The number of samples."""
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        """One sample, through the current transform."""
        return self._reading[index]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        """Several samples at once, as ``datasets.Dataset`` gives them to a DataLoader."""
        getitems = getattr(self._reading, "__getitems__", None)
        return list(getitems(indices)) if callable(getitems) else [self._reading[index] for index in indices]


class CleanData:
    """The clean sources of one fit, built once (again when Lightning reloads the training loaders).

    Attributes:
        options: The callback's arguments that decide where clean batches come from.
        subsets: The fixed ``limit_batches`` subsets by loader name (``""`` for a single loader), kept across fits
            and in checkpoints so a resumed run evaluates the same samples.
        autos: With ``limit_batches="auto"``, each loader's permutation and the pass that sizes the next subset,
            kept across fits and in checkpoints.
        sources: The sources built for the current fit, or None before they are built.
    """

    def __init__(self, options: SourceOptions, warn: Warn) -> None:
        """Store the arguments.

        Args:
            options: The callback's arguments that decide where clean batches come from.
            warn: ``(key, message)``: gives a warning once.
        """
        self.options = options
        self.subsets: dict[str, list[int]] = {}
        self.autos: dict[str, AutoSubset] = {}
        self.sources: list[CleanSource] | None = None
        self._warn = warn
        self._built_for: Any = None

    def forget(self) -> None:
        """Drop the sources (a new fit starts); the subsets stay."""
        self.sources, self._built_for = None, None

    def get(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[CleanSource]:
        """The clean sources for the Trainer's current training loaders (see :func:`build_sources`).

        Args:
            trainer: The Trainer, with its training loaders loaded.
            pl_module: The LightningModule.

        Returns:
            The sources.

        Raises:
            TypeError: As :func:`build_sources`.
            ValueError: As :func:`build_sources`.
        """
        train_loaders = trainer.train_dataloader
        if self.sources is None or self._built_for is not train_loaders:
            self.sources = build_sources(trainer, pl_module, self.options, self.subsets, self._warn, self.autos)
            self._built_for = train_loaders
        return self.sources

    def size_subsets(self, trainer: pl.Trainer) -> None:
        """With ``limit_batches="auto"``, give each source the subset sized from the last pass (before a pass).

        Args:
            trainer: The Trainer.
        """
        if self.options.limit_batches != "auto":
            return
        for source in self.sources or []:
            auto = self.autos.get(source.name or "")
            if auto is not None and source.mechanism == "rebuilt" and source.order is not None:
                indices = auto.next_indices(self.options.target_stderr)
                resize_source(trainer, source, indices, len(auto.permutation))

    def record_pass(self, clean: Mapping[str, float], accuracies: Sequence[str]) -> None:
        """With ``limit_batches="auto"``, keep each source's accuracy (the one nearest 0.5) and ``n`` for the next.

        Args:
            clean: The pass's clean values by logged name.
            accuracies: The names of the micro-averaged accuracies.
        """
        for source in self.sources or []:
            auto = self.autos.get(source.name or "")
            keys = [join_key(source.name, name) for name in accuracies]
            values = [clean[key] for key in keys if key in clean and not math.isnan(clean[key])]
            if auto is not None and values and source.total_samples:
                auto.p = max(values, key=lambda value: value * (1.0 - value))
                auto.n = source.total_samples

    def eval_transform(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """The transform the passes set on the training datasets: ``eval_transform``, or the validation one for "val".

        Args:
            trainer: The Trainer.
            pl_module: The LightningModule.

        Returns:
            The value set on the ``transform_attr`` of the sources' transform holders.

        Raises:
            ValueError: As :func:`validation_transform`.
        """
        sources = self.sources or []
        value = self.options.eval_transform
        if value != "val" or not any(source.transform_holders for source in sources):
            return value
        training = [holder for source in sources for holder in source.transform_holders]
        return validation_transform(trainer, pl_module, self.options.transform_attr, training_holders=training)

    def release_caches(self) -> None:
        """Free the sources' cached batches (at the end of fit); their sizes stay readable."""
        release(source.cache for source in self.sources or [])


def first_indices(loader: Iterable[Any]) -> Any:
    """The dataset indices of the loader's first batch, as its sampler gives them (drawing what the sampler draws).

    Args:
        loader: A clean loader.

    Returns:
        A list of indices (an index when the loader does not batch), or None for a loader that is not a DataLoader,
        reads an ``IterableDataset`` or is empty.
    """
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    sampler: Iterable[Any] = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    return next(iter(sampler), None)


def fetch_in_main_process(loader: Iterable[Any], indices: Any) -> Any:
    """The batch a loader yields for ``indices``, produced in this process (its workers, if any, are not started).

    What the dataset and ``collate_fn`` draw while producing it then comes from this process's RNGs, where the
    guards see it. A DataLoader's own seed draw for its workers uses a private generator.

    Args:
        loader: A clean loader.
        indices: What :func:`first_indices` returned.

    Returns:
        The batch, or None when there is none.
    """
    if not isinstance(loader, DataLoader):
        return next(iter(loader), None)
    generator = torch.Generator()
    if indices is not None:
        if loader.batch_sampler is not None:
            single: DataLoader[Any] = DataLoader(
                loader.dataset, batch_sampler=[indices], collate_fn=loader.collate_fn, generator=generator
            )
        else:
            single = DataLoader(
                loader.dataset, sampler=[indices], batch_size=None, collate_fn=loader.collate_fn, generator=generator
            )
    elif isinstance(loader.dataset, IterableDataset):
        single = DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            drop_last=loader.drop_last,
            collate_fn=loader.collate_fn,
            generator=generator,
        )
    else:
        return None
    return next(iter(single), None)
