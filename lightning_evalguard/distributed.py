"""Every cross-rank call EvalGuard makes, and the order in which every rank makes them.

Under DDP (``trainer.world_size > 1``) a collective that one rank makes and another does not leaves the first waiting
forever. Each function here is a collective when the world has more than one process (and a no-op on one process):
every rank calls it at the same point, with the same arguments' shapes. Nothing else in the package calls
``torch.distributed`` or the strategy's ``broadcast``/``reduce``/``reduce_boolean_decision``.

Forwards count as collectives too: under sharded strategies (FSDP, DeepSpeed ZeRO-3, tensor parallel) every forward
all-gathers parameters, so every rank makes the same number of forwards in every pass and check (a rank with fewer
batches pads, see :func:`plan_pass`).

The order, on every rank:

At fit start (``on_train_start``), after the clean sources are built (no collective: the subset is drawn from the
seed, the shards are computed locally):

1. for each clean source: :func:`broadcast_buffers` (entering the clean context in which its first batch is
   produced, in this process, without a forward), then with ``guards="raise"`` :func:`any_rank` twice (the shuffle
   guard's finding, then the augmentation guard's);
2. :func:`shared_batch` (a rank whose shards are all empty borrows a batch for the forwards);
3. :func:`broadcast_buffers` once more (the context of the forwards), one set-up forward on every rank, and with the
   guards on three more (watched, then under two seeds); then with ``guards="raise"`` :func:`any_rank` (the
   determinism guard's finding);
4. with ``cache=True``, for each source that keeps a cache: :func:`broadcast_buffers` (the context in which the
   first batch is sized), then :func:`any_rank` (whether the cache would exceed ``cache_max_bytes``).

At each evaluated epoch end, for each pass kind (clean; then passes B and C with ``decompose=True``) and each source:

1. :func:`broadcast_buffers` (the pass's context: every rank evaluates rank 0's buffers);
2. :func:`plan_pass` (after reading this rank's first batch), then :func:`shared_batch` when some rank has no batch;
3. the forwards: the agreed number on every rank (its batches, then padding forwards), or with a loader without
   length, :func:`any_reading` before every forward and once at the end;
4. :func:`total` (the number of batches all ranks evaluated);
5. when that total is not 0: ``MetricCollection.compute()``, whose torchmetrics sync gathers the metric states;
   then, for the clean pass over a random subset with a mean-of-samples metric (``MeanSquaredError``,
   ``MeanAbsoluteError``), :func:`summed` (the per-sample counts, sums and sums of squares);
6. for the clean pass with ``track_samples=True``: :func:`gather` (each rank's per-sample values);
7. for the clean pass with the guards on: :func:`any_rank` (whether any rank saw RNG states change), and if so, on
   every rank, :func:`shared_batch` and one watched forward to name what draws; then with ``guards="raise"``
   :func:`any_rank` (the in-pass guard's finding).

Then, with ``guards="raise"``, :func:`any_rank` (the guard after the pass); and when something was measured,
:func:`from_rank_zero` for the running values, for the validation values (epochs where validation ran, the same on
every rank) and for the pass time, before Lightning's own ``sync_dist`` reduction of the logged values.

Every condition above depends only on values that are the same on every rank (arguments, the kinds of the sources,
batch types, reduced values), so every rank takes the same branches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "PassPlan",
    "any_rank",
    "any_reading",
    "broadcast_buffers",
    "from_rank_zero",
    "gather",
    "plan_pass",
    "shared_batch",
    "summed",
    "total",
]

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


def summed(trainer: pl.Trainer, values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``values`` over the ranks (per-sample sums for a standard error).

    Called on every rank after a clean pass over a random subset with mean-of-samples metrics (the same shape on
    every rank: one row per such metric).

    Args:
        trainer: The Trainer.
        values: This rank's values, on a device the strategy's collectives accept.

    Returns:
        ``values`` on one process; the sum over the ranks otherwise.
    """
    if trainer.world_size == 1:
        return values
    reduced: Any = trainer.strategy.reduce(values.clone(), reduce_op="sum")
    return reduced  # type: ignore[no-any-return]


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


def _initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class PassPlan(NamedTuple):
    """What the ranks agreed before a pass (see :func:`plan_pass`).

    Attributes:
        forwards: The forwards every rank makes: the most batches any rank reads; None when some rank cannot know
            its count before reading, and the ranks agree batch by batch (:func:`any_reading`).
        lacking: Whether some rank has no batch at all (an empty shard): it pads with another rank's
            (:func:`shared_batch`).
    """

    forwards: int | None
    lacking: bool


def plan_pass(trainer: pl.Trainer, device: torch.device, count: int | None, has_batch: bool) -> PassPlan:
    """Agree, once per pass, on how many forwards every rank makes (one all-reduce of the maximum).

    Under sharded strategies (FSDP, DeepSpeed ZeRO-3, tensor parallel) every forward is itself a collective, so every
    rank must run the same number of them, and the unpadded shards have different numbers of batches. Called on
    every rank at the start of every pass under DDP, after the rank has read its first batch.

    Args:
        trainer: The Trainer.
        device: A device the process group accepts (the module's).
        count: The batches this rank reads, or None when it cannot know before reading (a loader without length).
        has_batch: Whether this rank has at least one batch.

    Returns:
        The plan.
    """
    if trainer.world_size == 1 or not _initialised():
        return PassPlan(count, not has_batch)
    values = torch.tensor([-1 if count is None else count, int(count is None), int(not has_batch)], device=device)
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    most, unknown, lacking = (int(value) for value in values.tolist())
    return PassPlan(None if unknown else most, bool(lacking))


def any_reading(trainer: pl.Trainer, device: torch.device, reading: bool) -> bool:
    """Whether any rank still has a batch to read: a pass over loaders without length agrees batch by batch.

    Called on every rank before every forward of such a pass (one all-reduce each), and once more at its end.

    Args:
        trainer: The Trainer.
        device: A device the process group accepts.
        reading: Whether this rank has another batch.

    Returns:
        ``reading`` on one process; the logical or over the ranks otherwise.
    """
    if trainer.world_size == 1 or not _initialised():
        return reading
    flag = torch.tensor([int(reading)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def shared_batch(trainer: pl.Trainer, device: torch.device, batch: Any) -> Any:
    """A batch for a rank that has none (an empty shard) to run its padding forwards on: the first rank's that has one.

    Called on every rank where a rank may lack a batch (the fit-start checks, a pass over an empty shard): one
    all-gather of who has a batch, then, if some rank lacks one, a broadcast of the first rank's batch (through the
    host; it is moved to ``device``).

    Args:
        trainer: The Trainer.
        device: This rank's device.
        batch: This rank's batch as it reaches the model, or None.

    Returns:
        ``batch`` when this rank has one; else another rank's, or None when no rank has any.
    """
    if trainer.world_size == 1 or not _initialised():
        return batch
    from lightning.fabric.utilities.apply_func import move_data_to_device

    world = torch.distributed.get_world_size()
    flags = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    torch.distributed.all_gather(flags, torch.tensor([int(batch is not None)], device=device))
    having = [rank for rank, flag in enumerate(flags) if int(flag.item())]
    if not having or len(having) == world:
        return batch
    source = having[0]
    message = [move_data_to_device(batch, torch.device("cpu")) if torch.distributed.get_rank() == source else None]
    torch.distributed.broadcast_object_list(message, src=source)
    return batch if batch is not None else move_data_to_device(message[0], device)


def gather(trainer: pl.Trainer, value: T) -> list[T]:
    """Every rank's ``value``, in rank order (per-sample statistics: each rank evaluated its own shard).

    Called on every rank after every clean pass with ``track_samples=True``.

    Args:
        trainer: The Trainer.
        value: This rank's value (a picklable object, e.g. CPU tensors).

    Returns:
        ``[value]`` on one process; the list of every rank's value otherwise.
    """
    if trainer.world_size == 1 or not _initialised():
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered
