"""Where EvalGuard touches Lightning internals, and how it tells a user's hook from Lightning's default.

Each use of an internal is tested by ``tests/test_lightning_private.py``, which fails loudly when an upgrade moves it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import lightning.pytorch as pl


def on_before_batch_transfer(pl_module: pl.LightningModule, batch: Any) -> Any:
    """Run ``on_before_batch_transfer`` as the training loop does (``loops/training_epoch_loop.py``).

    Lightning has no public call for it: the private method picks the datamodule's hook or the module's, and sets
    the hook name that the profiler and ``self.log`` validation read.

    Args:
        pl_module: The LightningModule.
        batch: The batch from the loader, after ``precision_plugin.convert_input``.

    Returns:
        The batch the hook returned.
    """
    return pl_module._on_before_batch_transfer(batch, dataloader_idx=0)


class LoggedFlags(NamedTuple):
    """How a key was logged: the hook (``fx``), the ``on_step``/``on_epoch`` flags, and whether as a plain value.

    ``is_tensor`` is True for a tensor or number, which Lightning averages over the epoch's batches (weighted by
    batch size), False for a torchmetrics ``Metric`` object, whose own ``compute()`` Lightning calls at epoch end.
    """

    fx: str
    on_step: bool
    on_epoch: bool
    is_tensor: bool | None = None


def logged_flags(trainer: pl.Trainer) -> dict[str, LoggedFlags]:
    """How each key of the running stage was logged, read from the trainer's private result collection.

    Public API exposes only the values (``trainer.callback_metrics``), not whether a key holds an epoch aggregate
    or the last batch's value, nor whether it was logged as a ``Metric`` or as a value Lightning averages over
    batches. Used for warnings only: if the internals move, this returns ``{}`` and the warning
    is not given, and ``tests/test_lightning_private.py`` fails.

    Args:
        trainer: The Trainer.

    Returns:
        ``{logged name: LoggedFlags}``.
    """
    results = getattr(trainer, "_results", None)
    if results is None:
        return {}
    flags: dict[str, LoggedFlags] = {}
    try:
        for result in results.values():
            meta = result.meta
            is_tensor = getattr(result, "is_tensor", None)
            flags[meta.name] = LoggedFlags(
                str(meta.fx), bool(meta.on_step), bool(meta.on_epoch), None if is_tensor is None else bool(is_tensor)
            )
    except AttributeError:
        return {}
    return flags


def user_overrides(owner: Any, name: str) -> bool:
    """Whether ``owner``'s class (or a user base class) defines ``name``, rather than Lightning's own classes.

    Works for objects of either namespace (``lightning.pytorch`` and the standalone ``pytorch_lightning``), where
    ``lightning.pytorch.utilities.model_helpers.is_overridden`` rejects the other namespace's objects.

    Args:
        owner: A LightningModule, LightningDataModule or Strategy, or None.
        name: The method's name.

    Returns:
        True when the method the object would call was not defined in Lightning's own modules.
    """
    if owner is None:
        return False
    method = getattr(type(owner), name, None)
    if method is None:
        return False
    module = getattr(method, "__module__", None) or ""
    return not module.startswith(("lightning.pytorch.", "pytorch_lightning."))


def unwrap_distributed_sampler(sampler: Any) -> Any:
    """The user's sampler inside Lightning's ``DistributedSamplerWrapper``, else ``sampler`` itself.

    Under DDP Lightning wraps a custom sampler; the wrapper's dataset is a private ``_DatasetSamplerWrapper`` that
    holds the original in ``_sampler`` (``lightning/fabric/utilities/distributed.py``). No public accessor exists.

    Args:
        sampler: A DataLoader's sampler.

    Returns:
        The sampler the user gave.
    """
    if type(sampler).__name__ == "DistributedSamplerWrapper":
        inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)
        if inner is not None:
            return inner
    return sampler


def uses_inference_mode(trainer: pl.Trainer) -> bool:
    """Whether the Trainer evaluates under ``torch.inference_mode()`` (``Trainer(inference_mode=True)``).

    The Trainer keeps its ``inference_mode`` argument on its ``validate``/``test`` loops only (the validation loop
    inside ``fit`` always uses ``no_grad``).

    Args:
        trainer: The Trainer.

    Returns:
        ``trainer.validate_loop.inference_mode`` (True when it cannot be read).
    """
    return bool(getattr(getattr(trainer, "validate_loop", None), "inference_mode", True))


def base_batch_to_device(strategy: Any) -> bool:
    """Whether ``strategy`` moves batches with the base ``Strategy.batch_to_device`` (no strategy-specific override).

    There is no public way to ask; the method's defining module tells, for either Lightning namespace. A strategy
    that overrides it (or a renamed module after an upgrade) makes this False, so batches take the full hook path:
    slower, never wrong.

    Args:
        strategy: ``trainer.strategy``.

    Returns:
        True when the method is the base class's.
    """
    method = getattr(type(strategy), "batch_to_device", None)
    module = getattr(method, "__module__", None)
    return module in ("lightning.pytorch.strategies.strategy", "pytorch_lightning.strategies.strategy")


def is_unrepeated_sampler(sampler: Any) -> bool:
    """Whether ``sampler`` is Lightning's ``UnrepeatedDistributedSampler`` (or its wrapper), which never pads.

    Both are ``DistributedSampler`` subclasses in ``overrides/distributed.py`` of either Lightning namespace; the
    class name is compared so that the standalone ``pytorch_lightning`` package is never imported.

    Args:
        sampler: A DataLoader's sampler.

    Returns:
        True for ``UnrepeatedDistributedSampler`` and ``UnrepeatedDistributedSamplerWrapper``.
    """
    return type(sampler).__name__.startswith("Unrepeated")


def fit_validation_loaders(trainer: pl.Trainer) -> Any:
    """The validation loaders passed to ``Trainer.fit``, before Lightning has loaded them; else None.

    Lightning loads validation loaders lazily, when the first validation runs (``trainer.val_dataloaders`` is None
    until then, e.g. with ``check_val_every_n_epoch=2``). It keeps where they come from in the fit loop's private
    ``_DataLoaderSource`` (``loops/evaluation_loop.py``): the loaders themselves, or the module or datamodule whose
    ``val_dataloader()`` gives them (the caller asks those itself). No public accessor exists.

    Args:
        trainer: The Trainer, during ``fit``.

    Returns:
        The loader or collection of loaders given to ``fit(val_dataloaders=...)``, or None.
    """
    source = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "val_loop", None)
    instance = getattr(getattr(source, "_data_source", None), "instance", None)
    if instance is None or hasattr(instance, "val_dataloader"):  # a LightningModule or LightningDataModule
        return None
    return instance
