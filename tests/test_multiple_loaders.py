"""Several training loaders (a dict or list given to fit): one clean pass over each, keyed by the loader."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_evalguard import EvalGuard

from helpers import NUM_CLASSES, Classifier, NumpyNoise, TensorData, accuracy, loader, make_tensors, trainer


class TwoLoaders(Classifier):
    def __init__(self, names: list[str]) -> None:
        super().__init__("dropout")
        self.names = names
        self.accs = nn.ModuleDict(
            {name: MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro") for name in names}
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        parts = batch.items() if isinstance(batch, dict) else zip(self.names, batch, strict=True)
        loss = torch.zeros(())
        for name, (x, y) in parts:
            logits = self(x)
            loss = loss + nn.functional.cross_entropy(logits, y)
            self.accs[name](logits, y)
            self.log(f"train/{name}/acc", self.accs[name], on_step=False, on_epoch=True)
        return loss


@pytest.mark.parametrize("container", ["dict", "list"])
def test_each_training_loader_gets_its_own_clean_pass_and_keys(tmp_path, container):
    xa, ya = make_tensors(40, seed=1)
    xb, yb = make_tensors(24, seed=2)
    loaders = [loader(TensorData(xa, ya, NumpyNoise())), loader(TensorData(xb, yb, NumpyNoise()), batch_size=8)]
    names = ["a", "b"] if container == "dict" else ["0", "1"]
    train = dict(zip(names, loaders, strict=True)) if container == "dict" else loaders
    guard = EvalGuard(
        {"acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")}, eval_transform=nn.Identity()
    )
    model = TwoLoaders(names)
    pl_trainer = trainer(tmp_path, max_epochs=2, callbacks=[guard])
    pl_trainer.fit(model, train)
    last = guard.history[-1]
    assert set(last["clean"]) == {f"{names[0]}/acc", f"{names[1]}/acc"}
    assert last["clean"][f"{names[0]}/acc"] == pytest.approx(accuracy(model, xa, ya), abs=1e-6)
    assert last["clean"][f"{names[1]}/acc"] == pytest.approx(accuracy(model, xb, yb), abs=1e-6)
    for name in names:
        running = float(pl_trainer.callback_metrics[f"train/{name}/acc"])
        assert last["running"][f"{name}/acc"] == pytest.approx(running)
        assert float(pl_trainer.callback_metrics[f"evalguard/gap/{name}/acc"]) == pytest.approx(
            last["clean"][f"{name}/acc"] - running, abs=1e-6
        )
