"""What the clean metrics are compared with: the running train metrics and the validation metrics.

Keys are looked up in ``trainer.callback_metrics``. Two common ways of logging make the comparison wrong, and each
gets one warning: a key logged with ``on_epoch=False`` (it holds the last batch's value), and a key logged in the
LightningModule's own ``on_train_epoch_end`` (written after callbacks run, so the callback reads the previous epoch's
value). The second can only be seen after the epoch's hooks have run: ``References.check_after_epoch``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterable, Mapping
from typing import TYPE_CHECKING

from lightning_evalguard._lightning import logged_flags
from lightning_evalguard.distributed import from_rank_zero
from lightning_evalguard.metrics import running_candidates, validation_candidates

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["References"]

Warn = Callable[[str, str], None]


class References:
    """Reads running and validation values by metric name, and remembers what it read for a later check."""

    def __init__(self, running: Mapping[str, str] | None, val: Mapping[str, str] | None) -> None:
        """Store the explicit key mappings.

        Args:
            running: The callback's ``running`` argument: metric name -> key.
            val: The callback's ``val`` argument: metric name -> key.
        """
        self.running = dict(running or {})
        self.val = dict(val or {})
        self._read: dict[str, tuple[str | None, float | None]] = {}

    def running_candidates(self, name: str) -> list[str]:
        """The keys looked up, in order, for the running value of ``name``.

        Args:
            name: The metric name.

        Returns:
            ``[running[name]]`` when given, else ``train_<name>``, ``train/<name>``, and the ``_epoch`` variants.
        """
        return [self.running[name]] if name in self.running else running_candidates(name)

    def validation_candidates(self, name: str) -> list[str]:
        """The keys looked up, in order, for the validation value of ``name``.

        Args:
            name: The metric name.

        Returns:
            ``[val[name]]`` when given, else ``val_<name>``, ``val/<name>``.
        """
        return [self.val[name]] if name in self.val else validation_candidates(name)

    def running_values(
        self,
        trainer: pl.Trainer,
        names: Iterable[str],
        warn: Warn,
        trained: bool = True,
        non_decomposable: Container[str] = (),
    ) -> dict[str, float]:
        """The running value of each metric found, the same on every rank (rank 0's, which the logger writes).

        Args:
            trainer: The Trainer.
            names: The metric names.
            warn: ``(key, message)``: gives a warning once.
            trained: Whether training steps ran in this process during the epoch. Lightning re-runs the end of an
                epoch after restoring a checkpoint taken at validation end: what was logged then is gone, so
                nothing is compared and nothing is warned about.
            non_decomposable: The names of the metrics whose value over an epoch is not the batch-size-weighted
                mean of their per-batch values (F1, macro averages, AUROC, ...). A running key of one of them
                logged as a plain value (not a ``Metric`` object) is warned about: Lightning's mean over batches is
                not that metric over the epoch.

        Returns:
            ``{name: value}`` for the names whose key was found.
        """
        callback_metrics = trainer.callback_metrics
        flags = logged_flags(trainer)
        values: dict[str, float] = {}
        self._read = {}
        for name in names if trained else ():
            key = next((key for key in self.running_candidates(name) if key in callback_metrics), None)
            value = float(callback_metrics[key]) if key is not None else None
            self._read[name] = (key, value)
            if key is None or value is None:
                continue
            values[name] = value
            logged = flags.get(key) or flags.get(key.removesuffix("_epoch"))
            if logged is not None and logged.on_epoch and logged.is_tensor and _per_batch(logged.fx):
                if name in non_decomposable:
                    warn(
                        f"definition:{name}",
                        f"EvalGuard compares clean {name!r} with {key!r}, which was logged as a tensor or number:"
                        f" Lightning averages its per-batch values over the epoch, and for {name!r} (not a"
                        " micro-averaged accuracy or a mean of per-sample values) that mean is not the metric over"
                        " the epoch's samples, so the gap mixes two definitions. Log the torchmetrics Metric object"
                        f" instead: `self.log({key!r}, self.<metric>, on_epoch=True)` in training_step, after"
                        " updating it (e.g. `self.train_f1(preds, target)`).",
                    )
            if logged is not None and not logged.on_epoch:
                warn(
                    f"step:{name}",
                    f"EvalGuard compares clean {name!r} with {key!r}, which was logged with on_epoch=False: it holds"
                    " the last batch's value, not the epoch's. Log it with"
                    f" `self.log({key!r}, ..., on_epoch=True)` in training_step.",
                )
        return from_rank_zero(trainer, values)  # rank-local values differ when logged without sync_dist

    def validation_values(self, trainer: pl.Trainer, names: Iterable[str]) -> dict[str, float]:
        """The validation value of each metric found, the same on every rank.

        Args:
            trainer: The Trainer (call only for epochs where validation ran).
            names: The metric names.

        Returns:
            ``{name: value}`` for the names whose key was found.
        """
        callback_metrics = trainer.callback_metrics
        values: dict[str, float] = {}
        for name in names:
            key = next((key for key in self.validation_candidates(name) if key in callback_metrics), None)
            if key is not None:
                values[name] = float(callback_metrics[key])
        return from_rank_zero(trainer, values)  # rank-local values differ when logged without sync_dist

    def check_after_epoch(self, trainer: pl.Trainer, warn: Warn) -> None:
        """After the epoch's hooks: warn about running keys that were missing, or written after they were read.

        Args:
            trainer: The Trainer, at the next epoch's start or at the end of training.
            warn: ``(key, message)``: gives a warning once.
        """
        pending, self._read = self._read, {}
        callback_metrics = trainer.callback_metrics
        for name, (key, value) in pending.items():
            candidates = self.running_candidates(name)
            if key is None:
                late = next((candidate for candidate in candidates if candidate in callback_metrics), None)
                if late is None:
                    warn(
                        f"missing:{name}",
                        f"EvalGuard found no running metric for {name!r}: looked for {candidates} in"
                        f" trainer.callback_metrics, which holds {sorted(callback_metrics)}. The clean value is"
                        f" logged without running and gap; pass `running={{{name!r}: '<key>'}}` to EvalGuard.",
                    )
                    continue
                key = late
            elif key not in callback_metrics or _same(float(callback_metrics[key]), value):
                continue
            warn(
                f"late:{name}",
                f"{key!r} was logged after EvalGuard read it, in the LightningModule's own on_train_epoch_end"
                " (Lightning calls callbacks' on_train_epoch_end first), so EvalGuard compares clean"
                f" {name!r} with the previous epoch's value. Log it in training_step with on_epoch=True instead.",
            )

    def forget(self) -> None:
        """Drop what was read (a new fit starts)."""
        self._read = {}


#: The hooks Lightning runs once per training batch: a value logged there with on_epoch=True is averaged over batches.
_BATCH_HOOKS = frozenset(
    {
        "training_step",
        "on_train_batch_start",
        "on_train_batch_end",
        "on_before_backward",
        "on_after_backward",
        "on_before_optimizer_step",
        "on_before_zero_grad",
        "optimizer_step",
        "optimizer_zero_grad",
        "backward",
        "clip_gradients",
        "configure_gradient_clipping",
    }
)


def _per_batch(fx: str) -> bool:
    # Lightning names a callback's hook "Callback.<hook>" or "<state key>.<hook>", a module's "<hook>".
    return fx.rsplit(".", 1)[-1] in _BATCH_HOOKS


def _same(a: float, b: float | None) -> bool:
    return b is not None and (a == b or (math.isnan(a) and math.isnan(b)))
