"""Set-ups built the way third-party pipelines build them: random ops that fire by chance, augmentation objects with
their own generators, albumentations."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from lightning_evalguard import EvalGuard, EvalGuardError

from helpers import (
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


class RandomFlip(nn.Module):
    """Flips the whole batch with probability p and ignores eval mode, as kornia and torchvision.transforms.v2 do."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if torch.rand(1).item() >= self.p else x.flip(-1)


class FlipsInside(NoTraining):
    def __init__(self, p: float) -> None:
        super().__init__("linear")
        self.flip = RandomFlip(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.flip(x))


class FlipsInHook(NoTraining):
    def __init__(self, p: float) -> None:
        super().__init__("linear")
        self.p = p

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch  # not gated on self.trainer.training
        return (x if torch.rand(1).item() >= self.p else x.flip(-1)), y


@pytest.mark.parametrize("p", [0.05, 0.5, 0.95])
def test_a_random_op_in_the_model_is_caught_before_training_whatever_its_probability(tmp_path, p):
    x, y = make_tensors(32)
    guard = EvalGuard({"acc": micro_accuracy()}, eval_transform=nn.Identity())
    with pytest.raises(EvalGuardError, match=r"draws random numbers, first in module 'flip' \(RandomFlip\)"):
        trainer(tmp_path, callbacks=[guard]).fit(FlipsInside(p), loader(TensorData(x, y, NumpyNoise())))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.95])
def test_a_random_op_in_an_ungated_batch_hook_is_caught_before_training_whatever_its_probability(tmp_path, p):
    x, y = make_tensors(32)
    guard = EvalGuard({"acc": micro_accuracy()}, eval_transform=nn.Identity())
    with pytest.raises(EvalGuardError, match=r"FlipsInHook.on_after_batch_transfer draws random numbers while"):
        trainer(tmp_path, callbacks=[guard]).fit(FlipsInHook(p), loader(TensorData(x, y, NumpyNoise())))


class RareFlipData(TensorData):
    """Flips a sample with probability p in __getitem__ (a random transform that rarely fires)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, p: float) -> None:
        super().__init__(x, y)
        self.p = p

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().__getitem__(index)
        return (x.flip(-1) if random.random() < self.p else x), y


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_rarely_firing_dataset_transform_is_caught_before_training_also_with_workers(tmp_path, num_workers):
    x, y = make_tensors(32)
    guard = EvalGuard({"acc": micro_accuracy()})
    data = loader(RareFlipData(x, y, p=1e-9), num_workers=num_workers)  # never fires here: it still draws
    with pytest.raises(EvalGuardError, match=r"producing the first clean batch drew from the Python random"):
        trainer(tmp_path, callbacks=[guard]).fit(NoTraining("linear"), data)


class LateNoise(Classifier):
    """From the second epoch on, its batch hook draws a random number while trainer.training is False."""

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.current_epoch >= 1 and not self.trainer.training:
            torch.rand(1)
        return batch


def test_the_guard_inside_the_pass_names_what_draws(tmp_path):
    x, y = make_tensors(32)
    guard = EvalGuard({"acc": micro_accuracy()}, eval_transform=nn.Identity())
    with pytest.raises(
        EvalGuardError,
        match=r"after epoch 1 was not clean: during it, torch CPU RNG state changed.*The first that draws random"
        r" numbers on the first clean batch: LateNoise.on_after_batch_transfer \(with trainer.training False\)",
    ):
        trainer(tmp_path, callbacks=[guard]).fit(LateNoise("linear"), loader(TensorData(x, y, NumpyNoise())))
    assert [entry["epoch"] for entry in guard.history] == [0]


class NumpyGeneratorNoise:
    """Noise from a numpy Generator the transform owns (not numpy's global RNG)."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(7)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.from_numpy(self.rng.normal(0.0, 0.5, size=tuple(x.shape))).to(x.dtype)


class TorchGeneratorNoise:
    """Noise from a torch.Generator the transform owns."""

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(7)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * torch.randn(x.shape, generator=self.generator)


def python_random_noise() -> Any:
    """Noise from a random.Random the transform closes over (a transform written as a function)."""
    rng = random.Random(7)
    return lambda x: x + torch.tensor([rng.gauss(0.0, 0.5) for _ in range(x.numel())]).reshape(x.shape)


OWN_GENERATORS = [NumpyGeneratorNoise, TorchGeneratorNoise, python_random_noise]


@pytest.mark.parametrize("make_transform", OWN_GENERATORS, ids=["numpy", "torch", "python"])
def test_decompose_leaves_a_transform_with_its_own_generator_as_it_found_it(tmp_path, make_transform):
    guard = assert_training_unchanged_by(
        tmp_path,
        lambda: EvalGuard({"acc": micro_accuracy()}, eval_transform=nn.Identity(), decompose=True),
        make_transform=make_transform,
    )
    assert [entry["epoch"] for entry in guard.history] == [0, 1, 2]  # type: ignore[attr-defined]


@pytest.mark.filterwarnings("ignore::lightning_evalguard.EvalGuardWarning")
@pytest.mark.parametrize("make_transform", OWN_GENERATORS, ids=["numpy", "torch", "python"])
def test_guards_drawing_augmented_batches_leave_a_transform_with_its_own_generator_as_it_found_it(
    tmp_path, make_transform
):
    # No eval_transform: augmentation stays on, the guards draw augmented batches and only warn, every pass runs it.
    guard = assert_training_unchanged_by(
        tmp_path, lambda: EvalGuard({"acc": micro_accuracy()}, guards="warn"), make_transform=make_transform
    )
    assert [entry["epoch"] for entry in guard.history] == [0, 1, 2]  # type: ignore[attr-defined]


def albumentations_transform() -> Any:
    """An albumentations 2.x pipeline with its own seed, applied to each sample seen as a 1 x 2 x 3 image."""
    import albumentations  # in the test extra

    compose = albumentations.Compose([albumentations.HorizontalFlip(p=0.5), albumentations.GaussNoise(p=0.5)], seed=137)
    return lambda x: torch.from_numpy(compose(image=x.numpy().reshape(1, 2, 3))["image"].copy()).reshape(x.shape)


@pytest.mark.filterwarnings("ignore::lightning_evalguard.EvalGuardWarning")
@pytest.mark.parametrize("decompose", [True, False])
def test_an_albumentations_pipeline_with_its_own_seed_trains_bit_identically(tmp_path, decompose):
    assert NUM_FEATURES == 6  # seen as a 1 x 2 x 3 image
    arguments: dict[str, Any] = (
        {"eval_transform": nn.Identity(), "decompose": True} if decompose else {"guards": "warn"}
    )
    assert_training_unchanged_by(
        tmp_path,
        lambda: EvalGuard({"acc": micro_accuracy()}, **arguments),
        make_transform=albumentations_transform,
        epochs=2,
    )


def jitter(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    return x + torch.from_numpy(rng.normal(0.0, 0.5, size=tuple(x.shape))).to(x.dtype)


def partial_noise() -> Any:
    """A transform written with functools.partial, its generator among the partial's arguments."""
    import functools

    return functools.partial(jitter, rng=np.random.default_rng(5))


class SlottedNoise:
    """Noise from a torch.Generator held in a slot of a base class."""

    __slots__ = ("generator",)

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(3)


class SlottedNoiseChild(SlottedNoise):
    __slots__ = ()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * torch.randn(x.shape, generator=self.generator)


@pytest.mark.parametrize("make_transform", [partial_noise, SlottedNoiseChild], ids=["partial", "inherited-slot"])
def test_generators_behind_a_partial_or_an_inherited_slot_are_put_back(tmp_path, make_transform):
    assert_training_unchanged_by(
        tmp_path,
        lambda: EvalGuard({"acc": micro_accuracy()}, eval_transform=nn.Identity(), decompose=True),
        make_transform=make_transform,
        epochs=2,
    )


class Unreadable(dict):  # type: ignore[type-arg]
    """A mapping whose values cannot all be read (a Hydra DictConfig with a missing value does that)."""

    def values(self) -> Any:
        raise RuntimeError("missing mandatory value")


class OddAttributes(Classifier):
    def __init__(self) -> None:
        super().__init__("both")
        self.system_rng = random.SystemRandom()  # a generator without state
        self.cfg = Unreadable(lr=0.1)


def test_a_stateless_generator_and_an_unreadable_mapping_on_the_model_do_not_break_the_fit(tmp_path):
    x, y = make_tensors(32)
    guard = EvalGuard({"acc": micro_accuracy()}, eval_transform=nn.Identity())
    trainer(tmp_path, max_epochs=2, callbacks=[guard]).fit(OddAttributes(), loader(TensorData(x, y, NumpyNoise())))
    assert [entry["epoch"] for entry in guard.history] == [0, 1]
