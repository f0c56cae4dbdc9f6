"""The package's public names are exactly those in ``__all__``."""

from __future__ import annotations

import inspect

import lightning_evalguard


def test_all_lists_the_public_names():
    public = {name for name in dir(lightning_evalguard) if not name.startswith("_")}
    modules = {name for name in public if inspect.ismodule(getattr(lightning_evalguard, name))}
    assert set(lightning_evalguard.__all__) == public - modules
    assert "EvalGuard" in lightning_evalguard.__all__


def test_every_constructor_argument_is_annotated_for_lightning_cli():
    signature = inspect.signature(lightning_evalguard.EvalGuard.__init__)
    for name, parameter in signature.parameters.items():
        if name != "self":
            assert parameter.annotation is not inspect.Parameter.empty, name
    expected = [
        "metrics", "dataloader", "eval_transform", "transform_attr", "running", "forward",
        "every_n_epochs", "limit_batches", "batch_size", "prefix",
    ]  # fmt: skip
    assert list(signature.parameters)[1 : 1 + len(expected)] == expected
