"""Every cross-rank call EvalGuard makes, and the order in which every rank makes them.

Under DDP (``trainer.world_size > 1``) a collective that one rank makes and another does not leaves the first waiting
forever. Each function here is a collective when the world has more than one process (and a no-op on one process):
every rank calls it at the same point, with the same arguments' shapes. Nothing else in the package calls
``torch.distributed`` or the strategy's ``broadcast``/``reduce``/``reduce_boolean_decision``.

The order, on every rank:

At fit start (``on_train_start``), after the clean sources are built (no collective: the subset is drawn from the
seed, the shards are computed locally):

1. for each clean source: :func:`broadcast_buffers` (entering the clean context in which its first batch is
   produced), then with ``guards="raise"`` :func:`any_rank` twice (the shuffle guard's finding, then the
   augmentation guard's);
2. :func:`broadcast_buffers` once more (the context of the first forward: the set-up checks, and with guards on the
   eval-mode determinism check), then with ``guards="raise"`` :func:`any_rank` (its finding);
3. with ``cache=True``, for each source that keeps a cache: :func:`broadcast_buffers` (the context in which the
   first batch is sized), then :func:`any_rank` (whether the cache would exceed ``cache_max_bytes``).

At each evaluated epoch end, for each pass kind (clean; then passes B and C with ``decompose=True``) and each source:

1. :func:`broadcast_buffers` (the pass's context: every rank evaluates rank 0's buffers);
2. the pass itself (EvalGuard makes no collective inside it);
3. :func:`total` (the number of batches all ranks evaluated);
4. when that total is not 0: ``MetricCollection.compute()``, whose torchmetrics sync gathers the metric states;
5. for the clean pass with ``guards="raise"``: :func:`any_rank` (the in-pass guard's finding).

Then, with ``guards="raise"``, :func:`any_rank` (the guard after the pass); and when something was measured,
:func:`from_rank_zero` for the running values, for the validation values (epochs where validation ran, the same on
every rank) and for the pass time, before Lightning's own ``sync_dist`` reduction of the logged values.

Every condition above depends only on values that are the same on every rank (arguments, the kinds of the sources,
batch types, a reduced total), so every rank takes the same branches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["any_rank", "broadcast_buffers", "from_rank_zero", "total"]

T = TypeVar("T")


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers into every rank's module (no-op without an initialised process group).

    After the last training step each DDP rank has updated its BatchNorm running statistics on its own batch, so
    the ranks hold slightly different models. Broadcasting rank 0's buffers makes every rank evaluate the model a
    checkpoint would save. Call it inside ``isolation.preserved_buffers`` so each rank gets its own buffers back.
    Called on every rank each time a pass context is entered (see the module docstring).

    Args:
        module: The module whose buffers are overwritten in place.
        src: The rank whose buffers are kept.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() < 2:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for buffer in module.buffers():
        groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
    with torch.no_grad():
        for buffers in groups.values():  # one collective per dtype and device, not one per buffer
            flat = torch.cat([buffer.reshape(-1) for buffer in buffers])
            torch.distributed.broadcast(flat, src=src)
            offset = 0
            for buffer in buffers:
                buffer.copy_(flat[offset : offset + buffer.numel()].view_as(buffer))
                offset += buffer.numel()


def any_rank(trainer: pl.Trainer, flag: bool) -> bool:
    """Whether ``flag`` is True on any rank: the same answer everywhere, so every rank raises together or none does.

    Called on every rank for a guard's finding (with ``guards="raise"``) and for the cache budget at fit start.

    Args:
        trainer: The Trainer.
        flag: This rank's finding.

    Returns:
        ``flag`` on one process; the logical or over the ranks otherwise.
    """
    if trainer.world_size == 1:
        return flag
    return bool(trainer.strategy.reduce_boolean_decision(flag, all=False))


def total(trainer: pl.Trainer, device: torch.device, count: int) -> int:
    """The sum of ``count`` over the ranks (the batches every rank evaluated in a pass).

    Called on every rank after every pass over every source, before the metrics are computed.

    Args:
        trainer: The Trainer.
        device: A device the strategy's collectives accept (the module's).
        count: This rank's count.

    Returns:
        ``count`` on one process; the sum over the ranks otherwise.
    """
    if trainer.world_size == 1:
        return count
    summed = trainer.strategy.reduce(torch.tensor(count, device=device), reduce_op="sum")
    return int(summed.item()) if isinstance(summed, torch.Tensor) else int(summed)


def from_rank_zero(trainer: pl.Trainer, value: T) -> T:
    """Rank 0's ``value`` on every rank (values read from ``callback_metrics`` or timed locally differ by rank).

    Called on every rank at each evaluated epoch end, before logging (see the module docstring).

    Args:
        trainer: The Trainer.
        value: This rank's value (a picklable object).

    Returns:
        ``value`` on one process; rank 0's otherwise.
    """
    if trainer.world_size == 1:
        return value
    broadcast: Any = trainer.strategy.broadcast(value, src=0)
    return broadcast  # type: ignore[no-any-return]
