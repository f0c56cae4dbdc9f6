"""The custom-scalars dashboard, checked against a real TensorBoard server on a loopback port."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest.mock import Mock

import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from lightning_evalguard import EvalGuard

from helpers import (
    Classifier,
    NumpyNoise,
    TensorData,
    Validates,
    loader,
    macro_accuracy,
    make_tensors,
    micro_accuracy,
    trainer,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture
def tensorboard_server(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A TensorBoard server on a free loopback port over tmp_path/logs, stopped after the test."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(logdir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--reload_interval",
            "1",
            "--load_fast",
            "false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "tensorboard.log").open("w"),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        yield logdir, base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_for(condition: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as error:  # the server is still starting or loading
            last_error = error
        time.sleep(0.5)
    raise AssertionError(f"timed out; last error: {last_error}")


def server_log(logdir: Path) -> str:
    log = logdir.parent / "tensorboard.log"
    return log.read_text()[-2000:] if log.exists() else ""


def test_tensorboard_serves_the_custom_scalars_layout_and_tags(tensorboard_server):
    logdir, base = tensorboard_server
    x, y = make_tensors(40)
    metrics = {"acc": macro_accuracy(), "micro": micro_accuracy()}
    guard = EvalGuard(
        metrics, eval_transform=nn.Identity(), decompose=True, limit_batches=0.5, running={"micro": "train_acc"}
    )
    logger = TensorBoardLogger(logdir, name="run")
    pl_trainer = trainer(logdir, max_epochs=2, callbacks=[guard], logger=logger)
    pl_trainer.fit(Validates("both"), loader(TensorData(x, y, NumpyNoise())), loader(TensorData(x, y), shuffle=False))
    run = "run/version_0"

    expected = {"evalguard/clean/acc", "evalguard/running/acc", "evalguard/gap/acc", "val_acc"}
    expected |= {"evalguard/clean_low/micro", "evalguard/clean_high/micro"}  # a subset: the micro accuracy's band

    def served_tags() -> Any:  # the server reloads every second: wait until it has read the whole run
        tags = get(f"{base}/data/plugin/scalars/tags").get(run) or {}
        return tags if expected <= set(tags) else None

    try:
        tags = wait_for(served_tags)
    except AssertionError as error:
        raise AssertionError(f"{error}\nTensorBoard's own output:\n{server_log(logdir)}") from None
    assert expected <= set(tags)
    layout = wait_for(lambda: get(f"{base}/data/plugin/custom_scalars/layout"))
    (category,) = layout["category"]
    assert category["title"] == "evalguard"
    charts = {chart["title"]: chart["multiline"]["tag"] for chart in category["chart"] if "multiline" in chart}
    margins = {chart["title"]: chart["margin"]["series"] for chart in category["chart"] if "margin" in chart}
    band = {
        "value": "evalguard/clean/micro",
        "lower": "evalguard/clean_low/micro",
        "upper": "evalguard/clean_high/micro",
    }
    assert margins == {"micro: clean, 2 standard errors either side": [band]}  # no standard error for a macro average
    assert set(band.values()) <= set(tags)
    assert charts["acc: running, clean, validation"] == [
        "^evalguard/running/acc$", "^evalguard/clean/acc$", "^val_acc$", "^val/acc$"
    ]  # fmt: skip
    assert "^evalguard/gap/acc$" in charts["gaps: clean - running, clean - validation"]
    assert "^evalguard/effect/augmentation/acc$" in charts["acc: the gap's causes"]
    # every regex of the per-metric chart but the alternative validation key matches a served tag
    import re

    for pattern in charts["acc: running, clean, validation"][:3]:
        assert any(re.match(pattern, tag) for tag in tags), pattern


def test_other_loggers_are_left_alone(tmp_path):
    from lightning.pytorch.loggers import Logger

    x, y = make_tensors(16)
    other = Mock(spec=Logger)
    other.save_dir = other.log_dir = None
    other.name, other.version = "other", 0
    other.experiment = Mock()
    tensorboard = TensorBoardLogger(tmp_path, name="tb")
    guard = EvalGuard({"acc": macro_accuracy()})
    pl_trainer = trainer(tmp_path, max_epochs=1, callbacks=[guard], logger=[other, CSVLogger(tmp_path), tensorboard])
    pl_trainer.fit(Classifier("linear"), loader(TensorData(x, y)))
    other.experiment.add_custom_scalars.assert_not_called()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tensorboard.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    assert "custom_scalars__config__" in events.Tags()["tensors"]


def test_a_subclass_of_the_tensorboard_logger_gets_the_dashboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class TeamLogger(TensorBoardLogger):
        """A team's own TensorBoardLogger with another name."""

    x, y = make_tensors(16)
    logger = TeamLogger(tmp_path, name="team")
    guard = EvalGuard({"acc": macro_accuracy()})
    trainer(tmp_path, max_epochs=1, callbacks=[guard], logger=logger).fit(
        Classifier("linear"), loader(TensorData(x, y))
    )
    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    assert "custom_scalars__config__" in events.Tags()["tensors"]


def test_an_auto_subset_gets_the_band_chart_even_when_its_first_pass_covers_everything(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    x, y = make_tensors(40)  # so few samples that target_stderr=0.005 needs them all at first
    guard = EvalGuard({"acc": micro_accuracy()}, limit_batches="auto")
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer(tmp_path, max_epochs=1, callbacks=[guard], logger=logger).fit(
        Classifier("linear"), loader(TensorData(x, y))
    )
    assert guard.history[0]["n"] == 40
    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    (event,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(event.tensor_proto.string_val[0])
    titles = [chart.title for category in layout.category for chart in category.chart]
    assert "acc: clean, 2 standard errors either side" in titles
