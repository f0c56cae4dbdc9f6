"""Training with EvalGuard is bit-identical to training without it; the pass changes no state, also on error."""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from lightning_evalguard import EvalGuard
from lightning_evalguard.isolation import isolated_rng

from helpers import NUM_CLASSES, Classifier, NumpyNoise, TensorData, loader, make_tensors, trainer


def guard(**kwargs: Any) -> EvalGuard:
    return EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES)}, **kwargs)


def rng_states() -> tuple[Any, ...]:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def same_rng(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


class Snapshot(EvalGuard):
    """Records everything the pass could touch, just before and just after it."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        before = self._state(trainer, pl_module)
        super().on_train_epoch_end(trainer, pl_module)
        self.states.append((before, self._state(trainer, pl_module)))

    @staticmethod
    def _state(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        optimizer = trainer.optimizers[0]
        return {
            "params": {k: v.detach().clone() for k, v in pl_module.named_parameters()},
            "grads": {k: None if v.grad is None else v.grad.clone() for k, v in pl_module.named_parameters()},
            "buffers": {k: v.clone() for k, v in pl_module.named_buffers()},
            "optimizer": {
                k: v.clone() for i, s in optimizer.state.items() for k, v in s.items() if isinstance(v, torch.Tensor)
            },
            "modes": [m.training for m in pl_module.modules()],
            "rng": rng_states(),
            "stage": trainer.state.stage,
        }


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    for group in ("params", "buffers", "optimizer"):
        assert before[group].keys() == after[group].keys()
        for key in before[group]:
            assert torch.equal(before[group][key], after[group][key]), (group, key)
    for key, grad in before["grads"].items():
        assert (grad is None and after["grads"][key] is None) or torch.equal(grad, after["grads"][key])
    assert before["modes"] == after["modes"]
    assert same_rng(before["rng"], after["rng"])
    assert before["stage"] == after["stage"]


class FrozenNorm(Classifier):
    """Freezes its BatchNorm in eval mode; records the flags it sees at every training batch."""

    def __init__(self) -> None:
        super().__init__("both")
        self.seen: list[tuple[bool, bool]] = []

    def on_train_start(self) -> None:
        self.net[1].eval()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.seen.append((self.training, self.net[1].training))


def test_pass_changes_no_parameter_gradient_optimizer_state_buffer_mode_rng_or_stage(tmp_path):
    x, y = make_tensors(40)
    snapshot = Snapshot({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES)}, eval_transform=nn.Identity())
    snapshot.states = []
    model = FrozenNorm()
    trainer(tmp_path, max_epochs=3, callbacks=[snapshot]).fit(model, loader(TensorData(x, y, NumpyNoise())))
    assert len(snapshot.states) == 3
    for before, after in snapshot.states:
        assert_same_state(before, after)
    # the BatchNorm the user froze stays frozen through every epoch, the rest stays in train mode
    assert set(model.seen) == {(True, False)}


def test_no_generator_is_seeded_that_is_not_put_back(tmp_path, monkeypatch):
    # torch.manual_seed would queue a seed for CUDA's lazy initialisation (changing the CUDA stream of a later GPU run
    # in the same process), which nothing puts back: the pass seeds only the generators isolated_rng restores.
    if torch.cuda.is_initialized():
        pytest.skip("CUDA is initialised in this process: its generators are seeded and restored")
    seeded: list[str] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append("cuda"))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: seeded.append("cuda"))
    x, y = make_tensors(40)
    g = guard(eval_transform=nn.Identity(), decompose=True)
    trainer(tmp_path, max_epochs=2, callbacks=[g]).fit(Classifier("both"), loader(TensorData(x, y, NumpyNoise())))
    assert len(g.history) == 2
    assert not torch.cuda.is_initialized() and seeded == []


class FakeMps:
    """Stands in for torch.mps on a machine without it: one generator state."""

    def __init__(self) -> None:
        self.state = torch.tensor([0])

    def get_rng_state(self) -> torch.Tensor:
        return self.state.clone()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.state = state.clone()

    def manual_seed(self, seed: int) -> None:
        self.state = torch.tensor([seed])


def test_an_mps_generator_is_seeded_for_each_pass_and_put_back(monkeypatch):
    from lightning_evalguard.guards import snapshot, state_changes
    from lightning_evalguard.isolation import reseed

    fake = FakeMps()
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch, "mps", fake)
    fake.state = torch.tensor([123])  # the training run's stream
    with isolated_rng():
        reseed(7)
        assert fake.state.item() == 7  # passes B and C start from the same MPS state: the same Dropout masks
    assert fake.state.item() == 123
    module, stage = nn.Linear(1, 1), type("T", (), {"state": type("S", (), {"stage": None})()})()
    before = snapshot(stage, module)
    fake.state = torch.tensor([5])
    assert state_changes(before, snapshot(stage, module)) == ["MPS RNG state"]


class ModesDuringPass(Classifier):
    def __init__(self) -> None:
        super().__init__("both")
        self.modes_in_pass: list[list[bool]] = []
        self.grad_in_pass: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.trainer.training:
            self.modes_in_pass.append([m.training for m in self.modules()])
            self.grad_in_pass.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return super().forward(x)


def test_every_module_is_in_eval_mode_and_inference_mode_during_the_pass(tmp_path):
    x, y = make_tensors(40)
    model = ModesDuringPass()
    trainer(tmp_path, max_epochs=1, callbacks=[guard(guards="off")]).fit(model, loader(TensorData(x, y)))
    assert len(model.modes_in_pass) == 1 + 3  # the fit-start check's forward, then the pass's three batches
    assert all(not any(modes) for modes in model.modes_in_pass)
    # the check before training runs under no_grad (a tensor the forward keeps must serve training), the pass under
    # inference mode
    assert model.grad_in_pass == [(False, False)] + [(True, False)] * 3


class EvalCounter(nn.Module):
    """A buffer that a user layer updates even in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


def test_buffers_a_layer_updates_in_eval_mode_are_restored(tmp_path):
    x, y = make_tensors(40)
    model = Classifier("linear")
    model.net = nn.Sequential(EvalCounter(), model.net)
    trainer(tmp_path, max_epochs=2, callbacks=[guard()]).fit(model, loader(TensorData(x, y)))
    assert model.net[0].calls.item() == 2 * 3  # training steps only


def fit_weights(
    tmp_path: Any, with_guard: bool, num_workers: int, mechanism: str = "rebuilt", **guard_kwargs: Any
) -> dict[str, torch.Tensor]:
    pl.seed_everything(0, workers=True, verbose=False)
    x, y = make_tensors(72)
    model = Classifier("both", batch_noise=0.2)
    dataset = TensorData(x, y, NumpyNoise())
    workers: dict[str, Any] = {"num_workers": num_workers}
    if num_workers:
        workers["multiprocessing_context"] = "fork"
    train = DataLoader(dataset, batch_size=16, shuffle=True, **workers)
    if mechanism == "rebuilt":
        guard_kwargs["eval_transform"] = nn.Identity()
    else:
        # a user loader that draws from the global RNGs itself (shuffling, numpy augmentation in the dataset); the
        # augmentation guard would stop it, so it is off here
        guard_kwargs["dataloader"] = DataLoader(dataset, batch_size=16, shuffle=True, **workers)
        guard_kwargs["guards"] = "off"
    callbacks = [guard(**guard_kwargs)] if with_guard else []
    trainer(tmp_path, max_epochs=3, deterministic=True, callbacks=callbacks).fit(model, train)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if with_guard:
        assert len(callbacks[0].history) == 3
    return state


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("mechanism", ["rebuilt", "dataloader"])
def test_training_with_the_callback_is_bit_identical_to_training_without_it(tmp_path, num_workers, mechanism):
    without = fit_weights(tmp_path / "a", False, num_workers)
    with_guard = fit_weights(tmp_path / "b", True, num_workers, mechanism)
    assert without.keys() == with_guard.keys()
    for key in without:
        assert torch.equal(without[key], with_guard[key]), key


def test_training_with_a_subset_pass_is_bit_identical(tmp_path):
    without = fit_weights(tmp_path / "a", False, 0)
    with_guard = fit_weights(tmp_path / "b", True, 0, limit_batches=0.5)
    for key in without:
        assert torch.equal(without[key], with_guard[key]), key


def test_the_rebuilt_loader_draws_nothing_from_the_global_rng(tmp_path):
    x, y = make_tensors(40)
    states: dict[str, torch.Tensor] = {}

    def forward(module: pl.LightningModule, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if module.trainer.global_step > 0:  # the pass, not the fit-start check
            states.setdefault("first_batch", torch.get_rng_state())
        return module(batch[0]), batch[1]

    pl_trainer = trainer(tmp_path, max_epochs=1, callbacks=[guard(forward=forward, guards="off", seed=5)])
    pl_trainer.fit(Classifier("linear"), loader(TensorData(x, y)))
    # each pass starts from the callback's seed; creating the loader's iterator drew nothing after it
    with isolated_rng():
        torch.manual_seed(5)
        assert torch.equal(torch.get_rng_state(), states["first_batch"])


class Explodes(Classifier):
    def __init__(self) -> None:
        super().__init__("both")
        self.net[1].eval()  # a frozen BatchNorm must come back frozen after the error too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.trainer.training and self.global_step > 0:  # in the pass, not in the fit-start check
            torch.rand(3)
            np.random.rand(3)
            raise ZeroDivisionError("boom in forward")
        return super().forward(x)


@pytest.mark.filterwarnings("ignore:Found 1 module.s. in eval mode")
def test_exception_in_the_pass_restores_state_and_propagates_with_a_note(tmp_path):
    x, y = make_tensors(40)
    dataset = TensorData(x, y, NumpyNoise())
    noise = dataset.transform
    model = Explodes()
    seen: dict[str, Any] = {}

    class Watch(pl.Callback):
        def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
            seen["modes"] = [m.training for m in pl_module.modules()]
            seen["rng"] = rng_states()
            seen["stage"] = trainer.state.stage
            seen["transform"] = dataset.transform

    class Before(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            seen["rng_before"] = rng_states()
            seen["modes_before"] = [m.training for m in pl_module.modules()]
            seen["stage_before"] = trainer.state.stage

    callbacks = [Before(), guard(eval_transform=nn.Identity(), guards="off"), Watch()]
    pl_trainer = trainer(tmp_path, max_epochs=2, callbacks=callbacks)
    with pytest.raises(ZeroDivisionError, match="boom in forward") as info:
        pl_trainer.fit(model, loader(dataset))
    assert any("EvalGuard" in note and "epoch 0" in note for note in info.value.__notes__)
    assert seen["modes"] == seen["modes_before"]
    assert seen["modes"][0] is True and model.net[1].training is False
    assert same_rng(seen["rng"], seen["rng_before"])
    assert seen["stage"] == seen["stage_before"]
    assert seen["transform"] is noise


class LazyCache(Classifier):
    """Grows a cache tensor in its forward (like a rotary-embedding cache) and reuses it in training steps."""

    def __init__(self) -> None:
        super().__init__("linear")
        self.cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache is None or self.cache.shape[0] < x.shape[0]:
            self.cache = torch.ones(x.shape[0] * 2, 1)
        return super().forward(x) * self.cache[: x.shape[0]]


def test_trainer_inference_mode_false_runs_the_pass_under_no_grad(tmp_path):
    x, y = make_tensors(40)
    grad_modes: list[tuple[bool, bool]] = []

    def forward(module: pl.LightningModule, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        grad_modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return module(batch[0]), batch[1]

    guard = EvalGuard(
        {"acc": MulticlassAccuracy(num_classes=NUM_CLASSES)}, forward=forward, guards="off", batch_size=64
    )
    pl_trainer = trainer(tmp_path, max_epochs=2, callbacks=[guard], inference_mode=False)
    pl_trainer.fit(LazyCache(), loader(TensorData(x, y)))  # a cache made in inference mode would break training
    assert grad_modes and set(grad_modes) == {(False, False)}
