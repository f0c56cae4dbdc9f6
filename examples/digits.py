"""EvalGuard on real data that needs no download: scikit-learn's handwritten digits (1,797 8x8 images).

A small CNN with BatchNorm and Dropout is trained with random shifts and noise in the dataset's transform. EvalGuard
measures the training set after every epoch in eval mode with the validation transform (no augmentation) and logs
``evalguard/clean/acc``, ``evalguard/running/acc`` and ``evalguard/gap/acc`` to TensorBoard next to ``train_acc``
and ``val_acc``. With ``--decompose`` it also splits the gap into the effects of train mode (Dropout, BatchNorm batch
statistics), augmentation and the weights moving during the epoch (``evalguard/effect/<kind>/acc``).

    python examples/digits.py                 # 10-15 seconds on 2 CPU cores
    python examples/digits.py --decompose     # the same, with the gap split into its three causes
    tensorboard --logdir lightning_logs
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_evalguard import EvalGuard


class Normalize:
    """Scale pixels from [0, 16] to roughly zero mean, unit range."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image / 8.0 - 1.0


class ShiftAndNoise:
    """Train-time augmentation: a random shift of up to one pixel and Gaussian noise, then normalisation."""

    def __init__(self, noise: float = 1.5) -> None:
        self.noise = noise
        self.normalize = Normalize()

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        dy, dx = torch.randint(-1, 2, (2,)).tolist()
        shifted = torch.roll(nn.functional.pad(image, (1, 1, 1, 1)), shifts=(dy, dx), dims=(1, 2))[:, 1:-1, 1:-1]
        return self.normalize(shifted + self.noise * torch.randn_like(shifted))


class Digits(Dataset):
    """Digit images (1 x 8 x 8, pixel values 0-16) and labels, with a ``transform`` applied to each image."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Any) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index]), self.labels[index]


class DigitsData(pl.LightningDataModule):
    """A fixed 80/20 train/validation split; augmentation on the training set only."""

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    def setup(self, stage: str) -> None:
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
        labels = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        train, val = order[: int(0.8 * len(order))], order[int(0.8 * len(order)) :]
        self.train_set = Digits(images[train], labels[train], ShiftAndNoise())
        self.val_set = Digits(images[val], labels[val], Normalize())

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.val_set, batch_size=256, num_workers=self.num_workers)


class DigitsCNN(pl.LightningModule):
    """Conv-BN-ReLU x2, max-pool, Dropout, linear head."""

    def __init__(self, lr: float = 2e-3, dropout: float = 0.4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(32 * 4 * 4, 10),
        )
        self.train_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = nn.functional.cross_entropy(logits, labels)
        self.train_acc(logits, labels)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch
        self.val_acc(self(images), labels)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


EFFECTS = {"train_mode": "train mode", "augmentation": "augment.", "weight_drift": "drift"}


def print_history(history: list[dict[str, Any]], decompose: bool = False) -> None:
    """One line per evaluated epoch: running, clean and their gap (and, decomposed, the three effects summing to it)."""
    header = f"{'epoch':>5} {'running acc':>12} {'clean acc':>10} {'gap':>8}"
    if decompose:
        header += " = " + " + ".join(f"{label:>10}" for label in EFFECTS.values())
    print("\n" + header)
    for entry in history:
        running = entry["running"].get("acc", float("nan"))
        gap = entry["gap"].get("acc", float("nan"))
        line = f"{entry['epoch']:>5} {running:>12.4f} {entry['clean']['acc']:>10.4f} {gap:>+8.4f}"
        if decompose:
            effects = [entry[f"effect/{kind}"].get("acc", float("nan")) for kind in EFFECTS]
            line += " = " + " + ".join(f"{effect:>+10.4f}" for effect in effects)
        print(line)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run with ``count`` intra-op threads, then put the previous number back."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> EvalGuard:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--limit-batches", type=float, default=None, help="clean-pass subset, a fraction in (0, 1]")
    parser.add_argument("--root-dir", type=Path, default=Path("."), help="lightning_logs/ is written here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--decompose", action="store_true", help="split the gap into train mode, augmentation and weight drift"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (this model is too small to gain)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, workers=True, verbose=False)
    guard = EvalGuard(
        {"acc": MulticlassAccuracy(num_classes=10, average="micro")},
        eval_transform="val",  # the validation dataset's transform: normalisation without shifts or noise
        limit_batches=args.limit_batches,
        decompose=args.decompose,  # two extra passes per epoch: train mode, then train mode with augmentation
    )
    logger = TensorBoardLogger(args.root_dir, name="lightning_logs", default_hp_metric=False)
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[guard],
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=not args.quiet,
        enable_model_summary=not args.quiet,
        log_every_n_steps=10,
    )
    with torch_threads(args.threads):
        trainer.fit(DigitsCNN(), datamodule=DigitsData(args.batch_size, args.num_workers, args.seed))

    print_history(guard.history, decompose=args.decompose)
    print(f"\nTensorBoard logs: {logger.log_dir}")
    # The interpreter running this script has tensorboard installed, also when its environment is not activated.
    tensorboard = f"{os.path.relpath(sys.executable)} -m tensorboard.main"
    print(f"Open them with:   {tensorboard} --logdir {Path(args.root_dir) / 'lightning_logs'}")
    print("                  then browse http://localhost:6006 (tab Custom Scalars: running, clean and validation)")
    return guard


if __name__ == "__main__":
    main()
