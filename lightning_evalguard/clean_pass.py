"""One forward-only pass over a clean loader, with batches brought to the model the way Lightning's loops do."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torchmetrics import MetricCollection

from lightning_evalguard._lightning import on_before_batch_transfer, user_overrides
from lightning_evalguard.data import DevicePlacement

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "DEVICE_CACHE_SHARE",
    "ForwardFn",
    "batch_path",
    "checked_forward",
    "default_batch_path",
    "default_forward",
    "device_cache_placement",
    "prepare_batch",
    "run_pass",
]

_BATCH_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")

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
    overridden = any(user_overrides(pl_module, hook) or user_overrides(datamodule, hook) for hook in _BATCH_HOOKS)
    return not overridden and _base_batch_to_device(trainer.strategy)


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


def _base_batch_to_device(strategy: Any) -> bool:
    # Whether the strategy moves batches with the base Strategy.batch_to_device (no strategy-specific override).
    method = getattr(type(strategy), "batch_to_device", None)
    module = getattr(method, "__module__", None)
    return module in ("lightning.pytorch.strategies.strategy", "pytorch_lightning.strategies.strategy")


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
        f" got {type(output).__name__}" + (f" of length {len(output)}" if isinstance(output, (tuple, list)) else "")
        + "."
    )


def run_pass(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    loader: Iterable[Any],
    metrics: MetricCollection,
    forward: ForwardFn,
    max_batches: int | None = None,
    on_batch: Callable[[], Any] | None = None,
) -> int:
    """Feed every batch of ``loader`` through the model and update ``metrics``; return the number of batches.

    Each batch goes through ``precision_plugin.convert_input``, ``on_before_batch_transfer`` and
    ``strategy.batch_to_device`` (``transfer_batch_to_device`` and ``on_after_batch_transfer``), as in the training
    loop, and the forward runs under the precision plugin's validation context (autocast for mixed precision).
    Nothing here syncs with the host. The caller sets modes, grad mode, RNG and trainer stage.

    Args:
        trainer: The Trainer.
        pl_module: The LightningModule (not the DDP wrapper: its forward would sync buffers per batch).
        loader: The clean batches.
        metrics: The metrics to update, already reset and on the module's device.
        forward: Computes ``(preds, target)`` from the module and a batch.
        max_batches: Stop after this many batches.
        on_batch: Called after every batch (advances a progress bar).

    Returns:
        The number of batches evaluated.
    """
    batches = 0
    to_device = batch_path(trainer, pl_module)
    for batch in loader:
        preds, target = checked_forward(trainer, pl_module, forward, to_device(batch))
        metrics.update(preds, target)
        batches += 1
        if on_batch is not None:
            on_batch()
        if max_batches is not None and batches >= max_batches:
            break
    return batches
