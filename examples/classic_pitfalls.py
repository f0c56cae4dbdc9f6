"""Why a metric on the training data needs eval mode: a linear model, a Dropout MLP and a BatchNorm MLP.

Each model is trained for a few epochs on scikit-learn's handwritten digits (8x8 images, flattened, no download, no
augmentation) with EvalGuard, which prints, per epoch, the running train accuracy Lightning logs, the clean one
EvalGuard measures, their gap, and the part of the gap that train mode alone accounts for.

Then the trained model measures the training set twice more, changing only what should not matter: the seed, the batch
size and the order of the samples. In eval mode (how EvalGuard measures) both runs agree with each other and with
EvalGuard's clean value. In train mode (``model.train()`` under ``torch.no_grad()``, what a naive "evaluate on the
training set" does) the linear model agrees too, since nothing in it depends on the mode; the Dropout model does not,
because each run drops different units; nor does the BatchNorm model, because each batch is normalised with its own
statistics, so the result depends on which samples share a batch.

    python examples/classic_pitfalls.py       # about 10 seconds on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch

# examples/digits.py: Python puts the script's folder on sys.path, so it imports when this file runs as a script.
from digits import torch_threads
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_evalguard import EvalGuard

NUM_FEATURES, NUM_CLASSES, HIDDEN = 64, 10, 128


@dataclass(frozen=True)
class Pitfall:
    """A model to train, and why its train-mode measurement does (or does not) depend on how it is run."""

    title: str
    build: Callable[[], nn.Module]
    why: str


PITFALLS = {
    "linear": Pitfall(
        "Linear model: Linear(64, 10)",
        lambda: nn.Linear(NUM_FEATURES, NUM_CLASSES),
        "nothing in this model depends on the mode",
    ),
    "dropout": Pitfall(
        "MLP with Dropout: Linear-ReLU-Dropout(0.5)-Linear",
        lambda: nn.Sequential(
            nn.Linear(NUM_FEATURES, HIDDEN), nn.ReLU(), nn.Dropout(0.5), nn.Linear(HIDDEN, NUM_CLASSES)
        ),
        "Dropout drops different units in every run",
    ),
    "batchnorm": Pitfall(
        "MLP with BatchNorm: Linear-BatchNorm-ReLU-Linear",
        lambda: nn.Sequential(
            nn.Linear(NUM_FEATURES, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, NUM_CLASSES)
        ),
        "BatchNorm normalises by each batch's own statistics",
    ),
}

#: The two repeated measurements: only the seed, the batch size and the order of the samples change.
RUNS = ({"seed": 1, "batch_size": 64, "shuffle": False}, {"seed": 2, "batch_size": 16, "shuffle": True})


def accuracy() -> MulticlassAccuracy:
    return MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")


class Classifier(pl.LightningModule):
    """Wraps a network; logs the running ``train_acc`` over each epoch, as a typical LightningModule does."""

    def __init__(self, net: nn.Module, lr: float = 3e-3) -> None:
        super().__init__()
        self.net, self.lr = net, lr
        self.train_acc = accuracy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        self.train_acc(logits, y)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return nn.functional.cross_entropy(logits, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def digits(samples: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened digit images scaled to [0, 1], and their labels."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    return x[:samples], y[:samples]


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train_mode: bool, run: dict[str, Any]) -> float:
    """Accuracy of ``model`` on (x, y) in train or eval mode, under ``torch.no_grad()``, batched as ``run`` says."""
    model = copy.deepcopy(model)  # a forward in train mode updates BatchNorm's running statistics: spare the original
    model.train(train_mode)
    torch.manual_seed(run["seed"])
    order = torch.randperm(len(y)) if run["shuffle"] else torch.arange(len(y))
    metric = accuracy()
    with torch.no_grad():
        # Near-equal batches, so BatchNorm in train mode never meets a batch of one sample.
        for indices in torch.tensor_split(order, math.ceil(len(y) / run["batch_size"])):
            metric.update(model(x[indices]), y[indices])
    return float(metric.compute())


def train(pitfall: Pitfall, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> tuple[nn.Module, EvalGuard]:
    pl.seed_everything(args.seed, verbose=False)
    model = Classifier(pitfall.build())
    guard = EvalGuard(
        {"acc": accuracy()},
        decompose=True,  # also measure in train mode without augmentation: the gap's "train mode" part
        print_summary=False,  # this script prints its own story
    )
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True)
    trainer.fit(model, loader)
    return model, guard


def points(a: float, b: float) -> str:
    return f"{abs(a - b) * 100:.2f} points"


def tell(pitfall: Pitfall, guard: EvalGuard, clean: float, eval_mode: list[float], train_mode: list[float]) -> None:
    print(f"\n{pitfall.title}")
    print(f"  {'epoch':>5} {'running acc':>12} {'clean acc':>10} {'gap':>8}   {'of which train mode':>19}")
    for entry in guard.history:
        running = entry["running"].get("acc", math.nan)
        line = f"  {entry['epoch']:>5} {running:>12.4f} {entry['clean']['acc']:>10.4f} {entry['gap']['acc']:>+8.4f}"
        print(line + f"   {entry['effect/train_mode']['acc']:>+19.4f}")
    print(f"  {'trained model, training set again':<34} {'run 1':>6}  {'run 2':>6}")
    same_eval = eval_mode[0] == eval_mode[1] == clean
    verdict = "identical, and equal to EvalGuard's clean acc" if same_eval else "NOT identical (unexpected)"
    print(f"  {'  eval mode, as EvalGuard':<34} {eval_mode[0]:.4f}  {eval_mode[1]:.4f}   {verdict}")
    if train_mode[0] == train_mode[1]:
        verdict = f"identical: {pitfall.why}"
    else:
        verdict = f"differ by {points(*train_mode)}: {pitfall.why}"
    print(f"  {'  train mode, under no_grad':<34} {train_mode[0]:.4f}  {train_mode[1]:.4f}   {verdict}")


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=None, help="train on the first N digits (default: all 1,797)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (these models are too small to gain)")
    args = parser.parse_args(argv)

    x, y = digits(args.samples)
    print(f"Training each model for {args.max_epochs} epochs on {len(y)} digits, with EvalGuard (no augmentation).")
    print("gap = clean - running. 'of which train mode': the part due to Dropout/BatchNorm being in train mode;")
    print("the rest comes from the weights moving during the epoch (the running acc averages over all of them).")
    print("Then each trained model measures its training set twice more, in eval mode and in train mode (model.train()")
    print("under torch.no_grad()): run 1 with seed 1 and batches of 64 in order, run 2 with seed 2 and batches of 16")
    print("shuffled. Eval mode gives the same number however it is run; train mode does not once there is Dropout")
    print("or BatchNorm.")
    results: dict[str, dict[str, Any]] = {}
    with torch_threads(args.threads):
        for name, pitfall in PITFALLS.items():
            model, guard = train(pitfall, x, y, args)
            clean = guard.history[-1]["clean"]["acc"]
            eval_mode = [measure(model, x, y, train_mode=False, run=run) for run in RUNS]
            train_mode = [measure(model, x, y, train_mode=True, run=run) for run in RUNS]
            tell(pitfall, guard, clean, eval_mode, train_mode)
            results[name] = {"history": guard.history, "clean": clean, "eval_mode": eval_mode, "train_mode": train_mode}
    return results


if __name__ == "__main__":
    # Not Lightning's banner ("GPU available: ...") once per model. With pytorch_lightning installed, Lightning's
    # info messages go through its logger, whichever package the Trainer comes from.
    for logger_name in ("lightning.pytorch", "pytorch_lightning"):
        logging.getLogger(logger_name).setLevel(logging.WARNING)
    main()
