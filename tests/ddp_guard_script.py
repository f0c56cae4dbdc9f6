"""Run by tests/test_distributed.py with strategy="ddp" (this script runs once per rank): augmentation is left on for
rank 1 only; every rank must raise EvalGuardError before training, none may go on alone. Each writes rank<r>.txt.

Usage: python ddp_guard_script.py OUT_DIR
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning_evalguard import EvalGuard, EvalGuardError

from helpers import NUM_CLASSES, Classifier, TensorData, loader, make_tensors


class NoisyOnRankOne:
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            return x + torch.randn_like(x)
        return x


def main() -> None:
    out = Path(sys.argv[1])
    warnings.filterwarnings("ignore")
    x, y = make_tensors(64)
    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES)}, eval_transform=NoisyOnRankOne())
    trainer = pl.Trainer(
        default_root_dir=out, max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[guard],
    )  # fmt: skip
    outcome = "no error"
    try:
        trainer.fit(Classifier("linear"), loader(TensorData(x, y, nn.Identity()), batch_size=8))
    except EvalGuardError as error:
        outcome = f"EvalGuardError: {error}"
    except Exception as error:
        outcome = f"{type(error).__name__}: {error}"
    (out / f"rank{trainer.global_rank}.txt").write_text(outcome)
    if torch.distributed.is_initialized():  # a clean teardown after the error, so that gloo does not abort at exit
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
