"""Pieces for the multi-process tests: importable by name so that ddp_spawn can pickle them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics import SumMetric


class LogitSum(SumMetric):
    """Sums the first logit of every sample: sensitive to any difference in weights or BatchNorm statistics."""

    def update(self, preds: Any, target: Any) -> None:  # type: ignore[override]
        super().update(preds[:, 0].double().sum())


class SameOnEveryRank(pl.Callback):
    """After fit, checks every rank kept the same EvalGuard history and writes rank 0's to a JSON file."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_evalguard import EvalGuard

        (guard,) = [cb for cb in trainer.callbacks if isinstance(cb, EvalGuard)]  # type: ignore[attr-defined]
        histories: list[Any] = [None] * trainer.world_size
        if trainer.world_size > 1:
            torch.distributed.all_gather_object(histories, guard.history)
        else:
            histories = [guard.history]
        if any(history != histories[0] for history in histories):
            raise AssertionError(f"ranks disagree: {histories}")
        if trainer.is_global_zero:
            self.out.write_text(json.dumps({"history": guard.history, "world_size": trainer.world_size}))


def regression_forward(module: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Two regression outputs per sample: the first two logits against (label, -label)."""
    return module(batch[0])[:, :2].contiguous(), torch.stack([batch[1].float(), -batch[1].float()], 1)
