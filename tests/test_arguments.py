"""Wrong arguments fail at construction with the argument's name, what was expected and what was given."""

from __future__ import annotations

import pytest
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_evalguard import EvalGuard

from helpers import macro_accuracy, metric_template


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"metrics": "accuracy"}, TypeError, r"`metrics` must be .*got 'accuracy' that is a str"),
        ({"metrics": {"acc": "accuracy"}}, TypeError, r"`metrics\['acc'\]` must be a torchmetrics.Metric"),
        ({"metrics": {}}, ValueError, r"`metrics` must hold at least one metric"),
        ({"metrics": {"a.b": macro_accuracy()}}, ValueError, r"`metrics` keys must be non-empty and contain no '.'"),
        ({"every_n_epochs": 0}, ValueError, r"`every_n_epochs` must be an int >= 1 \(got 0\)"),
        ({"every_n_epochs": 1.0}, TypeError, r"`every_n_epochs` must be an int >= 1 \(got 1.0 that is a float\)"),
        ({"limit_batches": 0}, ValueError, r"`limit_batches` must be an int >= 1 .*\(got 0\)"),
        ({"limit_batches": -3}, ValueError, r"`limit_batches` must be an int >= 1 .*\(got -3\)"),
        ({"limit_batches": 1.5}, ValueError, r"`limit_batches` as a float .* in \(0, 1\] \(got 1.5\)"),
        ({"limit_batches": 0.0}, ValueError, r"`limit_batches` as a float .* in \(0, 1\] \(got 0.0\)"),
        ({"limit_batches": "all"}, ValueError, r"`limit_batches` as a string must be 'auto'.*got 'all'"),
        ({"limit_batches": [1]}, TypeError, r"`limit_batches` must be None, an int .* or 'auto' \(got \[1\]"),
        ({"limit_batches": True}, TypeError, r"`limit_batches` must be None"),
        ({"batch_size": 0}, ValueError, r"`batch_size` must be None or an int >= 1 \(got 0\)"),
        ({"batch_size": 8.0}, TypeError, r"`batch_size` must be None or an int >= 1 \(got 8.0 that is a float\)"),
        ({"eval_transform": 42}, TypeError, r"`eval_transform` must be a callable, 'val' or None \(got 42 that is"),
        ({"eval_transform": "train"}, ValueError, r"`eval_transform` must be a callable, 'val' .*\(got 'train'\)"),
        ({"running": ["train_acc"]}, TypeError, r"`running` must be a mapping .*got \['train_acc'\] that is a list"),
        ({"running": {"acc": 1}}, TypeError, r"`running` must map str metric names to str keys"),
        ({"running": {"loss": "train_loss"}}, ValueError, r"`running` names metric 'loss', which is not among"),
        ({"dataloader": [1, 2]}, TypeError, r"`dataloader` must be a DataLoader, a callable"),
        ({"forward": "model"}, TypeError, r"`forward` must be a callable"),
        ({"transform_attr": ""}, ValueError, r"`transform_attr` must be a non-empty str"),
        ({"prefix": None}, TypeError, r"`prefix` must be a str \(got None that is a NoneType\)"),
        ({"seed": "0"}, TypeError, r"`seed` must be an int"),
        ({"guards": "strict"}, ValueError, r"`guards` must be 'raise', 'warn' or 'off' \(got 'strict'\)"),
        (
            {"metrics": MulticlassAccuracy},
            TypeError,
            r"`metrics` must be a torchmetrics Metric object, but got the class MulticlassAccuracy itself: instantiate it",
        ),
        (
            {"metrics": {"acc": MulticlassAccuracy}},
            TypeError,
            r"`metrics\['acc'\]` must be a torchmetrics Metric object, but got the class MulticlassAccuracy",
        ),
        ({"guards": True}, TypeError, r"`guards` must be 'raise', 'warn' or 'off' \(got True that is a bool\)"),
        ({"guards": None}, TypeError, r"`guards` must be 'raise', 'warn' or 'off' \(got None that is a NoneType\)"),
        ({"seed": -1}, ValueError, r"`seed` must be an int in \[0, 2\*\*32 - 1\] \(got -1\)"),
        ({"seed": 2**32}, ValueError, r"`seed` must be an int in \[0, 2\*\*32 - 1\] \(got 4294967296\)"),
        ({"seed": 2**40}, ValueError, r"`seed` must be an int in \[0, 2\*\*32 - 1\]"),
        ({"decompose": "yes"}, TypeError, r"`decompose` must be a bool \(got 'yes' that is a str\)"),
        ({"print_summary": 1}, TypeError, r"`print_summary` must be a bool \(got 1 that is a int\)"),
        ({"val": ["val_acc"]}, TypeError, r"`val` must be a mapping .*got \['val_acc'\] that is a list"),
        ({"val": {"loss": "val_loss"}}, ValueError, r"`val` names metric 'loss', which is not among"),
    ],
)
def test_wrong_argument_raises_naming_it(kwargs, error, match):
    arguments = {"metrics": {"acc": macro_accuracy()}, **kwargs}
    metrics = arguments.pop("metrics")
    with pytest.raises(error, match=match):
        EvalGuard(metrics, **arguments)


def test_metric_names_follow_metric_collection():
    assert EvalGuard(macro_accuracy()).metric_names == ["MulticlassAccuracy"]
    collection = MetricCollection([macro_accuracy()], prefix="p_", postfix="_q")
    assert EvalGuard(collection).metric_names == ["MulticlassAccuracy"]  # base names: the prefixed ones are the keys
    assert collection.prefix == "p_" and list(collection.keys()) == ["p_MulticlassAccuracy_q"]  # the user's, as given
    assert sorted(EvalGuard({"acc": macro_accuracy(), "top": macro_accuracy()}).metric_names) == ["acc", "top"]


def test_user_metric_objects_are_cloned_not_shared():
    metric = macro_accuracy()
    guard = EvalGuard({"acc": metric})
    clone = metric_template(guard)["acc"]
    assert clone is not metric
    clone.update(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([0]))
    assert not metric.update_called


def test_valid_arguments_are_kept():
    guard = EvalGuard(
        {"acc": macro_accuracy()}, every_n_epochs=3, limit_batches=0.5, batch_size=32, prefix="eg", running={"acc": "t"}
    )
    assert (guard.every_n_epochs, guard.limit_batches, guard.batch_size, guard.prefix) == (3, 0.5, 32, "eg")
    assert guard.running == {"acc": "t"}
    assert EvalGuard(macro_accuracy(), limit_batches=1.0).limit_batches == 1.0
    assert EvalGuard(macro_accuracy(), limit_batches=4).limit_batches == 4
