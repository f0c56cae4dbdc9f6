"""The same EvalGuard works with the standalone ``pytorch_lightning`` package and its Trainer."""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_evalguard.pytorch_lightning import EvalGuard

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
    guard = EvalGuard(
        {"acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")}, eval_transform=nn.Identity()
    )
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
    assert float(trainer.callback_metrics["evalguard/gap/acc"]) == pytest.approx(
        guard.history[-1]["gap"]["acc"], abs=1e-6
    )


def test_importing_the_package_leaves_pytorch_lightning_and_logging_alone():
    import subprocess
    import sys

    code = (
        "import logging, sys, lightning.pytorch, lightning_utilities.core.rank_zero as rz;"
        "before = rz.log.name;"
        "import lightning_evalguard;"
        "assert 'pytorch_lightning' not in sys.modules, 'pytorch_lightning was imported';"
        "assert rz.log.name == before, rz.log.name;"
        "assert lightning_evalguard.EvalGuard.__mro__[1].__module__.startswith('lightning.pytorch')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_main_class_is_also_a_pytorch_lightning_callback_when_that_was_imported_first():
    import subprocess
    import sys

    code = (
        "import pytorch_lightning, lightning.pytorch;"
        "from lightning_evalguard import EvalGuard;"
        "from lightning_evalguard.pytorch_lightning import EvalGuard as Standalone;"
        "assert issubclass(EvalGuard, pytorch_lightning.Callback) and issubclass(EvalGuard, lightning.pytorch.Callback);"
        "assert Standalone is EvalGuard"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_subclass_of_the_standalone_tensorboard_logger_gets_the_dashboard(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class TeamLogger(TensorBoardLogger):
        """A team's own TensorBoardLogger of the standalone package."""

    x, y = make_tensors(16)
    logger = TeamLogger(tmp_path, name="team")
    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES)}, eval_transform=nn.Identity())
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        accelerator="cpu",
        logger=logger,
        callbacks=[guard],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(StandaloneClassifier(), torch.utils.data.DataLoader(TensorData(x, y), batch_size=8))
    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    assert "custom_scalars__config__" in events.Tags()["tensors"]
