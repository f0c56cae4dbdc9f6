"""The examples run end to end with small arguments and write what they promise."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_digits_example_logs_clean_running_and_gap_to_tensorboard(tmp_path, capsys):
    digits = load("digits")
    guard = digits.main(["--max-epochs", "2", "--root-dir", str(tmp_path), "--quiet", "--limit-batches", "0.5"])
    assert [entry["epoch"] for entry in guard.history] == [0, 1]
    assert set(guard.history[-1]["gap"]) == {"acc"}
    (log_dir,) = (tmp_path / "lightning_logs").iterdir()
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    assert {"evalguard/clean/acc", "evalguard/running/acc", "evalguard/gap/acc", "train_acc", "val_acc"} <= set(
        events.Tags()["scalars"]
    )
    out = capsys.readouterr().out
    assert f"tensorboard --logdir {tmp_path / 'lightning_logs'}" in out
