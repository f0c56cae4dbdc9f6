"""The ``report`` command reads EvalGuard's scalars back from event files: per-epoch tables, readings, figure, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard import SummaryWriter
from torchmetrics.classification import MulticlassAccuracy

from lightning_evalguard import EvalGuard
from lightning_evalguard.report import load_runs, main, parse_scalars
from lightning_evalguard.summary import format_value, reading

from helpers import NUM_CLASSES, Classifier, TensorData, loader, make_tensors, trainer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def f32(value: float) -> float:
    """What a value becomes once TensorBoard has stored it."""
    return float(np.float32(value))


def table_rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """A real two-epoch fit with EvalGuard and a TensorBoardLogger: (its save_dir, the guard's history)."""
    root = tmp_path_factory.mktemp("fit")
    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")})
    x, y = make_tensors(40)
    fit = trainer(root, max_epochs=2, callbacks=[guard], logger=TensorBoardLogger(root))
    fit.fit(Classifier("both"), loader(TensorData(x, y)))
    return root, guard.history


# Per epoch: running, clean, gap, generalization, and the three effects of "evalguard/acc".
SYNTHETIC = {
    0: (0.5, 0.6, 0.1, 0.08, 0.03, 0.05, 0.02),
    1: (0.625, 0.75, 0.125, 0.0625, 0.025, 0.0875, 0.0125),
}


def write_synthetic(root: Path) -> Path:
    """Two runs written directly: ``a`` with two prefixes, effects and generalization; ``b`` without ``epoch``."""
    run_a = SummaryWriter(str(root / "runs" / "a"))
    for epoch, (running, clean, gap, generalization, train_mode, augmentation, drift) in SYNTHETIC.items():
        step = 3 * epoch + 2
        run_a.add_scalar("epoch", epoch, step)
        run_a.add_scalar("train_acc", running, step)
        run_a.add_scalar("evalguard/running/acc", running, step)
        run_a.add_scalar("evalguard/clean/acc", clean, step)
        run_a.add_scalar("evalguard/gap/acc", gap, step)
        run_a.add_scalar("evalguard/generalization/acc", generalization, step)
        run_a.add_scalar("evalguard/effect/train_mode/acc", train_mode, step)
        run_a.add_scalar("evalguard/effect/augmentation/acc", augmentation, step)
        run_a.add_scalar("evalguard/effect/weight_drift/acc", drift, step)
        run_a.add_scalar("evalguard/time/pass_seconds", 1.25, step)
        run_a.add_scalar("evalguard/stderr/acc", 0.01, step)
        run_a.add_scalar("eg2/clean/loaderA/acc", 0.25 + epoch, step)
        run_a.add_scalar("eg2/running/loaderA/acc", 0.5 + epoch, step)
        run_a.add_scalar("eg2/gap/loaderA/acc", -0.25, step)
        run_a.add_scalar("eg2/clean/acc/3", 0.375, step)  # a vector element, no running metric
    run_a.close()
    run_b = SummaryWriter(str(root / "runs" / "b"))
    run_b.add_scalar("evalguard/clean/acc", 0.875, 7)
    run_b.add_scalar("evalguard/running/acc", 0.75, 7)
    run_b.add_scalar("evalguard/gap/acc", 0.125, 7)
    run_b.close()
    return root / "runs"


def test_report_prints_each_epoch_of_a_real_fit_and_the_last_reading(fitted, capsys):
    root, history = fitted
    assert main(["report", str(root)]) == 0
    out = capsys.readouterr().out
    assert "run lightning_logs/version_0" in out
    assert "evalguard: acc" in out
    rows = table_rows(out)
    assert ["epoch", "running", "clean", "gap"] in rows
    for entry in history:
        values = [format_value(f32(entry[kind]["acc"])) for kind in ("running", "clean", "gap")]
        assert [str(entry["epoch"]), *values] in rows
    last = history[-1]
    sentence = reading("acc", f32(last["running"]["acc"]), f32(last["clean"]["acc"]))
    assert f"reading at epoch {last['epoch']}: {sentence}" in out


def test_report_shows_validation_effects_several_prefixes_and_runs(tmp_path, capsys):
    logdir = write_synthetic(tmp_path)
    assert main(["report", str(logdir)]) == 0
    out = capsys.readouterr().out
    assert out.index("run a\n") < out.index("run b\n")
    runs = load_runs(logdir)
    assert [(run.path, [f"{m.prefix}/{m.name}" for m in run.metrics]) for run in runs] == [
        ("a", ["evalguard/acc", "eg2/loaderA/acc", "eg2/acc/3"]),
        ("b", ["evalguard/acc"]),
    ]
    assert "evalguard: acc" in out and "eg2: loaderA/acc" in out and "eg2: acc/3" in out
    rows = table_rows(out)
    header = ["epoch", "running", "clean", "gap", "stderr", "validation", "generalization"]
    header += ["effect/train_mode", "effect/augmentation", "effect/weight_drift"]
    assert header in rows
    for epoch, (running, clean, gap, generalization, *effects) in SYNTHETIC.items():
        validation = f32(clean) - f32(generalization)
        values = [running, clean, gap, 0.01, validation, generalization, *effects]
        assert [str(epoch), *(format_value(f32(value)) for value in values)] in rows
    running, clean, _, generalization, train_mode, augmentation, drift = SYNTHETIC[1]
    effects = {"train_mode": f32(train_mode), "augmentation": f32(augmentation), "weight_drift": f32(drift)}
    sentence = reading("acc", f32(running), f32(clean), effects, f32(clean) - f32(generalization), f32(0.01))
    assert "of them come from augmentation" in sentence and "generalization gap" in sentence
    assert "standard errors: real" in sentence  # a gap of several points against a standard error of 1 point
    assert f"reading at epoch 1: {sentence}" in out
    # the second prefix, with a name containing "/", and a metric without a running value
    assert ["1", "1.5000", "1.2500", "-0.2500"] in rows
    assert f"reading at epoch 1: {reading('loaderA/acc', 1.5, 1.25)}" in out
    assert ["epoch", "clean"] in rows and ["0", "0.3750"] in rows
    assert f"reading at epoch 1: {reading('acc/3', None, 0.375)}" in out
    # run b has no epoch scalar: the step is shown instead
    assert ["step", "running", "clean", "gap"] in rows and ["7", "0.7500", "0.8750", "0.1250"] in rows
    assert "pass_seconds" not in out and "train_acc" not in out


def test_parse_scalars_splits_prefix_group_and_slashed_names_and_derives_validation():
    scalars = {
        "epoch": [(2, 0.0), (5, 1.0)],
        "g/sub/clean/acc/3": [(2, 0.5), (5, 0.75)],
        "g/sub/generalization/acc/3": [(5, 0.25)],
        "g/clean/x": [(5, 0.125)],
        "g/effect/augmentation/x": [(5, 0.5)],
        "g/unknown/x": [(5, 9.0)],
        "val/loss": [(5, 1.0)],
    }
    metrics = parse_scalars(scalars)
    assert [(metric.prefix, metric.name) for metric in metrics] == [("g/sub", "acc/3"), ("g", "x")]
    sub, plain = metrics
    assert [(row.step, row.epoch) for row in sub.rows] == [(2, 0), (5, 1)]
    assert sub.rows[1].values == {"clean": 0.75, "generalization": 0.25, "validation": 0.5}
    assert sub.groups == ["clean", "validation", "generalization"]
    assert plain.rows[0].values == {"clean": 0.125, "effect/augmentation": 0.5}
    assert parse_scalars({"epoch": [(1, 0.0)], "loss": [(1, 2.0)]}) == ()


def test_png_is_written_with_a_row_per_metric(tmp_path, capsys):
    logdir = write_synthetic(tmp_path)
    png = tmp_path / "report.png"
    assert main(["report", str(logdir), "--png", str(png)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_python_dash_m_runs_the_report(fitted):
    root, _ = fitted
    result = subprocess.run(
        [sys.executable, "-m", "lightning_evalguard", "report", str(root)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "evalguard: acc" in result.stdout and "reading at epoch 1:" in result.stdout


def test_console_script_points_at_main():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["evalguard"] == "lightning_evalguard.report:main"
    assert project["optional-dependencies"]["plot"] == ["matplotlib>=3.7"]


def test_the_installed_evalguard_command_runs_the_report(fitted):
    script = Path(sys.executable).parent / "evalguard"  # installed next to the interpreter by `pip install`
    assert script.exists(), "the evalguard console script is not installed: pip install -e ."
    root, _ = fitted
    result = subprocess.run([str(script), "report", str(root)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "evalguard: acc" in result.stdout


def _a_file(path: Path) -> Path:
    path.write_text("not a log directory")
    return path


def _only_tags_that_are_not_evalguard(path: Path) -> Path:
    writer = SummaryWriter(str(path / "version_0"))
    writer.add_scalar("loss", 1.0, 0)
    writer.add_scalar("val/clean_acc", 0.5, 0)
    writer.close()
    return path


@pytest.mark.parametrize(
    ("make_logdir", "message"),
    [
        (lambda tmp: tmp / "missing", "does not exist"),
        (lambda tmp: tmp, "no TensorBoard event files"),
        (lambda tmp: _a_file(tmp / "file.txt"), "is not a directory"),
        (_only_tags_that_are_not_evalguard, "no EvalGuard scalars ('<prefix>/clean/<name>')"),
    ],
    ids=["missing", "empty", "a-file", "no-evalguard-tags"],
)
def test_an_unusable_logdir_exits_2_with_one_line_and_no_traceback(tmp_path, capsys, make_logdir, message):
    logdir = make_logdir(tmp_path)
    assert main(["report", str(logdir)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("evalguard: ") and message in lines[0]
    assert "Traceback" not in captured.err


def test_the_message_for_foreign_logs_lists_the_tags_found(tmp_path, capsys):
    main(["report", str(_only_tags_that_are_not_evalguard(tmp_path))])
    assert "scalars found: loss, val/clean_acc" in capsys.readouterr().err


def test_png_without_matplotlib_exits_2_before_printing(tmp_path, capsys, monkeypatch):
    logdir = write_synthetic(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    png = tmp_path / "report.png"
    assert main(["report", str(logdir), "--png", str(png)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not png.exists()
    assert captured.err.count("\n") == 1 and "lightning-evalguard[plot]" in captured.err


def test_png_in_a_missing_directory_exits_2_with_one_line(tmp_path, capsys):
    logdir = write_synthetic(tmp_path)
    assert main(["report", str(logdir), "--png", str(tmp_path / "no" / "such" / "dir.png")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("evalguard: cannot write --png") and "directory does not exist" in captured.err


def test_the_report_lists_the_suspects_of_a_run_that_tracked_samples_and_draws_its_data_map(tmp_path, capsys):
    root = tmp_path / "logs"
    x, y = make_tensors(40)
    guard = EvalGuard(
        {"acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")}, track_samples=True, print_summary=False
    )
    trainer(root, max_epochs=2, callbacks=[guard], logger=TensorBoardLogger(root)).fit(
        Classifier("linear"), loader(TensorData(x, y))
    )
    assert guard.samples is not None
    png = tmp_path / "report.png"
    assert main(["report", str(root), "--suspects", "3", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "suspects: the 3 lowest mean margins of 40 samples (samples.csv)" in out
    header = next(line for line in out.splitlines() if line.startswith("index"))
    assert header.split()[:3] == ["index", "given", "predicted"]
    listed = [int(line.split()[0]) for line in out.splitlines()[out.splitlines().index(header) + 1 :][:3]]
    assert listed == [row["indices"] for row in guard.samples.suspects(3)]
    data_map = tmp_path / "report-data_map.png"
    assert data_map.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}, {data_map}" in out


@pytest.mark.parametrize("logger_prefix", ["", "p"])  # TensorBoardLogger(prefix="p") logs "p-evalguard/..."
def test_the_report_words_a_gap_with_the_metric_info_the_fit_wrote(tmp_path, capsys, logger_prefix):
    from lightning.pytorch.loggers import TensorBoardLogger
    from torchmetrics.regression import MeanSquaredError

    def small(module: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = 0.1 * module(batch[0])[:, :1]
        return outputs, torch.zeros_like(outputs)  # an MSE well inside [0, 1], which is not a fraction

    class LogsMSE(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            preds, target = small(self, batch)
            self.log("train_mse", (preds - target).square().mean(), on_step=False, on_epoch=True)
            return super().training_step(batch, batch_idx)

    x, y = make_tensors(40)
    guard = EvalGuard({"mse": MeanSquaredError()}, forward=small, print_summary=False)
    logger = TensorBoardLogger(tmp_path, name="run", prefix=logger_prefix)
    trainer(tmp_path, max_epochs=2, callbacks=[guard], logger=logger).fit(LogsMSE("both"), loader(TensorData(x, y)))
    assert main(["report", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    last = guard.history[-1]
    assert 0.0 < last["clean"]["mse"] < 1.0
    (line,) = [line for line in out.splitlines() if line.startswith("reading at ")]  # epoch, or step with a prefix
    assert "points" not in line and "the error by" in line
    assert line.endswith(reading("mse", f32(last["running"]["mse"]), f32(last["clean"]["mse"]), info=guard_info()))


def guard_info() -> Any:
    from torchmetrics.regression import MeanSquaredError

    from lightning_evalguard.metrics import metric_info

    info = metric_info(MeanSquaredError())
    return info._replace(stderr=None, decomposable=None)
