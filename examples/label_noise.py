"""Which training labels are wrong? EvalGuard's per-sample statistics on digits with 10% of the labels flipped.

The digits example's CNN is trained on scikit-learn's digits with shifts and noise as augmentation, after a tenth of
the training labels were replaced by a different class drawn at random. With ``track_samples=True`` EvalGuard keeps,
for every training sample, the margin of its given label in each clean pass (eval mode, no augmentation). The samples
with the lowest mean margin are the suspects: this prints the ten strongest with their given and predicted labels,
how many of the top k (k = the number of flipped labels) were really flipped, and writes ``data_map.png``.

    python examples/label_noise.py             # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics.classification import MulticlassAccuracy

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `import digits`, also when run from elsewhere

from digits import DigitsCNN, DigitsData, torch_threads

from lightning_evalguard import EvalGuard


def flip_labels(labels: torch.Tensor, rate: float, seed: int, num_classes: int = 10) -> torch.Tensor:
    """Replace a fraction ``rate`` of the labels by a different class drawn uniformly; return the flipped positions.

    Args:
        labels: The labels, changed in place.
        rate: The fraction to flip.
        seed: The seed of the draw.
        num_classes: The number of classes.

    Returns:
        The positions flipped.
    """
    generator = torch.Generator().manual_seed(seed)
    flipped = torch.randperm(len(labels), generator=generator)[: round(rate * len(labels))]
    shift = torch.randint(1, num_classes, (len(flipped),), generator=generator)
    labels[flipped] = (labels[flipped] + shift) % num_classes
    return flipped.sort().values


class NoisyDigits(DigitsData):
    """DigitsData whose training labels are partly flipped (the validation labels stay clean)."""

    def __init__(self, rate: float, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, seed=seed)
        self.rate = rate
        self.flipped = torch.empty(0, dtype=torch.long)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if not len(self.flipped):
            self.flipped = flip_labels(self.train_set.labels, self.rate, self.seed)


def main(argv: list[str] | None = None) -> EvalGuard:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, default=0.1, help="the fraction of training labels flipped")
    parser.add_argument("--max-epochs", type=int, default=20)
    parser.add_argument("--root-dir", type=Path, default=Path("."), help="lightning_logs/ is written here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, workers=True, verbose=False)
    data = NoisyDigits(args.noise, seed=args.seed)
    guard = EvalGuard(
        {"acc": MulticlassAccuracy(num_classes=10, average="micro")},
        eval_transform="val",
        track_samples=True,
        print_summary=not args.quiet,
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
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    with torch_threads(args.threads):
        trainer.fit(DigitsCNN(), datamodule=data)

    assert guard.samples is not None
    flipped = set(data.flipped.tolist())
    k = len(flipped)
    found = sum(row["indices"] in flipped for row in guard.samples.suspects(k))
    print(f"\nThe 10 strongest suspects of {len(guard.samples)} training samples (lowest mean margin):")
    print(f"{'index':>6} {'given':>6} {'predicted':>10} {'mean margin':>12}  flipped?")
    for row in guard.samples.suspects(10):
        mark = "yes" if row["indices"] in flipped else "no"
        print(
            f"{row['indices']:>6} {row['targets']:>6} {row['last_prediction']:>10} {row['mean_margin']:>12.3f}  {mark}"
        )
    print(f"\n{found} of the top {k} suspects are among the {k} flipped labels (precision@{k} = {found / k:.2f}).")
    print(f"samples.csv: {guard.samples_path}\ndata map: {guard.data_map_path}")
    return guard


if __name__ == "__main__":
    main()
