"""How well EvalGuard's per-sample statistics find flipped labels: digits with symmetric label noise.

For each noise rate (10%, 20% of the training labels replaced by a different class drawn uniformly) and seed, the
digits example's CNN and augmentation train for 30 epochs with ``EvalGuard(track_samples=True)``. Three rankings of
the training samples are scored against the flipped labels:

- ``clean AUM``: EvalGuard's ``mean_margin`` (the margin of the given label on clean, eval-mode outputs, averaged over
  passes), lowest first;
- ``train AUM``: the margin averaged over training steps, in train mode on augmented inputs (AUM as published), from
  ``training_step`` outputs in the same runs;
- ``last margin``: the last clean pass's margin alone.

Reported per rate, averaged over seeds: precision@k (k = the number of flipped labels), the recall of the flipped
labels in the top 2k, and the AUROC of the negated score for telling flipped from clean labels. Targets for clean AUM:
precision@k >= 0.90 and AUROC >= 0.98 at both rates. Also the clean-pass time with and without tracking (target:
tracking adds at most 5%).

    python benchmarks/label_noise.py            # about 10 minutes on 2 CPU cores
    python benchmarks/label_noise.py --quick    # 1 seed, 10 epochs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from digits import Digits, DigitsCNN, torch_threads
from label_noise import NoisyDigits

from lightning_evalguard import EvalGuard


class IndexedDigits(Digits):
    """Digits that also give each sample's dataset index, for the train-mode AUM."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image, label = super().__getitem__(index)
        return image, label, index


class IndexedNoisyDigits(NoisyDigits):
    def setup(self, stage: str) -> None:
        super().setup(stage)
        train = self.train_set
        self.train_set = IndexedDigits(train.images, train.labels, train.transform)


class TrainAUM(DigitsCNN):
    """DigitsCNN that accumulates, per dataset index, the margin of its training steps (train mode, augmented)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.margin_sum = torch.zeros(size, dtype=torch.float64)
        self.margin_count = torch.zeros(size, dtype=torch.float64)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels, indices = batch
        loss = super().training_step((images, labels), batch_idx)
        with torch.no_grad():
            logits = self(images).double()  # the same train-mode forward as the step's, on the same augmented batch
            given = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
            others = logits.scatter(1, labels.unsqueeze(1), float("-inf")).amax(1)
            self.margin_sum.index_add_(0, indices.cpu(), (given - others).cpu())
            self.margin_count.index_add_(0, indices.cpu(), torch.ones(len(indices), dtype=torch.float64))
        return loss


def scores(ranking: torch.Tensor, flipped: torch.Tensor) -> tuple[float, float, float]:
    """precision@k, recall in the top 2k and AUROC of ``-ranking`` (low score = suspect) for the flipped samples."""
    k = len(flipped)
    is_flipped = torch.zeros(len(ranking), dtype=torch.bool)
    is_flipped[flipped] = True
    order = ranking.argsort()
    precision = is_flipped[order[:k]].double().mean().item()
    recall = is_flipped[order[: 2 * k]].double().sum().item() / k
    auroc = float(roc_auc_score(is_flipped.numpy(), (-ranking).numpy()))
    return precision, recall, auroc


def run(rate: float, seed: int, epochs: int, track: bool) -> dict[str, Any]:
    pl.seed_everything(seed, workers=True, verbose=False)
    data = IndexedNoisyDigits(rate, seed=seed)
    data.setup("fit")
    model = TrainAUM(len(data.train_set))
    guard = EvalGuard(
        {"acc": MulticlassAccuracy(num_classes=10, average="micro")},
        eval_transform="val",
        track_samples=track,
        print_summary=False,
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tempfile.mkdtemp(prefix="label_noise-"),  # samples.csv goes there, not into the cwd
    )
    train = DataLoader(data.train_set, batch_size=64, shuffle=True)
    val = DataLoader(data.val_set, batch_size=256)
    trainer.fit(model, train, val)
    result: dict[str, Any] = {"pass_seconds": [entry["time"]["pass_seconds"] for entry in guard.history]}
    if track:
        assert guard.samples is not None
        flipped = data.flipped
        result["clean AUM"] = scores(guard.samples.mean_margin.double(), flipped)
        result["train AUM"] = scores(model.margin_sum / model.margin_count.clamp(min=1), flipped)
        result["last margin"] = scores(guard.samples.last_margin.double(), flipped)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="1 seed, 10 epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = args.seeds[:1], 10
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    print(f"digits, {args.epochs} epochs, seeds {args.seeds}, torch {torch.__version__}, lightning {pl.__version__}")
    rankings = ("clean AUM", "train AUM", "last margin")
    table: list[tuple[float, str, float, float, float]] = []
    timing: dict[bool, list[float]] = {True: [], False: []}
    with torch_threads(1):
        for rate in args.rates:
            results = []
            for seed in args.seeds:  # tracked and untracked fits alternate: the machine's drift hits both alike
                results.append(run(rate, seed, args.epochs, track=True))
                timing[True] += results[-1]["pass_seconds"][1:]
                timing[False] += run(rate, seed, args.epochs, track=False)["pass_seconds"][1:]
            for name in rankings:
                columns = list(zip(*(result[name] for result in results), strict=True))
                table.append((rate, name, *(statistics.mean(column) for column in columns)))  # type: ignore[arg-type]
    print(f"\n{'noise':>6} {'ranking':<12} {'precision@k':>12} {'recall@2k':>10} {'AUROC':>7}")
    for rate, name, precision, recall, auroc in table:
        print(f"{rate:>6.0%} {name:<12} {precision:>12.3f} {recall:>10.3f} {auroc:>7.3f}")
    tracked, plain = statistics.median(timing[True]), statistics.median(timing[False])
    print(
        f"\nclean-pass time (median over epochs after the first): {plain * 1000:.1f} ms without tracking,"
        f" {tracked * 1000:.1f} ms with ({tracked / plain - 1:+.1%})"
    )
    for rate, name, precision, _, auroc in table:
        if name == "clean AUM":
            verdict = "ok" if precision >= 0.90 and auroc >= 0.98 else "MISSED"
            print(f"target at {rate:.0%} (precision@k >= 0.90, AUROC >= 0.98): {verdict}")
    print(f"tracking adds <= 5%: {'ok' if tracked <= 1.05 * plain else 'MISSED'}")
    print(f"total wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
