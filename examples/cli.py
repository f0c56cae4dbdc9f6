"""EvalGuard from a LightningCLI config: the digits CNN of ``digits.py``, with EvalGuard and its metrics set in YAML.

``config.yaml`` adds EvalGuard to ``trainer.callbacks`` by its class path, with its torchmetrics metrics given by
class path too; nothing about EvalGuard is written in Python. Run from the repository root:

    python examples/cli.py fit --config examples/config.yaml
    python examples/cli.py fit --config examples/config.yaml --trainer.max_epochs=3 --model.dropout=0.2
    tensorboard --logdir lightning_logs

The same works from the command line alone, e.g.
``--trainer.callbacks+=lightning_evalguard.EvalGuard --trainer.callbacks.metrics='{"acc": {"class_path":
"torchmetrics.classification.MulticlassAccuracy", "init_args": {"num_classes": 10}}}'``.
"""

from __future__ import annotations

from lightning.pytorch.cli import ArgsType, LightningCLI

# isort: split
# examples/digits.py: Python puts the script's folder on sys.path, so it imports when this file runs as a script.
from digits import DigitsCNN, DigitsData, torch_threads


def main(args: ArgsType = None) -> LightningCLI:
    with torch_threads(1):  # the model is too small to gain from more threads
        return LightningCLI(DigitsCNN, DigitsData, args=args)


if __name__ == "__main__":
    main()
