"""Run by tests/test_sharded.py: a 2-rank ddp_fork fit whose model all-reduces in every forward, as FSDP's
all-gather does. A rank that made fewer forwards than the other would leave it waiting forever.

Usage: python ddp_collective_script.py OUT_DIR N BATCH_SIZE LIMIT DECOMPOSE CACHE [opaque]
(LIMIT: "none", an int number of batches or a float fraction; DECOMPOSE, CACHE: 0 or 1; "opaque": batches carry an
object with its own ``to``, which the cache cannot copy; "track": track_samples=True, each rank's statistics and each
epoch's eval logits are written)
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning_evalguard import EvalGuard

from helpers import (
    NUM_CLASSES,
    NUM_FEATURES,
    Classifier,
    CountSamples,
    TensorData,
    loader,
    make_tensors,
    micro_accuracy,
)


class AllReduce(nn.Module):
    """Takes part in one collective per forward call, like an FSDP unit gathering its parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(torch.ones(1))
        return x


class Collective(Classifier):
    """Counts its forwards while EvalGuard runs (fit start and each epoch end)."""

    def __init__(self) -> None:
        super().__init__("linear")
        self.net = nn.Sequential(AllReduce(), nn.Linear(NUM_FEATURES, NUM_CLASSES))
        self.counting: str | None = None
        self.forwards: dict[str, int] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.counting is not None:
            self.forwards[self.counting] = self.forwards.get(self.counting, 0) + 1
        return super().forward(x)


class Count(pl.Callback):
    """Placed before EvalGuard: counts the forwards of what follows in the same hook."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        pl_module.counting = "start"

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        pl_module.counting = f"epoch{trainer.current_epoch}"


class Stop(pl.Callback):
    """Placed after EvalGuard: stops counting, and writes this rank's counts at the end."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        pl_module.counting = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        pl_module.counting = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        (self.out / f"forwards{trainer.global_rank}.json").write_text(json.dumps(pl_module.forwards))
        guard = next(callback for callback in trainer.callbacks if isinstance(callback, EvalGuard))
        if guard.samples is not None:
            torch.save(guard.samples.to_dict(), self.out / f"samples{trainer.global_rank}.pt")


class Logits(pl.Callback):
    """After EvalGuard: each epoch's eval logits of every sample, from this rank's weights (the Linear alone: no
    collective)."""

    def __init__(self, out: Path, x: torch.Tensor) -> None:
        self.out, self.x, self.logits = out, x, []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        with torch.no_grad():
            self.logits.append(pl_module.net[1](self.x).double())

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        torch.save(torch.stack(self.logits), self.out / f"logits{trainer.global_rank}.pt")


class Meta:
    """An object with its own ``to`` in every batch: the cache cannot copy it."""

    def to(self, device: Any) -> Meta:
        return self

    def __eq__(self, other: object) -> bool:  # the same every draw: not augmentation
        return isinstance(other, Meta)

    __hash__ = object.__hash__


def with_meta(items: list[Any]) -> tuple[Any, ...]:
    x, y = torch.utils.data.default_collate(items)
    return x, y, Meta()


def main() -> None:
    out, n, batch_size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    limit_arg, decompose, cache = sys.argv[4], sys.argv[5] == "1", sys.argv[6] == "1"
    limit: Any = None if limit_arg == "none" else (float(limit_arg) if "." in limit_arg else int(limit_arg))
    extras = set(sys.argv[7:])
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    x, y = make_tensors(n)
    guard = EvalGuard(
        {"acc": micro_accuracy(), "n": CountSamples()},
        eval_transform=nn.Identity(),
        batch_size=batch_size,
        limit_batches=limit,
        decompose=decompose,
        cache=cache,
        print_summary=False,
        track_samples="track" in extras,
    )
    trainer = pl.Trainer(
        default_root_dir=out,
        max_epochs=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Count(), guard, Stop(out), Logits(out, x)],
    )
    model = Collective()
    opaque = "opaque" in extras
    trainer.fit(model, loader(TensorData(x, y), batch_size=8, collate_fn=with_meta if opaque else None))
    torch.save(model.state_dict(), out / "weights.pt")
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    (out / "metrics.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    main()
