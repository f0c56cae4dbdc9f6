"""The examples run end to end with small arguments and write what they promise."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_evalguard import EvalGuard

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
    assert f"-m tensorboard.main --logdir {tmp_path / 'lightning_logs'}" in out


EFFECTS = ("train_mode", "augmentation", "weight_drift")


def test_digits_example_decompose_splits_the_gap_into_three_effects(tmp_path, capsys):
    digits = load("digits")
    args = ["--max-epochs", "2", "--root-dir", str(tmp_path), "--quiet", "--limit-batches", "0.25", "--decompose"]
    guard = digits.main(args)
    assert guard.decompose is True
    for entry in guard.history:
        total = sum(entry[f"effect/{kind}"]["acc"] for kind in EFFECTS)
        assert total == pytest.approx(entry["gap"]["acc"], abs=1e-5)
    # The CNN has Dropout and BatchNorm and its dataset augments: neither effect vanishes.
    assert all(entry["effect/train_mode"]["acc"] != 0.0 for entry in guard.history)
    assert all(entry["effect/augmentation"]["acc"] != 0.0 for entry in guard.history)
    (log_dir,) = (tmp_path / "lightning_logs").iterdir()
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    assert {f"evalguard/effect/{kind}/acc" for kind in EFFECTS} <= set(events.Tags()["scalars"])
    out = capsys.readouterr().out
    assert "gap =" in out and "train mode +" in out


def test_classic_pitfalls_clean_is_reproducible_and_train_mode_is_not(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as `python examples/classic_pitfalls.py` does, for `import digits`
    pitfalls = load("classic_pitfalls")
    results = pitfalls.main(["--max-epochs", "2", "--samples", "400", "--batch-size", "40"])
    assert set(results) == {"linear", "dropout", "batchnorm"}
    for name, result in results.items():
        assert [entry["epoch"] for entry in result["history"]] == [0, 1], name
        # Eval mode: the same value under another seed, batch size and order, and the value EvalGuard logged.
        assert result["eval_mode"][0] == result["eval_mode"][1] == result["clean"], name
    linear, dropout, batchnorm = results["linear"], results["dropout"], results["batchnorm"]
    # Nothing in a linear model depends on the mode.
    assert linear["train_mode"] == linear["eval_mode"]
    assert all(entry["effect/train_mode"]["acc"] == 0.0 for entry in linear["history"])
    # Dropout: a different value every run, and below the clean one.
    assert dropout["train_mode"][0] != dropout["train_mode"][1]
    assert max(dropout["train_mode"]) < dropout["clean"]
    assert any(entry["effect/train_mode"]["acc"] != 0.0 for entry in dropout["history"])
    # BatchNorm on batch statistics: the value depends on how the samples are batched.
    assert batchnorm["train_mode"][0] != batchnorm["train_mode"][1]
    assert any(entry["effect/train_mode"]["acc"] != 0.0 for entry in batchnorm["history"])
    out = capsys.readouterr().out
    assert out.count("identical, and equal to EvalGuard's clean acc") == 3
    assert "identical: nothing in this model depends on the mode" in out
    assert out.count("differ by") == 2


def test_cli_example_configures_evalguard_and_its_metrics_in_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)  # as documented: run from the repository root
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as `python examples/cli.py` does, so that `import digits` works
    monkeypatch.setattr(sys, "argv", ["examples/cli.py"])  # pytest's own arguments are not the CLI's
    cli_example = load("cli")
    args = ["fit", "--config", "examples/config.yaml", "--trainer.max_epochs=1"]
    args += [f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    cli = cli_example.main(args)
    (guard,) = [callback for callback in cli.trainer.callbacks if isinstance(callback, EvalGuard)]
    (configured,) = cli.config.fit.trainer.callbacks
    assert configured.init_args.metrics["acc"].class_path == "torchmetrics.classification.MulticlassAccuracy"
    assert guard.metric_names == ["acc"]
    assert (guard.eval_transform, guard.limit_batches, guard.every_n_epochs) == ("val", 0.5, 1)
    assert [entry["epoch"] for entry in guard.history] == [0]
    assert 0.0 <= guard.history[0]["clean"]["acc"] <= 1.0 and set(guard.history[0]["gap"]) == {"acc"}
    (log_dir,) = (tmp_path / "lightning_logs").iterdir()
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    assert {"evalguard/clean/acc", "evalguard/running/acc", "evalguard/gap/acc"} <= set(events.Tags()["scalars"])


def test_cli_takes_limit_batches_auto_and_target_stderr_from_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(sys, "argv", ["examples/cli.py"])
    config = (EXAMPLES / "config.yaml").read_text()
    assert "        limit_batches: 0.5\n" in config
    config = config.replace(
        "        limit_batches: 0.5\n", "        limit_batches: auto\n        target_stderr: 0.05\n"
    )
    (tmp_path / "auto.yaml").write_text(config)
    args = ["fit", "--config", str(tmp_path / "auto.yaml"), "--trainer.max_epochs=1"]
    args += [f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    cli = load("cli").main(args)
    (guard,) = [callback for callback in cli.trainer.callbacks if isinstance(callback, EvalGuard)]
    assert (guard.limit_batches, guard.target_stderr) == ("auto", 0.05)
    from lightning_evalguard.sampling import auto_sample_size

    population = len(cli.datamodule.train_set)
    assert guard.history[0]["n"] == auto_sample_size(population, 0.05) < population


def test_auto_subset_benchmark_runs_and_reports_coverage(capsys):
    spec = importlib.util.spec_from_file_location("bench_auto", EXAMPLES.parent / "benchmarks" / "auto_subset.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--quick", "--samples", "3000"])
    out = capsys.readouterr().out
    assert "total: auto" in out and out.count("), coverage ") == 2


def test_label_noise_example_names_the_suspects_and_finds_flipped_labels(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as `python examples/label_noise.py` does, for `import digits`
    label_noise = load("label_noise")
    guard = label_noise.main(["--max-epochs", "4", "--root-dir", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert "The 10 strongest suspects of 1437 training samples (lowest mean margin):" in out
    found = int(out.split(" of the top 144 suspects are among the 144 flipped labels")[0].rsplit("\n", 1)[-1])
    assert found >= 100  # already after 4 epochs most flipped labels are among the suspects
    assert guard.samples_path is not None and guard.samples_path.is_file()
    assert guard.data_map_path is not None and guard.data_map_path.is_file()
