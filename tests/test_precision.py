"""The forward runs as in validation under every precision; metric states stay in float32 or wider."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_evalguard import EvalGuard

from helpers import Classifier, MeanLogit, TensorData, loader, make_tensors, metric_clones, micro_accuracy, trainer

pytestmark = pytest.mark.filterwarnings("ignore:EvalGuard found no running metric", "ignore::UserWarning")


def independent(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        if precision == "bf16-mixed":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x)
        elif precision == "64-true":
            logits = model(x.double())
        elif precision == "bf16-true":
            logits = model(x.bfloat16())
        else:
            logits = model(x)
    return (logits.argmax(dim=1) == y).double().mean().item(), logits[:, 0].double().mean().item()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "64-true", "bf16-true"])
def test_clean_pass_under_each_precision_equals_validation_style_computation(tmp_path, precision):
    x, y = make_tensors(40)
    guard = EvalGuard({"acc": micro_accuracy(), "logit": MeanLogit()}, batch_size=40)
    model = Classifier("batchnorm")
    trainer(tmp_path, max_epochs=1, callbacks=[guard], precision=precision).fit(model, loader(TensorData(x, y)))
    acc, logit = independent(model, x, y, precision)
    assert guard.history[-1]["clean"]["acc"] == pytest.approx(acc, abs=1e-6)
    assert guard.history[-1]["clean"]["logit"] == pytest.approx(logit, rel=1e-6, abs=1e-6)
    (collection,) = metric_clones(guard).values()
    for metric in collection.values():
        for state in metric.metric_state.values():
            if isinstance(state, torch.Tensor) and state.is_floating_point():
                assert torch.finfo(state.dtype).bits >= 32 and state.dtype != torch.bfloat16, (precision, state.dtype)
