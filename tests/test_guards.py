"""Guards catch a set-up whose clean pass would not be clean, before the first training step."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from lightning_evalguard import EvalGuard, EvalGuardError, EvalGuardWarning
from lightning_evalguard.guards import difference, stochastic_module

from helpers import (
    NUM_CLASSES,
    NUM_FEATURES,
    Classifier,
    NoTraining,
    NumpyNoise,
    TensorData,
    assert_training_unchanged_by,
    loader,
    make_tensors,
    micro_accuracy,
    trainer,
)


def test_dataset_augmentation_left_on_raises_before_any_training_step(tmp_path):
    x, y = make_tensors(32)
    guard = EvalGuard({"acc": micro_accuracy()})  # no eval_transform: the NumpyNoise transform stays on
    with pytest.raises(
        EvalGuardError,
        match=r"producing the first clean batch drew from the numpy RNG, so augmentation is still on.*eval_transform=.*dataloader=.*clean_train_dataloader\(\).*self.trainer.training",
    ):
        trainer(tmp_path, callbacks=[guard]).fit(NoTraining("linear"), loader(TensorData(x, y, NumpyNoise())))


class UngatedBatchNoise(NoTraining):
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        return x + torch.randn_like(x), y  # not gated on self.trainer.training


def test_batch_level_augmentation_not_gated_on_trainer_training_raises(tmp_path):
    x, y = make_tensors(32)
    guard = EvalGuard({"acc": micro_accuracy()}, eval_transform=nn.Identity())
    with pytest.raises(
        EvalGuardError,
        match=r"UngatedBatchNoise.on_after_batch_transfer draws random numbers while `trainer.training` is False.*Gate it on `self.trainer.training`",
    ):
        trainer(tmp_path, callbacks=[guard]).fit(UngatedBatchNoise("linear"), loader(TensorData(x, y, NumpyNoise())))


def test_augmentation_guard_only_warns_with_guards_warn_and_training_goes_on(tmp_path):
    x, y = make_tensors(32)
    guard = EvalGuard({"acc": micro_accuracy()}, guards="warn")
    with pytest.warns(EvalGuardWarning) as record:
        trainer(tmp_path, max_epochs=2, callbacks=[guard]).fit(
            Classifier("linear"), loader(TensorData(x, y, NumpyNoise()))
        )
    messages = [str(w.message) for w in record if issubclass(w.category, EvalGuardWarning)]
    assert sum("augmentation is still on" in message for message in messages) == 1
    # the dataset's numpy noise also drew random numbers during each pass: said once too
    assert sum("during it, numpy RNG state changed" in message for message in messages) == 1
    assert [entry["epoch"] for entry in guard.history] == [0, 1]


class AlwaysDrop(nn.Module):
    """A stochastic layer that ignores eval mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(x, 0.5, training=True)


class Nested(Classifier):
    def __init__(self) -> None:
        super().__init__("linear")
        block = nn.Sequential(nn.Linear(NUM_FEATURES, 8), nn.ReLU())
        block.add_module("drop", AlwaysDrop())
        self.backbone = nn.Sequential()
        self.backbone.add_module("block1", nn.Sequential(nn.Linear(NUM_FEATURES, NUM_FEATURES), nn.Dropout(0.2)))
        self.backbone.add_module("block3", block)
        self.net = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.backbone(x))


def test_a_layer_that_ignores_eval_mode_is_named_by_its_qualified_name(tmp_path):
    x, y = make_tensors(32)
    model = Nested()
    model.training_step = lambda *a: pytest.fail("training started")  # type: ignore[method-assign]
    guard = EvalGuard({"acc": micro_accuracy()})
    with pytest.raises(EvalGuardError, match=r"module 'backbone.block3.drop' \(AlwaysDrop\).*check\s+`self.training`"):
        trainer(tmp_path, callbacks=[guard]).fit(model, loader(TensorData(x, y)))


class InlineNoise(Classifier):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + torch.randn(1)  # randomness inline in the module's own forward


def test_inline_randomness_names_the_module_whose_forward_has_it(tmp_path):
    x, y = make_tensors(32)
    guard = EvalGuard({"acc": micro_accuracy()}, guards="warn")
    with pytest.warns(EvalGuardWarning) as record:
        trainer(tmp_path, max_epochs=1, callbacks=[guard]).fit(InlineNoise("linear"), loader(TensorData(x, y)))
    messages = " | ".join(str(w.message) for w in record)
    assert "forward of the LightningModule itself (InlineNoise.forward)" in messages
    assert "during it, torch CPU RNG state changed" in messages  # and each pass drew random numbers
    assert [entry["epoch"] for entry in guard.history] == [0]


def test_guards_are_silent_on_a_clean_setup_and_off_means_off(tmp_path):
    x, y = make_tensors(32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvalGuardWarning)
        guard = EvalGuard({"acc": micro_accuracy()}, eval_transform=nn.Identity())
        trainer(tmp_path, max_epochs=2, callbacks=[guard]).fit(
            Classifier("both", batch_noise=0.5), loader(TensorData(x, y, NumpyNoise()))
        )
        off = EvalGuard({"acc": micro_accuracy()}, guards="off")  # augmentation on, nothing said
        trainer(tmp_path, max_epochs=1, callbacks=[off]).fit(
            Classifier("linear"), loader(TensorData(x, y, NumpyNoise()))
        )
    # both fits measured every epoch: the clean set-up, and the one with the guards off
    assert [entry["epoch"] for entry in guard.history] == [0, 1]
    assert [entry["epoch"] for entry in off.history] == [0]


class SwapsLayerDuringPass(Classifier):
    """Replaces its layer with a copy in eval mode during the first clean pass.

    The copy keeps the pass's eval mode, so nothing changes inside the pass; EvalGuard restores the flags of the
    modules it switched, and the new layer is not one of them: only the guard after the pass can see it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.global_step > 0 and not getattr(self, "swapped", False):
            self.swapped = True
            self.net = copy.deepcopy(self.net).eval()
        return self.net(x)


def test_guard_after_the_pass_reports_what_was_not_put_back(tmp_path):
    x, y = make_tensors(32)
    guard = EvalGuard({"acc": micro_accuracy()})
    with pytest.raises(
        EvalGuardError,
        match=r"after epoch 0 did not leave the run as it found it: module 'net' training flag True -> False",
    ):
        trainer(tmp_path, max_epochs=2, callbacks=[guard]).fit(SwapsLayerDuringPass("linear"), loader(TensorData(x, y)))


class TrainsDuringPass(Classifier):
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not self.trainer.training and self.current_epoch == 1:
            self.train()  # a hook that switches the model back to train mode during the pass
        return batch


class DrawsDuringPass(Classifier):
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not self.trainer.training and self.current_epoch == 1:
            torch.rand(1)  # something random during the pass
        return batch


@pytest.mark.parametrize(
    ("model", "change"),
    [(TrainsDuringPass, r"module '\(root\)' training flag False -> True"), (DrawsDuringPass, r"torch CPU RNG state")],
)
def test_a_hook_that_changes_modes_or_draws_during_the_pass_is_caught(tmp_path, model, change):
    x, y = make_tensors(32)
    guard = EvalGuard({"acc": micro_accuracy()})
    with pytest.raises(EvalGuardError, match=rf"clean pass after epoch 1 was not clean: during it, {change}"):
        trainer(tmp_path, max_epochs=2, callbacks=[guard]).fit(model("dropout"), loader(TensorData(x, y)))


def test_guard_checks_are_isolated_from_the_training_rng(tmp_path):
    # both guards fire (augmentation on, a layer that ignores eval mode) and only warn; training must not notice
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EvalGuardWarning)
        guard = assert_training_unchanged_by(
            tmp_path, lambda: EvalGuard({"acc": micro_accuracy()}, guards="warn"), make_model=Nested, epochs=2, seed=3
        )
    assert [entry["epoch"] for entry in guard.history] == [0, 1]


def test_difference_describes_the_first_differing_leaf():
    a = (torch.zeros(2), {"y": torch.ones(2)})
    assert difference(a, (torch.zeros(2), {"y": torch.ones(2)})) is None
    assert (
        difference(a, (torch.zeros(2), {"y": torch.tensor([1.0, 1.5])}))
        == "batch[1]['y'] differs (max abs difference 0.5)"
    )
    assert difference(a, (torch.zeros(3), {"y": torch.ones(2)})).startswith("batch[0] differs in shape")


def test_difference_looks_into_dataclass_batches():
    import dataclasses

    @dataclasses.dataclass
    class Batch:
        x: torch.Tensor
        y: torch.Tensor

    first = Batch(torch.zeros(3), torch.ones(3))
    assert difference(first, Batch(torch.zeros(3), torch.ones(3))) is None
    found = difference(first, Batch(torch.tensor([0.0, 0.25, 0.0]), torch.ones(3)))
    assert found == "batch.x differs (max abs difference 0.25)"  # its == would raise on tensors: it was "the same"

    @dataclasses.dataclass
    class Tagged:
        x: torch.Tensor
        uid: int = dataclasses.field(compare=False)  # left out of ==, and so of the comparison
        cached: torch.Tensor = dataclasses.field(init=False)  # never set

    assert difference(Tagged(torch.zeros(2), 1), Tagged(torch.zeros(2), 2)) is None
    assert difference(Tagged(torch.zeros(2), 1), Tagged(torch.ones(2), 1)) == "batch.x differs (max abs difference 1)"


def test_stochastic_module_is_none_for_a_deterministic_eval_model():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(), nn.BatchNorm1d(3)).eval()
    x = torch.randn(4, 3)
    assert stochastic_module(model, lambda: model(x)) is None
    model.train()
    assert stochastic_module(model, lambda: model(x)) == "1"


def test_last_bit_differences_are_not_taken_for_randomness():
    a = torch.linspace(0, 1, 10)
    assert difference(a, a * (1 + 1e-7)) is None
    assert difference(a, a + 1e-2) is not None


def test_the_guard_policy_raises_or_warns_with_the_finding(tmp_path):
    from lightning_evalguard.guards import GuardPolicy

    pl_trainer = trainer(tmp_path)
    warned: list[tuple[str, str]] = []
    with pytest.raises(EvalGuardError, match=r'^found it\. Pass guards="warn" or guards="off" to EvalGuard'):
        GuardPolicy("raise", lambda *args: warned.append(args)).decide(pl_trainer, "state", "found it.")
    GuardPolicy("raise", lambda *args: warned.append(args)).decide(pl_trainer, "state", None)
    policy = GuardPolicy("warn", lambda *args: warned.append(args))
    policy.decide(pl_trainer, "state", "found it.")
    assert warned == [("guard:state", "found it.")]  # one warning key per kind of guard
    assert GuardPolicy("warn", print).enabled and not GuardPolicy("off", print).enabled
