"""Property-based checks over drawn configurations: training with EvalGuard is bit-identical to training without it,
the clean values equal an independent eval-mode computation at every evaluated epoch, and an invalid set-up fails
before the first training step or not at all."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Subset, SubsetRandomSampler
from torchmetrics.classification import BinaryAccuracy

from lightning_evalguard import EvalGuard

from helpers import Classifier, CountSamples, NumpyNoise, TensorData, make_tensors, micro_accuracy, trainer

PROPERTY_SETTINGS = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI is not flaky
    database=None,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: a failure reports its drawn configuration at once
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class DictData(TensorData):
    def __getitem__(self, index: int) -> Any:
        x, y = super().__getitem__(index)
        return {"x": x, "y": y}


class Model(Classifier):
    """A Classifier that takes tuple or dict batches, and remembers whether a training step ran."""

    stepped = False

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict):
            batch = (batch["x"], batch["y"])
        return super().on_after_batch_transfer(batch, dataloader_idx)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.stepped = True
        return super().training_step(batch, batch_idx)


def dict_forward(module: pl.LightningModule, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return module(batch[0]), batch[1]


class Independent(pl.Callback):
    """After EvalGuard at every evaluated epoch: the clean accuracy computed from a copy of the model in eval mode."""

    def __init__(self, guard: EvalGuard, x: torch.Tensor, y: torch.Tensor, indices: list[int]) -> None:
        self.guard, self.x, self.y, self.indices = guard, x, y, indices
        self.pairs: list[tuple[float, float, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.guard.history or self.guard.history[-1]["epoch"] != trainer.current_epoch:
            return
        model = copy.deepcopy(pl_module).eval()
        with torch.no_grad():
            x, y = self.x[self.indices], self.y[self.indices]
            accuracy = (model(x).argmax(1) == y).double().mean().item()
        clean = self.guard.history[-1]["clean"]
        self.pairs.append((clean["acc"], accuracy, clean["n"]))


configurations = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["linear", "dropout", "batchnorm", "both"]),
        "frozen_batchnorm": st.booleans(),
        "batch_noise": st.sampled_from([0.0, 0.3]),
        "n": st.integers(17, 45),
        "batch_size": st.integers(3, 16),
        "wrapper": st.sampled_from(["plain", "subset", "concat"]),
        "sampler": st.sampled_from(["shuffle", "sequential", "subset"]),
        "dict_batches": st.booleans(),
        "eval_transform": st.sampled_from(["identity", "val"]),
        "limit_batches": st.sampled_from([None, None, 0.5, 2]),
        "every_n_epochs": st.sampled_from([1, 1, 2]),
        "decompose": st.booleans(),
        "cache": st.booleans(),
        "guards": st.sampled_from(["raise", "warn"]),
        "clean_batch_size": st.sampled_from([None, 7]),
        "seed": st.integers(0, 2**32 - 1),
    }
)


def build(config: dict[str, Any]) -> tuple[Any, ...]:
    x, y = make_tensors(config["n"])
    data_class = DictData if config["dict_batches"] else TensorData
    base = data_class(x, y, NumpyNoise())
    half = config["n"] // 2
    dataset: Any = {
        "plain": base,
        "subset": Subset(base, list(range(config["n"]))),
        "concat": ConcatDataset([Subset(base, list(range(half))), Subset(base, list(range(half, config["n"])))]),
    }[config["wrapper"]]
    indices = list(range(config["n"]))
    if config["sampler"] == "subset":
        indices = list(range(0, config["n"], 2))
    # at least two training batches, none of one sample (BatchNorm in train mode cannot take it)
    options: dict[str, Any] = {"batch_size": min(config["batch_size"], len(indices) // 2), "drop_last": True}
    if config["sampler"] == "subset":
        options["sampler"] = SubsetRandomSampler(indices)
    else:
        options["shuffle"] = config["sampler"] == "shuffle"
    train = DataLoader(dataset, **options)
    val = DataLoader(data_class(x, y, nn.Identity()), batch_size=16) if config["eval_transform"] == "val" else None
    model = Model(config["kind"], batch_noise=config["batch_noise"])
    if config["frozen_batchnorm"] and config["kind"] in ("batchnorm", "both"):
        model.net[1].eval()
    return x, y, indices, train, val, model


def make_guard(config: dict[str, Any]) -> EvalGuard:
    return EvalGuard(
        {"acc": micro_accuracy(), "n": CountSamples()},
        eval_transform=nn.Identity() if config["eval_transform"] == "identity" else "val",
        forward=dict_forward if config["dict_batches"] else None,
        limit_batches=config["limit_batches"],
        every_n_epochs=config["every_n_epochs"],
        decompose=config["decompose"],
        cache=config["cache"],
        guards=config["guards"],
        batch_size=config["clean_batch_size"],
        seed=config["seed"],
        print_summary=False,
    )


@pytest.mark.filterwarnings("ignore::lightning_evalguard.EvalGuardWarning", "ignore::UserWarning")
@PROPERTY_SETTINGS
@given(config=configurations)
def test_training_is_bit_identical_and_clean_values_exact(tmp_path_factory, config):
    weights = []
    for with_guard in (False, True):
        pl.seed_everything(0, verbose=False)
        x, y, indices, train, val, model = build(config)
        guard = make_guard(config)
        independent = Independent(guard, x, y, indices)
        callbacks = [guard, independent] if with_guard else []
        pl_trainer = trainer(tmp_path_factory.mktemp("fit"), max_epochs=3, deterministic=True, callbacks=callbacks)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl_trainer.fit(model, train, val)
        weights.append({key: value.clone() for key, value in model.state_dict().items()})
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), (key, config)
    evaluated = [epoch for epoch in range(3) if (epoch + 1) % config["every_n_epochs"] == 0]
    assert [entry["epoch"] for entry in guard.history] == evaluated
    assert len(independent.pairs) == len(evaluated)
    for clean, accuracy, count in independent.pairs:
        if config["limit_batches"] is None:
            assert clean == pytest.approx(accuracy, abs=1e-6), config
            assert count == len(indices)
        else:
            assert 0 < count <= len(indices)


invalid_setups = st.sampled_from(
    ["augmentation_on", "dict_without_forward", "val_without_validation", "decompose_with_own_loader", "binary_metric"]
)


@pytest.mark.filterwarnings("ignore::UserWarning")
@PROPERTY_SETTINGS
@given(mistake=invalid_setups, config=configurations)
def test_an_invalid_set_up_fails_before_the_first_step_or_not_at_all(tmp_path_factory, mistake, config):
    config = {**config, "guards": "raise"}
    if mistake == "dict_without_forward":
        config["dict_batches"] = True
    if mistake == "val_without_validation":
        config["eval_transform"] = "val"
    _, _, _, train, val, model = build(config)
    guard = make_guard(config)
    if mistake == "augmentation_on":
        guard = EvalGuard({"acc": micro_accuracy()}, forward=guard.forward)
    elif mistake == "dict_without_forward":
        guard = EvalGuard({"acc": micro_accuracy()}, eval_transform=nn.Identity())
    elif mistake == "val_without_validation":
        val = None
    elif mistake == "decompose_with_own_loader":
        own = DataLoader(train.dataset, batch_size=8)
        guard = EvalGuard({"acc": micro_accuracy()}, dataloader=own, decompose=True, forward=guard.forward)
    elif mistake == "binary_metric":
        guard = EvalGuard({"acc": BinaryAccuracy()}, eval_transform=nn.Identity(), forward=guard.forward)
    pl_trainer = trainer(tmp_path_factory.mktemp("fit"), max_epochs=2, callbacks=[guard])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl_trainer.fit(model, train, val)
    except Exception:
        assert not model.stepped, (mistake, config)
