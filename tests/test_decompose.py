"""decompose=True splits the gap into train mode, augmentation and weight drift; validation gives the generalization gap."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_evalguard import EvalGuard

from helpers import (
    NUM_CLASSES,
    Classifier,
    CountSamples,
    NoTraining,
    NumpyNoise,
    TensorData,
    Validates,
    assert_training_unchanged_by,
    loader,
    make_tensors,
    micro_accuracy,
    trainer,
)

EFFECTS = ("train_mode", "augmentation", "weight_drift")


class Loss(MulticlassAccuracy):
    """A continuous metric (mean cross-entropy), so that effects are rarely exactly zero by chance."""

    def __init__(self) -> None:
        super().__init__(num_classes=NUM_CLASSES)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.total += nn.functional.cross_entropy(preds.float(), target, reduction="sum").double()
        self.count += len(target)

    def compute(self) -> torch.Tensor:
        return self.total / self.count


class LogsLoss(Classifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss


def decomposed(
    tmp_path: Any,
    kind: str,
    noise: float,
    batch_noise: float,
    n: int = 50,
    train_batch: int = 10,
    count: bool = False,
) -> tuple[EvalGuard, pl.Trainer]:
    x, y = make_tensors(n)
    metrics: dict[str, Any] = {"acc": micro_accuracy(), "loss": Loss()}
    if count:
        metrics["n"] = CountSamples()  # no running value: it warns, and has no weight drift
    guard = EvalGuard(metrics, eval_transform=nn.Identity(), decompose=True, batch_size=16)
    model = LogsLoss(kind, batch_noise=batch_noise)
    pl_trainer = trainer(tmp_path, max_epochs=2, callbacks=[guard])
    data = TensorData(x, y, NumpyNoise(noise) if noise else None)
    pl_trainer.fit(model, loader(data, batch_size=train_batch))
    return guard, pl_trainer


def test_effects_add_up_to_the_gap_and_are_logged(tmp_path):
    guard, pl_trainer = decomposed(tmp_path, "both", noise=0.5, batch_noise=0.5)
    for entry in guard.history:
        for name in ("acc", "loss"):
            total = sum(entry[f"effect/{kind}"][name] for kind in EFFECTS)
            assert total == pytest.approx(entry["gap"][name], abs=1e-5)
    last = guard.history[-1]
    for kind in EFFECTS:
        key = f"evalguard/effect/{kind}/loss"
        assert float(pl_trainer.callback_metrics[key]) == pytest.approx(last[f"effect/{kind}"]["loss"], abs=1e-6)
    assert last["effect/train_mode"]["loss"] != 0.0 and last["effect/augmentation"]["loss"] != 0.0


def test_train_mode_effect_is_exactly_zero_without_dropout_or_batchnorm(tmp_path):
    guard, _ = decomposed(tmp_path, "linear", noise=0.5, batch_noise=0.0)
    assert all(entry["effect/train_mode"][name] == 0.0 for entry in guard.history for name in ("acc", "loss"))
    assert any(entry["effect/augmentation"]["loss"] != 0.0 for entry in guard.history)


def test_augmentation_effect_is_exactly_zero_without_augmentation(tmp_path):
    guard, _ = decomposed(tmp_path, "both", noise=0.0, batch_noise=0.0)
    assert all(entry["effect/augmentation"][name] == 0.0 for entry in guard.history for name in ("acc", "loss"))
    assert any(entry["effect/train_mode"]["loss"] != 0.0 for entry in guard.history)


@pytest.mark.filterwarnings("ignore:EvalGuard found no running metric")
def test_a_last_batch_of_one_sample_does_not_break_the_train_mode_passes(tmp_path):
    # clean batches of 16 + 16 + 1: BatchNorm in train mode cannot normalise the last one alone
    guard, _ = decomposed(tmp_path, "batchnorm", noise=0.5, batch_noise=0.0, n=33, train_batch=11, count=True)
    assert [entry["epoch"] for entry in guard.history] == [0, 1]
    for entry in guard.history:
        # the train-mode passes (B, C) count the 33 samples the clean pass does: the last sample is not dropped
        assert entry["clean"]["n"] == 33.0
        assert entry["effect/train_mode"]["n"] == 0.0 and entry["effect/augmentation"]["n"] == 0.0
        for name in ("acc", "loss"):
            total = sum(entry[f"effect/{kind}"][name] for kind in EFFECTS)
            assert math.isfinite(total) and total == pytest.approx(entry["gap"][name], abs=1e-5)
        assert entry["effect/train_mode"]["loss"] != 0.0  # BatchNorm's batch statistics did change the outputs


def test_training_with_decompose_is_bit_identical_to_training_without_the_callback(tmp_path):
    guard = assert_training_unchanged_by(
        tmp_path, lambda: EvalGuard({"acc": micro_accuracy()}, eval_transform=nn.Identity(), decompose=True), n=72
    )
    assert [entry["epoch"] for entry in guard.history] == [0, 1, 2]


def test_decompose_with_a_user_loader_fails_before_training(tmp_path):
    x, y = make_tensors(16)
    model = NoTraining("linear")
    guard = EvalGuard({"acc": micro_accuracy()}, dataloader=loader(TensorData(x, y), shuffle=False), decompose=True)
    with pytest.raises(ValueError, match=r"decompose=True\) .* needs to\s+rebuild the training loader"):
        trainer(tmp_path, callbacks=[guard]).fit(model, loader(TensorData(x, y)))


@pytest.mark.parametrize("key", ["val_acc", "val/acc", "my_val"])
def test_generalization_gap_is_logged_only_for_epochs_where_validation_ran(tmp_path, key):
    x, y = make_tensors(40)
    guard = EvalGuard({"acc": micro_accuracy()}, val={"acc": "my_val"} if key == "my_val" else None)
    pl_trainer = trainer(tmp_path, max_epochs=4, callbacks=[guard], check_val_every_n_epoch=2)
    pl_trainer.fit(
        Validates("both", key, metric=True),
        loader(TensorData(x, y)),
        val_dataloaders=loader(TensorData(x[:20], y[:20]), shuffle=False),
    )
    assert [bool(entry["generalization"]) for entry in guard.history] == [False, True, False, True]
    last = guard.history[-1]
    validation = float(pl_trainer.callback_metrics[key])
    assert last["validation"]["acc"] == pytest.approx(validation)
    assert last["generalization"]["acc"] == pytest.approx(last["clean"]["acc"] - validation)
    assert float(pl_trainer.callback_metrics["evalguard/generalization/acc"]) == pytest.approx(
        last["generalization"]["acc"], abs=1e-6
    )


def test_summary_lists_the_last_values_and_a_reading_and_is_printed_once_at_fit_end(tmp_path, capsys):
    guard, _ = decomposed(tmp_path, "both", noise=0.5, batch_noise=0.5)
    text = guard.summary()
    last = guard.history[-1]
    assert text.splitlines()[0] == "EvalGuard summary"
    assert f"{last['clean']['loss']:.4f}" in text and f"{last['running']['loss']:.4f}" in text
    assert "effect/augmentation" in text
    assert "acc: running acc " in text and ("understates" in text or "overstates" in text or "matches" in text)
    printed = capsys.readouterr().out
    assert printed.count("EvalGuard summary") == 1
    assert "running loss" in printed


def test_no_summary_is_printed_with_print_summary_false(tmp_path, capsys):
    x, y = make_tensors(16)
    guard = EvalGuard({"acc": micro_accuracy()}, print_summary=False)
    trainer(tmp_path, max_epochs=1, callbacks=[guard]).fit(Classifier("linear"), loader(TensorData(x, y)))
    assert "EvalGuard summary" not in capsys.readouterr().out
    assert guard.summary().startswith("EvalGuard summary")


def test_summary_is_a_rich_table_in_a_terminal(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    x, y = make_tensors(16)
    guard = EvalGuard({"acc": micro_accuracy()})
    trainer(tmp_path, max_epochs=1, callbacks=[guard]).fit(Classifier("linear"), loader(TensorData(x, y)))
    out = capsys.readouterr().out
    assert "EvalGuard summary" in out and "┃" in out  # rich's table border
    assert f"{guard.history[-1]['clean']['acc']:.4f}" in out


def test_summary_is_plain_text_without_rich(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "rich.table", None)
    x, y = make_tensors(16)
    guard = EvalGuard({"acc": micro_accuracy()})
    trainer(tmp_path, max_epochs=1, callbacks=[guard]).fit(Classifier("linear"), loader(TensorData(x, y)))
    assert capsys.readouterr().out.strip().endswith(guard.summary().splitlines()[-1])
