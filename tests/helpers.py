"""Tiny datasets, modules and trainers shared by the tests."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_evalguard import EvalGuard

NUM_FEATURES = 6
NUM_CLASSES = 3


def make_tensors(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, NUM_FEATURES, generator=generator)
    weights = torch.randn(NUM_FEATURES, NUM_CLASSES, generator=generator)
    y = (x @ weights + 0.5 * torch.randn(n, NUM_CLASSES, generator=generator)).argmax(dim=1)
    return x, y


class NumpyNoise:
    """Dataset-level augmentation drawing from numpy's global RNG."""

    def __init__(self, scale: float = 0.5) -> None:
        self.scale = scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.from_numpy(np.random.normal(0.0, self.scale, size=tuple(x.shape))).to(x.dtype)


class TensorData(Dataset):
    """(x, y) pairs with a ``transform`` attribute applied to x."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Any = None) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[index]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.y[index]


def micro_accuracy() -> MulticlassAccuracy:
    """A fresh MulticlassAccuracy over NUM_CLASSES, micro-averaged: the fraction of correct samples."""
    return MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")


def macro_accuracy() -> MulticlassAccuracy:
    """A fresh MulticlassAccuracy over NUM_CLASSES with torchmetrics' default average, macro: the mean per-class recall."""
    return MulticlassAccuracy(num_classes=NUM_CLASSES)


class MeanLogit(MeanMetric):
    """The mean first logit over the samples: a continuous value, sensitive to any change of the forward."""

    def update(self, preds: Any, target: Any) -> None:  # type: ignore[override]
        super().update(preds[:, 0])


class CountSamples(SumMetric):
    """Counts samples: update(preds, target) adds len(target)."""

    def update(self, preds: Any, target: Any) -> None:  # type: ignore[override]
        super().update(torch.tensor(float(len(target)), device=self.device))


def build_net(kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(NUM_FEATURES, NUM_CLASSES)
    if kind == "dropout":
        return nn.Sequential(nn.Linear(NUM_FEATURES, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, NUM_CLASSES))
    if kind == "batchnorm":
        return nn.Sequential(nn.Linear(NUM_FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))
    if kind == "both":
        return nn.Sequential(
            nn.Linear(NUM_FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, NUM_CLASSES)
        )
    raise ValueError(kind)


class Classifier(pl.LightningModule):
    """A classifier that logs ``train_acc`` (epoch aggregate) and optionally augments batches on device."""

    def __init__(self, kind: str = "both", batch_noise: float = 0.0, lr: float = 0.1) -> None:
        super().__init__()
        self.net = build_net(kind)
        self.batch_noise = batch_noise
        self.lr = lr
        self.train_acc = MulticlassAccuracy(num_classes=NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.batch_noise and self.trainer.training:
            x, y = batch
            batch = (x + self.batch_noise * torch.randn_like(x), y)
        return batch

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class Validates(Classifier):
    """A Classifier logging its validation accuracy under ``key``: the batch mean, or with ``metric`` a micro metric."""

    def __init__(self, kind: str = "both", key: str = "val_acc", metric: bool = False) -> None:
        super().__init__(kind)
        self.key = key
        self.val_acc = micro_accuracy() if metric else None

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        if self.val_acc is None:
            self.log(self.key, (self(x).argmax(1) == y).float().mean())
        else:
            self.val_acc(self(x), y)
            self.log(self.key, self.val_acc)


class HooklessClassifier(Classifier):
    """A Classifier without batch-transfer hooks: batches reach it the default way."""

    on_after_batch_transfer = pl.LightningModule.on_after_batch_transfer


class NoTraining(Classifier):
    """Fails the test if a training step runs: for errors that must come before the first training step."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        raise AssertionError("a training step ran: the error should have stopped the fit before")


def trainer(tmp_path: Any, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "max_epochs": 2,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def loader(dataset: Dataset, batch_size: int = 16, shuffle: bool = True, **kwargs: Any) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, **kwargs)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """An independent clean accuracy: eval mode, no_grad, the whole set in one batch."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        value = (model(x).argmax(dim=1) == y).double().mean().item()
    model.train(was_training)
    return value


def assert_training_unchanged_by(
    tmp_path: Any,
    make_callback: Callable[[], pl.Callback],
    make_model: Callable[[], pl.LightningModule] = lambda: Classifier("both", batch_noise=0.3),
    n: int = 48,
    epochs: int = 3,
    seed: int = 0,
    make_transform: Callable[[], Any] = NumpyNoise,
) -> pl.Callback:
    """Fit twice from the same seed, without and with the callback, and assert the weights are bit-identical.

    The training data carries augmentation in the dataset (``make_transform()``, numpy noise by default, made anew
    for each fit); the model may augment batches from torch's RNG. Returns the callback, for checks on what it
    measured.
    """
    weights = []
    callback = make_callback()
    for callbacks in ([], [callback]):
        pl.seed_everything(seed, workers=True, verbose=False)
        x, y = make_tensors(n)
        model = make_model()
        trainer(tmp_path, max_epochs=epochs, deterministic=True, callbacks=callbacks).fit(
            model, loader(TensorData(x, y, make_transform()))
        )
        weights.append({key: value.clone() for key, value in model.state_dict().items()})
    without, with_callback = weights
    assert without.keys() == with_callback.keys()
    for key in without:
        assert torch.equal(without[key], with_callback[key]), f"{key} differs with the callback"
    return callback


def clean_sources(guard: EvalGuard) -> list[Any]:
    """The clean sources (``sources.CleanSource``) the guard built for its last fit.

    EvalGuard keeps its sources, metric clones and caches private. Tests that inspect them read them through this
    function and :func:`metric_clones` only, so a change of the callback's internals is mended here, in one place.
    """
    return list(guard._data.sources or [])


def metric_clones(guard: EvalGuard) -> dict[str | None, Any]:
    """The guard's metric clones (``MetricCollection``) by source name, as its last pass left them (see above)."""
    return guard._passes.metrics()


def metric_template(guard: EvalGuard) -> Any:
    """The ``MetricCollection`` the guard clones for every pass, never updated (see :func:`clean_sources`)."""
    return guard._passes.template


class CacheWatcher(EvalGuard):
    """Records its caches at the end of fit, before teardown frees them: (device, [(input dtype, device type)])."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen = [
            (source.cache.device, [(batch[0].dtype, batch[0].device.type) for batch in source.cache.batches or []])
            for source in clean_sources(self)
            if source.cache is not None
        ]
        super().on_fit_end(trainer, pl_module)


def reference_sample_stats(logits: Sequence[torch.Tensor], y: torch.Tensor) -> dict[str, list[float]]:
    """The statistics by a plain float64 loop over epochs and samples."""
    fields: dict[str, list[float]] = {name: [] for name in ("mean_margin", "last_margin", "confidence", "variability")}
    fields.update(correct=[], forgetting=[], first_learned=[], last_prediction=[])
    for i in range(len(y)):
        margins, probabilities, rights = [], [], []
        for epoch_logits in logits:
            row, label = epoch_logits[i], int(y[i])
            others = [float(row[c]) for c in range(len(row)) if c != label]
            margins.append(float(row[label]) - max(others))
            exp = [math.exp(float(v) - float(row.max())) for v in row]
            probabilities.append(exp[label] / sum(exp))
            rights.append(int(row.argmax()) == label)
        mean = sum(probabilities) / len(probabilities)
        fields["mean_margin"].append(sum(margins) / len(margins))
        fields["last_margin"].append(margins[-1])
        fields["confidence"].append(mean)
        fields["variability"].append(math.sqrt(sum((p - mean) ** 2 for p in probabilities) / len(probabilities)))
        fields["correct"].append(sum(rights))
        fields["forgetting"].append(sum(1 for a, b in itertools.pairwise(rights) if a and not b))
        fields["first_learned"].append(next((epoch for epoch, right in enumerate(rights) if right), -1))
        fields["last_prediction"].append(int(logits[-1][i].argmax()))
    return fields
