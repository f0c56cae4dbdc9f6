"""What EvalGuard logs, where it reaches, which running metric it compares with, and what it warns about."""

from __future__ import annotations

import warnings
from typing import Any
from unittest.mock import Mock

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchmetrics import MetricCollection

from lightning_evalguard import EvalGuard, EvalGuardWarning

from helpers import (
    NUM_CLASSES,
    Classifier,
    TensorData,
    Validates,
    loader,
    macro_accuracy,
    make_tensors,
    micro_accuracy,
    trainer,
)


def data(n: int = 40) -> Any:
    x, y = make_tensors(n)
    return loader(TensorData(x, y))


def test_tensorboard_holds_the_three_keys_once_per_epoch_at_the_train_epoch_steps(tmp_path):
    guard = EvalGuard({"acc": micro_accuracy()})
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer(tmp_path, max_epochs=3, callbacks=[guard], logger=logger).fit(Classifier("both"), data())
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"evalguard/clean/acc", "evalguard/running/acc", "evalguard/gap/acc", "train_acc"} <= tags
    train_steps = [event.step for event in events.Scalars("train_acc")]
    assert train_steps == [2, 5, 8]  # 3 batches an epoch; epoch metrics at global_step - 1
    for kind in ("clean", "running", "gap"):
        scalars = events.Scalars(f"evalguard/{kind}/acc")
        assert [event.step for event in scalars] == train_steps
        assert [event.value for event in scalars] == pytest.approx(
            [entry[kind]["acc"] for entry in guard.history], abs=1e-6
        )
    running = [event.value for event in events.Scalars("train_acc")]
    assert [event.value for event in events.Scalars("evalguard/running/acc")] == pytest.approx(running)


def test_logged_metrics_go_to_every_attached_logger(tmp_path):
    mock = Mock(spec=Logger)
    mock.save_dir = None
    mock.log_dir = None
    mock.name = "mock"
    mock.version = 0
    guard = EvalGuard({"acc": micro_accuracy()})
    pl_trainer = trainer(tmp_path, max_epochs=2, callbacks=[guard], logger=[mock, TensorBoardLogger(tmp_path)])
    pl_trainer.fit(Classifier("linear"), data())
    logged = [
        call.kwargs.get("metrics", call.args[0] if call.args else None) for call in mock.log_metrics.call_args_list
    ]
    steps = [call.kwargs.get("step") for call in mock.log_metrics.call_args_list]
    with_clean = [
        (metrics, step) for metrics, step in zip(logged, steps, strict=True) if "evalguard/clean/acc" in metrics
    ]
    assert [step for _, step in with_clean] == [2, 5]
    for (metrics, _), entry in zip(with_clean, guard.history, strict=True):
        assert metrics["evalguard/clean/acc"] == pytest.approx(entry["clean"]["acc"])
        assert metrics["evalguard/gap/acc"] == pytest.approx(entry["gap"]["acc"])
        assert "train_acc" in metrics
    assert set(pl_trainer.callback_metrics) >= {"evalguard/clean/acc", "evalguard/running/acc", "evalguard/gap/acc"}


def test_gap_is_clean_minus_running_and_history_has_its_shape(tmp_path):
    guard = EvalGuard({"acc": micro_accuracy()})
    pl_trainer = trainer(tmp_path, max_epochs=2, callbacks=[guard])
    pl_trainer.fit(Classifier("both"), data())
    assert [entry["epoch"] for entry in guard.history] == [0, 1]
    assert [entry["step"] for entry in guard.history] == [3, 6]
    for entry in guard.history:
        assert set(entry) == {"epoch", "step", "clean", "running", "gap", "validation", "generalization", "time"}
        assert entry["time"]["pass_seconds"] > 0
        assert entry["gap"]["acc"] == pytest.approx(entry["clean"]["acc"] - entry["running"]["acc"])
    assert float(pl_trainer.callback_metrics["evalguard/running/acc"]) == pytest.approx(
        float(pl_trainer.callback_metrics["train_acc"])
    )


def test_model_checkpoint_can_monitor_the_clean_metric(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="evalguard/clean/acc", mode="max", save_top_k=1)
    guard = EvalGuard({"acc": micro_accuracy()})
    pl_trainer = trainer(tmp_path, max_epochs=2, callbacks=[checkpoint, guard], enable_checkpointing=True)
    pl_trainer.fit(Classifier("linear"), data())
    assert checkpoint.best_model_score is not None
    assert float(checkpoint.best_model_score) == pytest.approx(max(e["clean"]["acc"] for e in guard.history))


class Logs(Classifier):
    """Logs the running accuracy under a chosen key and with chosen flags."""

    def __init__(self, key: str, on_step: bool = False, on_epoch: bool = True, late: bool = False) -> None:
        super().__init__("linear")
        self.key, self.on_step, self.on_epoch, self.late = key, on_step, on_epoch, late

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        self.train_acc.update(logits, y)
        if not self.late:
            batch_acc = (logits.argmax(dim=1) == y).float().mean()
            self.log(self.key, batch_acc, on_step=self.on_step, on_epoch=self.on_epoch)
        return torch.nn.functional.cross_entropy(logits, y)

    def on_train_epoch_end(self) -> None:
        if self.late:
            self.log(self.key, self.train_acc.compute())
            self.train_acc.reset()


@pytest.mark.parametrize(
    ("key", "on_step", "found"),
    [
        ("train_acc", False, "train_acc"),
        ("train/acc", False, "train/acc"),
        ("train_acc", True, "train_acc"),  # on_step and on_epoch: train_acc is the epoch value
    ],
)
def test_running_key_is_found_among_the_candidates(tmp_path, key, on_step, found):
    guard = EvalGuard({"acc": micro_accuracy()})
    pl_trainer = trainer(tmp_path, max_epochs=2, callbacks=[guard])
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvalGuardWarning)
        pl_trainer.fit(Logs(key, on_step=on_step), data())
    assert guard.history[-1]["running"]["acc"] == pytest.approx(float(pl_trainer.callback_metrics[found]))


def test_candidate_order_prefers_train_underscore_name(tmp_path):
    class Both(Logs):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.log("train/acc", 5.0, on_step=False, on_epoch=True)
            return super().training_step(batch, batch_idx)

    guard = EvalGuard({"acc": micro_accuracy()})
    pl_trainer = trainer(tmp_path, max_epochs=1, callbacks=[guard])
    pl_trainer.fit(Both("train_acc"), data())
    assert guard.history[-1]["running"]["acc"] == pytest.approx(float(pl_trainer.callback_metrics["train_acc"]))
    assert guard.history[-1]["running"]["acc"] != 5.0


def test_running_argument_names_the_key(tmp_path):
    guard = EvalGuard({"acc": micro_accuracy()}, running={"acc": "my_running_accuracy"})
    pl_trainer = trainer(tmp_path, max_epochs=1, callbacks=[guard])
    pl_trainer.fit(Logs("my_running_accuracy"), data())
    value = float(pl_trainer.callback_metrics["my_running_accuracy"])
    assert guard.history[-1]["running"]["acc"] == pytest.approx(value)


def test_missing_running_metric_warns_once_listing_the_keys_and_still_logs_clean(tmp_path):
    guard = EvalGuard({"acc": micro_accuracy()})
    pl_trainer = trainer(tmp_path, max_epochs=3, callbacks=[guard])
    with pytest.warns(
        EvalGuardWarning, match=r"no running metric for 'acc'.*looked for \['train_acc', 'train/acc'"
    ) as record:
        pl_trainer.fit(Logs("accuracy_of_training"), data())
    messages = [str(w.message) for w in record if issubclass(w.category, EvalGuardWarning)]
    assert len(messages) == 1
    assert "'accuracy_of_training'" in messages[0]
    assert "evalguard/clean/acc" in pl_trainer.callback_metrics
    assert "evalguard/gap/acc" not in pl_trainer.callback_metrics
    assert all(entry["running"] == {} and entry["gap"] == {} for entry in guard.history)


def test_a_key_logged_with_on_epoch_false_warns_once(tmp_path):
    guard = EvalGuard({"acc": micro_accuracy()})
    pl_trainer = trainer(tmp_path, max_epochs=3, callbacks=[guard])
    with pytest.warns(
        EvalGuardWarning, match=r"'train_acc', which was logged with on_epoch=False.*on_epoch=True"
    ) as rec:
        pl_trainer.fit(Logs("train_acc", on_step=True, on_epoch=False), data())
    assert sum(issubclass(w.category, EvalGuardWarning) for w in rec) == 1


def test_a_key_logged_in_the_module_on_train_epoch_end_warns_once(tmp_path):
    guard = EvalGuard({"acc": micro_accuracy()})
    pl_trainer = trainer(tmp_path, max_epochs=3, callbacks=[guard])
    with pytest.warns(
        EvalGuardWarning, match=r"'train_acc' was logged after EvalGuard read it.*on_train_epoch_end"
    ) as rec:
        pl_trainer.fit(Logs("train_acc", late=True), data())
    assert sum(issubclass(w.category, EvalGuardWarning) for w in rec) == 1
    # and it is indeed the previous epoch's value that was compared
    assert guard.history[1]["running"]["acc"] != pytest.approx(float(pl_trainer.callback_metrics["train_acc"]))


def test_late_key_is_caught_also_when_the_first_pass_comes_after_several_epochs(tmp_path):
    guard = EvalGuard({"acc": micro_accuracy()}, every_n_epochs=2)
    pl_trainer = trainer(tmp_path, max_epochs=2, callbacks=[guard])
    with pytest.warns(EvalGuardWarning, match=r"'train_acc' was logged after EvalGuard read it"):
        pl_trainer.fit(Logs("train_acc", late=True), data())


def test_a_clean_setup_gives_no_warning(tmp_path):
    guard = EvalGuard({"acc": micro_accuracy()})
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvalGuardWarning)
        trainer(tmp_path, max_epochs=3, callbacks=[guard]).fit(Classifier("both"), data())


def test_state_dict_is_plain_and_loads_with_weights_only(tmp_path):
    guard = EvalGuard({"acc": micro_accuracy()}, limit_batches=0.5)
    pl_trainer = trainer(tmp_path, max_epochs=2, callbacks=[guard])
    pl_trainer.fit(Classifier("linear"), data())
    path = tmp_path / "state.pt"
    torch.save(guard.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    assert loaded == guard.state_dict()
    assert loaded["history"] == guard.history and len(loaded["subsets"][""]) == 20
    fresh = EvalGuard({"acc": micro_accuracy()})
    fresh.load_state_dict(loaded)
    assert fresh.history == guard.history
    fresh.load_state_dict({})  # an older or foreign checkpoint without the keys
    assert fresh.history == []


def test_resuming_continues_the_history_and_two_prefixes_coexist_in_one_checkpoint(tmp_path):
    def guards() -> list[EvalGuard]:
        return [
            EvalGuard({"acc": micro_accuracy()}),
            EvalGuard({"acc": micro_accuracy()}, prefix="eg2", every_n_epochs=2),
        ]

    first = guards()
    pl_trainer = trainer(tmp_path, max_epochs=2, callbacks=first, enable_checkpointing=True)
    pl_trainer.fit(Classifier("linear"), data())
    path = tmp_path / "two.ckpt"
    pl_trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    keys = {key for key in checkpoint["callbacks"] if "EvalGuard" in key}
    assert keys == {"EvalGuard{'prefix': 'evalguard'}", "EvalGuard{'prefix': 'eg2'}"}

    second = guards()
    resumed = trainer(tmp_path, max_epochs=4, callbacks=second, enable_checkpointing=True)
    resumed.fit(Classifier("linear"), data(), ckpt_path=path)
    assert [entry["epoch"] for entry in second[0].history] == [0, 1, 2, 3]
    assert [entry["epoch"] for entry in second[1].history] == [1, 3]
    assert second[0].history[:2] == first[0].history
    assert {"evalguard/clean/acc", "eg2/clean/acc"} <= set(resumed.callback_metrics)


def test_resuming_from_a_checkpoint_taken_at_validation_end_gives_no_misleading_warning(tmp_path):
    # saved at validation end, before EvalGuard's on_train_epoch_end: the resumed run re-runs that hook first
    save = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_on_train_epoch_end=False)
    first = trainer(
        tmp_path, max_epochs=1, callbacks=[EvalGuard({"acc": micro_accuracy()}), save], enable_checkpointing=True
    )
    first.fit(Validates("linear"), data(), data())
    guard = EvalGuard({"acc": micro_accuracy()})
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvalGuardWarning)
        trainer(tmp_path, max_epochs=2, callbacks=[guard]).fit(
            Validates("linear"), data(), data(), ckpt_path=save.best_model_path
        )
    assert [entry["epoch"] for entry in guard.history] == [0, 1]
    assert guard.history[-1]["running"] and guard.history[-1]["generalization"]


class LogsItsCollection(Classifier):
    """Logs its own MetricCollection the torchmetrics way: prefixed keys through log_dict."""

    def __init__(self, prefix: str) -> None:
        super().__init__("linear")
        self.train_metrics = MetricCollection({"acc": micro_accuracy()}, prefix=prefix)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        self.log_dict(self.train_metrics(logits, y), on_step=False, on_epoch=True)
        return torch.nn.functional.cross_entropy(logits, y)


@pytest.mark.parametrize("prefix", ["train_", "train/", "fit-"])
def test_the_collection_the_module_logs_can_be_passed_as_it_is(tmp_path, prefix):
    x, y = make_tensors(32)
    model = LogsItsCollection(prefix)
    guard = EvalGuard(model.train_metrics)
    pl_trainer = trainer(tmp_path, max_epochs=1, callbacks=[guard])
    pl_trainer.fit(model, loader(TensorData(x, y)))
    assert guard.metric_names == ["acc"]
    running = float(pl_trainer.callback_metrics[f"{prefix}acc"])
    assert float(pl_trainer.callback_metrics["evalguard/running/acc"]) == pytest.approx(running)
    clean = guard.history[-1]["clean"]["acc"]
    assert float(pl_trainer.callback_metrics["evalguard/gap/acc"]) == pytest.approx(clean - running)


class LogsMacro(Classifier):
    """Logs a macro-averaged accuracy as a per-batch tensor, or as the torchmetrics Metric object."""

    def __init__(self, as_metric: bool) -> None:
        super().__init__("linear")
        self.as_metric = as_metric
        self.train_macro = macro_accuracy()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        if self.as_metric:
            self.train_macro(logits, y)
            self.log("train_macro", self.train_macro, on_step=False, on_epoch=True)
        else:
            self.log("train_macro", macro_accuracy().to(x.device)(logits, y), on_step=False, on_epoch=True)
        # a micro-averaged accuracy as a tensor: Lightning's batch-size-weighted mean is the epoch's accuracy
        self.log("train_acc", (logits.argmax(1) == y).float().mean(), on_step=False, on_epoch=True)
        return torch.nn.functional.cross_entropy(logits, y)


@pytest.mark.parametrize("clean", ["macro accuracy", "F1"])
def test_a_non_decomposable_running_metric_logged_as_a_tensor_warns_once_with_the_fix(tmp_path, clean):
    from torchmetrics.classification import MulticlassF1Score

    macro = macro_accuracy() if clean == "macro accuracy" else MulticlassF1Score(num_classes=NUM_CLASSES)
    guard = EvalGuard({"macro": macro, "acc": micro_accuracy()})
    with pytest.warns(EvalGuardWarning, match=r"'train_macro', which was logged as a tensor or number") as record:
        trainer(tmp_path, max_epochs=3, callbacks=[guard]).fit(LogsMacro(as_metric=False), data())
    messages = [str(w.message) for w in record if issubclass(w.category, EvalGuardWarning)]
    assert len(messages) == 1  # once, and not for the micro-averaged accuracy logged the same way
    assert "self.log('train_macro', self.<metric>, on_epoch=True)" in messages[0]


def test_the_same_metric_logged_as_a_metric_object_gives_no_warning(tmp_path):
    guard = EvalGuard({"macro": macro_accuracy(), "acc": micro_accuracy()})
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvalGuardWarning)
        trainer(tmp_path, max_epochs=2, callbacks=[guard]).fit(LogsMacro(as_metric=True), data())
    assert "macro" in guard.history[-1]["running"]


class LogsMacroAtEpochEnd(pl.Callback):
    """Computes a macro accuracy over the epoch and logs it as a tensor in on_train_epoch_end, before EvalGuard."""

    def __init__(self) -> None:
        self.macro = macro_accuracy()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self.macro.update(pl_module(batch[0]), batch[1])

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        pl_module.log("train_macro", self.macro.compute(), on_epoch=True)  # one value: Lightning averages nothing
        self.macro.reset()


def test_a_metric_computed_over_the_epoch_and_logged_as_a_tensor_at_its_end_gives_no_warning(tmp_path):
    guard = EvalGuard({"macro": macro_accuracy(), "acc": micro_accuracy()})
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvalGuardWarning)
        trainer(tmp_path, max_epochs=2, callbacks=[LogsMacroAtEpochEnd(), guard]).fit(Logs("train_acc"), data())
    assert "macro" in guard.history[-1]["running"]
