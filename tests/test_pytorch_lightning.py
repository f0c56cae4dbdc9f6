"""The same EvalGuard works with the standalone ``pytorch_lightning`` package and its Trainer."""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_evalguard import EvalGuard

from helpers import NUM_CLASSES, NumpyNoise, TensorData, accuracy, build_net, make_tensors


class StandaloneClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = build_net("both")
        self.train_acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        if self.trainer.training:
            x = x + 0.3 * torch.randn_like(x)
        return x, y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        self.train_acc(logits, y)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return nn.functional.cross_entropy(logits, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_evalguard_runs_with_the_pytorch_lightning_trainer(tmp_path):
    x, y = make_tensors(48)
    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")}, eval_transform=nn.Identity())
    assert isinstance(guard, pl.Callback)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        callbacks=[guard],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model = StandaloneClassifier()
    data = torch.utils.data.DataLoader(TensorData(x, y, NumpyNoise()), batch_size=16, shuffle=True)
    trainer.fit(model, data)
    assert [entry["epoch"] for entry in guard.history] == [0, 1]
    assert guard.history[-1]["clean"]["acc"] == pytest.approx(accuracy(model, x, y), abs=1e-6)
    assert float(trainer.callback_metrics["evalguard/gap/acc"]) == pytest.approx(guard.history[-1]["gap"]["acc"], abs=1e-6)
