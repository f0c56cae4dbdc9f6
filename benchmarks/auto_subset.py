"""limit_batches="auto": how many clean samples it evaluates, what it saves, and whether its error bars hold.

Not a test: it prints a table. On 50,000 synthetic samples (64 features, 10 classes from a fixed random linear map
with 10% of the labels redrawn, generated once from seed 0) an MLP trains for 10 epochs twice, identically seeded:
once with ``EvalGuard(limit_batches="auto", target_stderr=0.005)`` and once with a full clean pass every epoch. It
reports, per epoch, the samples each evaluated and the clean-pass time (``<prefix>/time/pass_seconds``), and the
totals.

Coverage: the full fit's final weights are then frozen (a module whose ``training_step`` returns None: no step), and
for each of ``--draws`` seeds (default 200) a two-epoch fit with ``EvalGuard(limit_batches="auto", seed=seed)`` draws
a subset at the first pass (p = 0.5 assumed) and one sized from it at the second. A draw is covered when its clean
accuracy lies within 2 of EvalGuard's reported standard errors (``<prefix>/stderr/acc``) of the full-pass accuracy
of the same weights. Target: coverage >= 0.93 at both sizes.

    python benchmarks/auto_subset.py            # about 6 minutes on 2 cores
    python benchmarks/auto_subset.py --quick    # 20 draws, 3 epochs
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_evalguard import EvalGuard, EvalGuardWarning

NUM_CLASSES = 10
FEATURES = 64


class Synthetic(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Gaussian features, labels from a fixed random linear map, a tenth of them redrawn (so accuracy stays < 1)."""

    def __init__(self, size: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(size, FEATURES, generator=generator)
        weights = torch.randn(FEATURES, NUM_CLASSES, generator=generator)
        self.y = (self.x @ weights).argmax(1)
        noisy = torch.rand(size, generator=generator) < 0.1
        self.y[noisy] = torch.randint(0, NUM_CLASSES, (int(noisy.sum()),), generator=generator)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


class MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(FEATURES, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, NUM_CLASSES))
        self.train_acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        logits = self(x)
        self.train_acc(logits, y)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return nn.functional.cross_entropy(logits, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class Frozen(MLP):
    """The same model that never steps: every pass measures the same weights."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        super().training_step(batch, batch_idx)  # logs train_acc
        return None  # no backward, no step


def fit(model: MLP, data: Synthetic, epochs: int, guard: EvalGuard, train_batches: int | float = 1.0) -> None:
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=train_batches,
    )
    trainer.fit(model, DataLoader(data, batch_size=256, shuffle=True))


def accuracy_guard(**kwargs: Any) -> EvalGuard:
    metrics = {"acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")}
    return EvalGuard(metrics, batch_size=1024, print_summary=False, **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--target-stderr", type=float, default=0.005)
    parser.add_argument("--quick", action="store_true", help="20 draws, 3 epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.draws, args.epochs = 20, 3
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("error", category=EvalGuardWarning)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    data = Synthetic(args.samples)
    print(
        f"{args.samples} samples, {args.epochs} epochs, target_stderr={args.target_stderr},"
        f" torch {torch.__version__}, lightning {pl.__version__}"
    )

    runs: dict[str, EvalGuard] = {}
    models: dict[str, MLP] = {}
    for name, limit in (("auto", "auto"), ("full", None)):
        pl.seed_everything(0, verbose=False)
        models[name] = MLP()
        extra = {"target_stderr": args.target_stderr} if limit == "auto" else {}
        runs[name] = accuracy_guard(limit_batches=limit, **extra)
        fit(models[name], data, args.epochs, runs[name])

    columns = ("auto n", "auto acc", "stderr", "auto s", "full n", "full acc", "full s")
    print(f"\n{'epoch':>5} " + " ".join(f"{column:>9}" for column in columns))
    auto_total = full_total = 0.0
    auto_samples = 0
    for auto, full in zip(runs["auto"].history, runs["full"].history, strict=True):
        n = auto.get("n", args.samples)
        stderr = auto.get("stderr", {}).get("acc", 0.0)
        auto_seconds, full_seconds = auto["time"]["pass_seconds"], full["time"]["pass_seconds"]
        auto_total, full_total, auto_samples = auto_total + auto_seconds, full_total + full_seconds, auto_samples + n
        print(
            f"{auto['epoch']:>5} {n:>9} {auto['clean']['acc']:>9.4f} {stderr:>9.4f} {auto_seconds:>9.3f}"
            f" {args.samples:>9} {full['clean']['acc']:>9.4f} {full_seconds:>9.3f}"
        )
    print(
        f"total: auto {auto_samples} samples in {auto_total:.2f} s, full {args.samples * args.epochs} samples in"
        f" {full_total:.2f} s ({auto_total / full_total:.2f} of the time)"
    )

    frozen = Frozen()
    frozen.load_state_dict(models["full"].state_dict())
    reference = accuracy_guard()
    fit(frozen, data, 1, reference, train_batches=1)
    truth = reference.history[-1]["clean"]["acc"]
    covered: list[list[bool]] = [[], []]
    sizes: list[list[int]] = [[], []]
    for seed in range(args.draws):
        guard = accuracy_guard(limit_batches="auto", target_stderr=args.target_stderr, seed=seed)
        model = Frozen()
        model.load_state_dict(models["full"].state_dict())
        fit(model, data, 2, guard, train_batches=1)
        for index, entry in enumerate(guard.history):
            sizes[index].append(entry["n"])
            covered[index].append(abs(entry["clean"]["acc"] - truth) <= 2 * entry["stderr"]["acc"])
    print(f"\ncoverage at fixed weights (full-pass accuracy {truth:.4f}), {args.draws} seeded draws:")
    for index, label in enumerate(("first pass (p = 0.5 assumed)", "second pass (sized from the first)")):
        rate = sum(covered[index]) / len(covered[index])
        low, high = min(sizes[index]), max(sizes[index])
        span = f"{low}-{high}" if low != high else str(low)
        verdict = "ok" if rate >= 0.93 else "MISSED"
        print(f"  {label}: n = {span} (median {statistics.median(sizes[index]):.0f}), coverage {rate:.3f} ({verdict})")
    print(f"total wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
