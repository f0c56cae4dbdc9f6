"""Run by tests/test_distributed.py with strategy="ddp", which re-executes this script for rank 1.

Usage: python ddp_script.py OUT_DIR LIMIT   (LIMIT: "none" or a float)
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distributed_helpers import LogitSum, SameOnEveryRank

from lightning_evalguard import EvalGuard

from helpers import NUM_CLASSES, Classifier, CountSamples, NumpyNoise, TensorData, loader, make_tensors


def main() -> None:
    out, limit = Path(sys.argv[1]), sys.argv[2]
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    x, y = make_tensors(65)
    guard = EvalGuard(
        {
            "acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro"),
            "n": CountSamples(),
            "logit": LogitSum(),
        },
        eval_transform=nn.Identity(),
        batch_size=8,
        limit_batches=None if limit == "none" else float(limit),
    )
    trainer = pl.Trainer(
        default_root_dir=out,
        max_epochs=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[guard, SameOnEveryRank(out / "history.json")],
    )
    model = Classifier("batchnorm")
    trainer.fit(model, loader(TensorData(x, y, NumpyNoise()), batch_size=11))
    if trainer.is_global_zero:
        torch.save(model.state_dict(), out / "weights.pt")
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        (out / "metrics.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    main()
