"""The context managers that change state for the pass restore it, also when the body raises, and nest."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import ConcatDataset, Subset

from lightning_evalguard.isolation import (
    eval_mode,
    find_attribute_holders,
    isolated_rng,
    preserved_buffers,
    swapped_attribute,
    trainer_not_training,
)

from helpers import TensorData, make_tensors, trainer


class Boom(Exception):
    pass


def test_eval_mode_keeps_a_frozen_batchnorm_frozen():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout())
    model.train()
    model[1].eval()  # frozen by the user
    with eval_mode(model):
        assert not any(module.training for module in model.modules())
    assert model.training and model[0].training and model[2].training
    assert not model[1].training


def test_eval_mode_restores_flags_when_the_body_raises():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    model.train()
    model[0].eval()
    with pytest.raises(Boom), eval_mode(model):
        raise Boom
    assert [module.training for module in model.modules()] == [True, False, True]


def test_eval_mode_nests():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    model.train()
    with eval_mode(model):
        with eval_mode(model):
            assert not model.training
        assert not model.training
    assert model.training and model[1].training


@st.composite
def module_trees(draw, depth=0):
    module = nn.Module()
    for index in range(draw(st.integers(0, 3 if depth < 3 else 0))):
        child = draw(module_trees(depth=depth + 1))
        module.add_module(f"c{index}", child)
    if draw(st.booleans()):
        module.add_module("drop", nn.Dropout())
    return module


@settings(max_examples=60, deadline=None)
@given(tree=module_trees(), data=st.data())
def test_property_every_flag_in_a_random_tree_is_restored(tree, data):
    modules = list(tree.modules())
    flags = data.draw(st.lists(st.booleans(), min_size=len(modules), max_size=len(modules)))
    for module, flag in zip(modules, flags, strict=True):
        module.training = flag
    raising = data.draw(st.booleans())
    try:
        with eval_mode(tree):
            assert not any(module.training for module in tree.modules())
            if raising:
                raise Boom
    except Boom:
        pass
    assert [module.training for module in tree.modules()] == flags


def _draw_all() -> tuple[float, float, float]:
    return torch.rand(1).item(), float(np.random.rand()), random.random()


def test_isolated_rng_restores_torch_numpy_and_python_states():
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    expected = _draw_all()
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    with isolated_rng():
        _draw_all()
        _draw_all()
    assert _draw_all() == expected


def test_isolated_rng_restores_when_the_body_raises():
    torch.manual_seed(2)
    np.random.seed(2)
    random.seed(2)
    expected = _draw_all()
    torch.manual_seed(2)
    np.random.seed(2)
    random.seed(2)
    with pytest.raises(Boom), isolated_rng():
        _draw_all()
        raise Boom
    assert _draw_all() == expected


class Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("total", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count = self.count + 1  # reassigns the buffer
        self.total.add_(x.sum(dim=0))  # updates in place
        return x


def test_preserved_buffers_restores_reassigned_and_in_place_buffers():
    module = nn.Sequential(Counter(), nn.BatchNorm1d(3))
    module.train()
    before = {name: buffer.clone() for name, buffer in module.named_buffers()}
    tensors = {name: buffer for name, buffer in module.named_buffers()}
    with preserved_buffers(module):
        module(torch.randn(4, 3))
        assert module[0].count.item() == 1
        assert not torch.equal(module[1].running_mean, before["1.running_mean"])
    for name, buffer in module.named_buffers():
        assert torch.equal(buffer, before[name])
        assert buffer is tensors[name]


def test_preserved_buffers_restores_when_the_body_raises():
    module = nn.BatchNorm1d(3)
    before = module.running_mean.clone()
    with pytest.raises(Boom), preserved_buffers(module):
        module(torch.randn(4, 3))
        raise Boom
    assert torch.equal(module.running_mean, before)


def test_attribute_holders_are_found_through_subset_and_concat():
    x, y = make_tensors(8)
    first, second = TensorData(x, y, "a"), TensorData(x, y, "b")
    wrapped = Subset(ConcatDataset([Subset(first, [0, 1]), second, first]), [0, 5])
    assert find_attribute_holders(wrapped, "transform") == [first, second]
    assert find_attribute_holders(wrapped, "missing") == []


def test_swapped_attribute_puts_each_holder_own_value_back_also_on_error():
    x, y = make_tensors(8)
    first, second = TensorData(x, y, "a"), TensorData(x, y, "b")
    with swapped_attribute([first, second], "transform", "clean"):
        assert (first.transform, second.transform) == ("clean", "clean")
    assert (first.transform, second.transform) == ("a", "b")
    with pytest.raises(Boom), swapped_attribute([first, second], "transform", None):
        raise Boom
    assert (first.transform, second.transform) == ("a", "b")


def test_trainer_not_training_restores_the_stage_also_on_error(tmp_path):
    from lightning.pytorch.trainer.states import RunningStage

    pl_trainer = trainer(tmp_path)
    pl_trainer.state.stage = RunningStage.TRAINING
    with trainer_not_training(pl_trainer):
        assert not pl_trainer.training
    assert pl_trainer.training
    with pytest.raises(Boom), trainer_not_training(pl_trainer):
        raise Boom
    assert pl_trainer.state.stage == RunningStage.TRAINING
