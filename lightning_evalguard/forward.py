"""How a clean batch reaches the model (the way Lightning's loops bring it) and what the forward must return."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from lightning_evalguard._lightning import base_batch_to_device, on_before_batch_transfer, user_overrides

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "BATCH_HOOKS",
    "ForwardFn",
    "batch_path",
    "checked_forward",
    "default_batch_path",
    "default_forward",
    "prepare_batch",
]

#: The LightningModule / LightningDataModule hooks a batch passes through on its way to the model.
BATCH_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")

ForwardFn = Callable[["pl.LightningModule", Any], "tuple[Any, Any]"]


def default_forward(pl_module: pl.LightningModule, batch: Any) -> tuple[Any, Any]:
    """Split ``batch`` into ``(inputs, target, ...)`` and return ``(pl_module(inputs), target)``.

    Args:
        pl_module: The LightningModule.
        batch: A batch on the module's device.

    Returns:
        ``(preds, target)``.

    Raises:
        TypeError: If the batch is not a tuple or list of at least two items.
    """
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        preds = pl_module(batch[0])
        if isinstance(preds, (Mapping, tuple, list)):
            raise TypeError(
                f"EvalGuard's default forward passes module(inputs) to the metrics, but the module returned a"
                f" {type(preds).__name__}, not a tensor. Pass `forward=` to EvalGuard, e.g."
                " forward=lambda module, batch: (module(batch[0])['logits'], batch[1])."
            )
        return preds, batch[1]
    described = f"a {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    raise TypeError(
        f"EvalGuard's default forward expects batches that are (inputs, target, ...) tuples or lists, got {described}."
        " Pass `forward=` to EvalGuard: a callable (module, batch) -> (preds, target)."
    )


def prepare_batch(trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Any:
    """Bring a loader's batch to the model as Lightning's training loop does.

    ``precision_plugin.convert_input``, then ``on_before_batch_transfer``, then ``strategy.batch_to_device`` (which
    runs ``transfer_batch_to_device`` and ``on_after_batch_transfer``).

    Args:
        trainer: The Trainer.
        pl_module: The LightningModule.
        batch: The batch as the loader yielded it.

    Returns:
        The batch on the module's device, after the user's hooks.
    """
    batch = trainer.precision_plugin.convert_input(batch)
    batch = on_before_batch_transfer(pl_module, batch)
    return trainer.strategy.batch_to_device(batch, dataloader_idx=0)


def default_batch_path(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether batches reach the model the default way: no batch-transfer hook overridden, the base transfer.

    Args:
        trainer: The Trainer.
        pl_module: The LightningModule.

    Returns:
        True when neither the module nor the datamodule overrides ``on_before_batch_transfer``,
        ``transfer_batch_to_device`` or ``on_after_batch_transfer`` and the strategy keeps the base
        ``batch_to_device``: a batch then only goes through ``convert_input`` and ``move_data_to_device``.
    """
    datamodule = getattr(trainer, "datamodule", None)
    overridden = any(user_overrides(pl_module, hook) or user_overrides(datamodule, hook) for hook in BATCH_HOOKS)
    return not overridden and base_batch_to_device(trainer.strategy)


def batch_path(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable[[Any], Any]:
    """The function that brings a loader's batch to the model, chosen once per pass.

    On the default path (:func:`default_batch_path`) the hooks are Lightning's identities and
    ``move_data_to_device``: the batch goes there directly, without the per-batch hook dispatch. Otherwise
    :func:`prepare_batch`.

    Args:
        trainer: The Trainer.
        pl_module: The LightningModule.

    Returns:
        ``batch -> batch on the device``.
    """
    if not default_batch_path(trainer, pl_module):
        return lambda batch: prepare_batch(trainer, pl_module, batch)
    from lightning.fabric.utilities.apply_func import move_data_to_device

    convert, device = trainer.precision_plugin.convert_input, trainer.strategy.root_device
    return lambda batch: move_data_to_device(convert(batch), device)


def checked_forward(
    trainer: pl.Trainer, pl_module: pl.LightningModule, forward: ForwardFn, batch: Any
) -> tuple[Any, Any]:
    """Run ``forward`` under the precision plugin's validation context and check it returned ``(preds, target)``.

    Args:
        trainer: The Trainer.
        pl_module: The LightningModule.
        forward: ``(module, batch) -> (preds, target)``.
        batch: A prepared batch (see ``prepare_batch``).

    Returns:
        ``(preds, target)``.

    Raises:
        TypeError: If ``forward`` returned something else.
    """
    with trainer.precision_plugin.val_step_context():
        output = forward(pl_module, batch)
    if isinstance(output, (tuple, list)) and len(output) == 2:
        return output[0], output[1]
    raise TypeError(
        "EvalGuard's `forward=` must return a (preds, target) pair for the metrics' update(preds, target),"
        f" got {type(output).__name__}"
        + (f" of length {len(output)}" if isinstance(output, (tuple, list)) else "")
        + "."
    )
