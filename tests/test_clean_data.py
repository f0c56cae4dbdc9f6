"""Where clean batches come from, in which order of precedence, and how they reach the model."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, IterableDataset, Subset
from torchmetrics import SumMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_evalguard import EvalGuard

from helpers import (
    NUM_CLASSES,
    Classifier,
    NoTraining,
    NumpyNoise,
    TensorData,
    accuracy,
    loader,
    make_tensors,
    metric_clones,
    trainer,
)

pytestmark = pytest.mark.filterwarnings("ignore:EvalGuard found no running metric")


class Tag:
    """A transform that marks samples: x + offset, so the test can tell which transform produced a batch."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset


class Recorder(SumMetric):
    """Records the first input value of every sample it sees (update(preds, target) with preds = inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[float] = []

    def update(self, preds: Any, target: Any) -> None:  # type: ignore[override]
        self.seen.extend(preds[:, 0].tolist())
        super().update(torch.tensor(float(len(target))))


def inputs_forward(module: pl.LightningModule, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return batch[0], batch[1]


def recorder_of(guard: EvalGuard) -> Recorder:
    (collection,) = metric_clones(guard).values()
    return collection["seen"]


def fit(tmp_path: Any, guard: EvalGuard, model: pl.LightningModule | None = None, **kwargs: Any) -> pl.Trainer:
    pl_trainer = trainer(tmp_path, max_epochs=kwargs.pop("max_epochs", 1), callbacks=[guard])
    pl_trainer.fit(model or Classifier("linear"), **kwargs)
    return pl_trainer


class WithValidation(Classifier):
    """A Classifier with an empty validation step: Lightning runs validation, which logs nothing."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass


def test_rebuilt_loader_sets_eval_transform_through_subset_and_concat_and_puts_it_back(tmp_path):
    x, y = make_tensors(30)
    first, second = TensorData(x[:20], y[:20], Tag(100.0)), TensorData(x[20:], y[20:], Tag(200.0))
    train = ConcatDataset([Subset(first, list(range(0, 20, 2))), second])  # 10 + 10 samples
    guard = EvalGuard({"seen": Recorder()}, eval_transform=Tag(0.5), forward=inputs_forward)
    fit(tmp_path, guard, train_dataloaders=loader(train, batch_size=4))
    seen = recorder_of(guard).seen
    expected = [x[i, 0].item() + 0.5 for i in range(0, 20, 2)] + [x[i, 0].item() + 0.5 for i in range(20, 30)]
    assert seen == pytest.approx(expected)  # every sample once, in order, with the eval transform
    assert first.transform.offset == 100.0 and second.transform.offset == 200.0


def test_eval_transform_val_takes_the_validation_dataset_transform(tmp_path):
    x, y = make_tensors(24)
    train, val = TensorData(x, y, Tag(100.0)), TensorData(x, y, Tag(0.25))

    guard = EvalGuard({"seen": Recorder()}, eval_transform="val", forward=inputs_forward)
    model = WithValidation("linear")
    fit(tmp_path, guard, model, train_dataloaders=loader(train), val_dataloaders=loader(val, shuffle=False))
    assert recorder_of(guard).seen == pytest.approx((x[:, 0] + 0.25).tolist())
    assert train.transform.offset == 100.0


def test_eval_transform_val_before_any_validation_uses_the_module_val_dataloader(tmp_path):
    x, y = make_tensors(24)
    val = TensorData(x, y, Tag(0.75))

    class WithVal(Classifier):
        def val_dataloader(self) -> DataLoader[Any]:
            return loader(val, shuffle=False)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            pass

    guard = EvalGuard({"seen": Recorder()}, eval_transform="val", forward=inputs_forward)
    pl_trainer = trainer(tmp_path, max_epochs=1, callbacks=[guard], check_val_every_n_epoch=5)
    pl_trainer.fit(WithVal("linear"), train_dataloaders=loader(TensorData(x, y, Tag(100.0))))
    assert recorder_of(guard).seen == pytest.approx((x[:, 0] + 0.75).tolist())


def test_eval_transform_without_the_attribute_fails_before_training(tmp_path):
    x, y = make_tensors(16)

    class NoTransform(torch.utils.data.TensorDataset):
        pass

    model = NoTraining("linear")
    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES)}, eval_transform=Tag(0.0))
    with pytest.raises(
        ValueError,
        match=r"by setting the dataset attribute 'transform', but the dataset of the training loader \(NoTransform\) has"
        r" none.*not a Hugging Face datasets.Dataset.*`transform_attr=`.*`dataloader=`.*`clean_train_dataloader\(\)`",
    ):
        fit(tmp_path, guard, model, train_dataloaders=loader(NoTransform(x, y)))


def test_custom_transform_attr(tmp_path):
    x, y = make_tensors(12)

    class Other(TensorData):
        def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
            return self.augment(self.x[index]), self.y[index]

    data = Other(x, y)
    data.augment = Tag(100.0)
    guard = EvalGuard({"seen": Recorder()}, eval_transform=Tag(0.0), transform_attr="augment", forward=inputs_forward)
    fit(tmp_path, guard, train_dataloaders=loader(data))
    assert recorder_of(guard).seen == pytest.approx(x[:, 0].tolist())


def test_dataloader_argument_comes_first_and_a_callable_gets_the_trainer(tmp_path):
    x, y = make_tensors(20)
    explicit = DataLoader(TensorData(x, y, Tag(1.0)), batch_size=7)
    calls: list[Any] = []

    def build(pl_trainer: pl.Trainer) -> DataLoader[Any]:
        calls.append(pl_trainer)
        return explicit

    class WithHook(Classifier):
        def clean_train_dataloader(self) -> DataLoader[Any]:
            raise AssertionError("the hook must not be used when dataloader= is given")

    for argument in (explicit, build):
        guard = EvalGuard({"seen": Recorder()}, dataloader=argument, eval_transform=Tag(5.0), forward=inputs_forward)
        pl_trainer = fit(tmp_path, guard, WithHook("linear"), train_dataloaders=loader(TensorData(x, y, Tag(100.0))))
        assert recorder_of(guard).seen == pytest.approx((x[:, 0] + 1.0).tolist())
    assert calls == [pl_trainer]


class HookData(pl.LightningDataModule):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__()
        self.x, self.y = x, y

    def train_dataloader(self) -> DataLoader[Any]:
        return loader(TensorData(self.x, self.y, Tag(100.0)))

    def clean_train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(TensorData(self.x, self.y, Tag(2.0)), batch_size=5)


def test_datamodule_hook_comes_before_the_module_hook_and_the_rebuilt_loader(tmp_path):
    x, y = make_tensors(20)

    class WithHook(Classifier):
        def clean_train_dataloader(self) -> DataLoader[Any]:
            return DataLoader(TensorData(x, y, Tag(3.0)), batch_size=5)

    guard = EvalGuard({"seen": Recorder()}, eval_transform=Tag(9.0), forward=inputs_forward)
    fit(tmp_path, guard, WithHook("linear"), datamodule=HookData(x, y))
    assert recorder_of(guard).seen == pytest.approx((x[:, 0] + 2.0).tolist())

    guard = EvalGuard({"seen": Recorder()}, eval_transform=Tag(9.0), forward=inputs_forward)
    fit(tmp_path, guard, WithHook("linear"), train_dataloaders=loader(TensorData(x, y, Tag(100.0))))
    assert recorder_of(guard).seen == pytest.approx((x[:, 0] + 3.0).tolist())


class HookedModule(Classifier):
    """Normalises in every hook and augments only when ``trainer.training`` (Lightning's documented pattern)."""

    def __init__(self) -> None:
        super().__init__("both")
        self.calls: list[tuple[str, bool]] = []

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.calls.append(("before", self.trainer.training))
        x, y = batch
        return x * 2.0, y

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        self.calls.append(("transfer", self.trainer.training))
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.calls.append(("after", self.trainer.training))
        x, y = batch
        if self.trainer.training:
            x = x + torch.randn_like(x)  # augmentation
        return x - 1.0, y  # normalisation


def test_batches_go_through_the_transfer_hooks_with_trainer_training_false(tmp_path):
    x, y = make_tensors(40)
    model = HookedModule()
    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")}, guards="off")
    pl_trainer = fit(tmp_path, guard, model, max_epochs=2, train_dataloaders=loader(TensorData(x, y)))
    pass_calls = [name for name, training in model.calls if not training]
    assert pass_calls == ["before", "transfer", "after"] * (
        1 + 3 * 2
    )  # the fit-start check's batch; 3 batches, 2 passes
    assert pl_trainer.training is False  # after fit; during fit the stage was restored before logging
    # normalisation ran, augmentation did not: the clean value is the deterministic normalised computation
    assert guard.history[-1]["clean"]["acc"] == pytest.approx(accuracy(model, x * 2.0 - 1.0, y), abs=1e-6)


def test_datamodule_batch_hooks_are_used_like_in_training(tmp_path):
    x, y = make_tensors(20)
    calls: list[bool] = []

    class Hooked(HookData):
        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            calls.append(self.trainer.training)
            return batch

    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES)}, guards="off")
    fit(tmp_path, guard, datamodule=Hooked(x, y))
    assert calls.count(False) == 1 + 4  # the fit-start check's batch; the datamodule hook's loader: 20 samples, batch 5


def test_forward_runs_under_the_precision_context(tmp_path):
    x, y = make_tensors(16)
    autocast: list[bool] = []

    def forward(module: pl.LightningModule, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        autocast.append(torch.is_autocast_enabled("cpu"))
        return module(batch[0]), batch[1]

    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES)}, forward=forward, guards="off")
    pl_trainer = trainer(tmp_path, max_epochs=1, callbacks=[guard], precision="bf16-mixed")
    pl_trainer.fit(Classifier("linear"), loader(TensorData(x, y)))
    assert autocast == [True, True]  # the fit-start check's forward, then the pass's one batch


class IndexData(TensorData):
    """Returns (x, y, index), so a metric can record which samples the pass saw."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index], torch.tensor(index)


def index_forward(module: pl.LightningModule, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return batch[0], batch[2]


class SeenIndices(SumMetric):
    def __init__(self) -> None:
        super().__init__()
        self.indices: list[list[int]] = []

    def reset(self) -> None:
        super().reset()
        self.indices.append([])

    def update(self, preds: Any, target: Any) -> None:  # type: ignore[override]
        self.indices[-1].extend(target.tolist())
        super().update(torch.tensor(float(len(target))))


@pytest.mark.parametrize(("limit", "expected"), [(0.25, 25), (2, 16), (1.0, 100), (50, 100)])
def test_limit_batches_is_a_fixed_subset_the_same_every_epoch(tmp_path, limit, expected):
    x, y = make_tensors(100)
    guard = EvalGuard({"seen": SeenIndices()}, limit_batches=limit, batch_size=8, forward=index_forward)
    fit(tmp_path, guard, max_epochs=3, train_dataloaders=loader(IndexData(x, y)))
    passes = [indices for indices in recorder_of(guard).indices if indices]
    assert len(passes) == 3
    assert all(indices == passes[0] for indices in passes)
    assert len(passes[0]) == len(set(passes[0])) == expected
    if expected < 100:
        assert passes[0] != list(range(expected))  # random, not the first samples
        assert guard.state_dict()["subsets"][""] == passes[0]


def test_limit_batches_subset_is_the_same_after_a_resume(tmp_path):
    x, y = make_tensors(100)

    def run(max_epochs: int, ckpt_path: Any = None) -> tuple[EvalGuard, pl.Trainer]:
        guard = EvalGuard({"seen": SeenIndices()}, limit_batches=0.2, seed=7, forward=index_forward)
        pl_trainer = trainer(tmp_path, max_epochs=max_epochs, callbacks=[guard], enable_checkpointing=True)
        pl_trainer.fit(Classifier("linear"), loader(IndexData(x, y)), ckpt_path=ckpt_path)
        return guard, pl_trainer

    first, pl_trainer = run(1)
    ckpt = tmp_path / "one.ckpt"
    pl_trainer.save_checkpoint(ckpt)
    resumed, _ = run(3, ckpt)
    first_subset = next(i for i in recorder_of(first).indices if i)
    resumed_passes = [i for i in recorder_of(resumed).indices if i]
    assert len(resumed_passes) == 2 and all(indices == first_subset for indices in resumed_passes)


def test_limit_batches_with_a_user_loader_takes_its_first_batches(tmp_path):
    x, y = make_tensors(40)
    explicit = DataLoader(IndexData(x, y), batch_size=4)
    guard = EvalGuard({"seen": SeenIndices()}, dataloader=explicit, limit_batches=0.5, forward=index_forward)
    fit(tmp_path, guard, train_dataloaders=loader(IndexData(x, y)))
    assert [i for i in recorder_of(guard).indices if i] == [list(range(20))]


class Stream(IterableDataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.transform = None

    def __iter__(self) -> Any:
        for x, y in zip(self.x, self.y, strict=True):
            yield (x if self.transform is None else self.transform(x)), y


def test_iterable_training_set_fails_before_the_first_training_step(tmp_path):
    x, y = make_tensors(32)
    model = NoTraining("linear")
    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES)}, limit_batches=0.5)
    with pytest.raises(
        ValueError, match=r"IterableDataset.*dataloader=.*clean_train_dataloader\(\).*int `limit_batches"
    ):
        fit(tmp_path, guard, model, train_dataloaders=DataLoader(Stream(x, y), batch_size=8))


def test_iterable_training_set_with_an_int_limit_evaluates_that_many_batches(tmp_path):
    x, y = make_tensors(32)
    stream = Stream(x, y)
    stream.transform = Tag(100.0)
    guard = EvalGuard({"seen": Recorder()}, limit_batches=2, eval_transform=Tag(0.0), forward=inputs_forward)
    fit(tmp_path, guard, train_dataloaders=DataLoader(stream, batch_size=8))
    assert recorder_of(guard).seen == pytest.approx(x[:16, 0].tolist())


def test_a_training_loader_that_is_not_a_dataloader_fails_before_training(tmp_path):
    x, y = make_tensors(16)

    class Batches:
        def __iter__(self) -> Any:
            return iter([(x[:8], y[:8]), (x[8:], y[8:])])

        def __len__(self) -> int:
            return 2

    batches = Batches()
    model = NoTraining("linear")
    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES)})
    with pytest.raises(
        TypeError,
        match=r"the training loader to switch augmentation off, but it is a Batches, not a torch DataLoader. Pass `dataloader=`",
    ):
        fit(tmp_path, guard, model, train_dataloaders=batches)


def test_batch_size_argument_sets_the_clean_batch_size(tmp_path):
    x, y = make_tensors(40)
    sizes: list[int] = []

    def forward(module: pl.LightningModule, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        sizes.append(len(batch[0]))
        return module(batch[0]), batch[1]

    guard = EvalGuard(
        {"acc": MulticlassAccuracy(num_classes=NUM_CLASSES)}, batch_size=32, forward=forward, guards="off"
    )
    fit(tmp_path, guard, train_dataloaders=loader(TensorData(x, y), batch_size=4))
    assert sizes == [32, 32, 8]  # the fit-start check's first batch, then the pass


def test_default_forward_rejects_a_batch_it_cannot_split(tmp_path):
    x, y = make_tensors(16)

    class DictData(TensorData):
        def __getitem__(self, index: int) -> Any:
            return {"x": self.x[index], "y": self.y[index]}

    class DictModel(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return super().training_step((batch["x"], batch["y"]), batch_idx)

    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES)})
    with pytest.raises(TypeError, match=r"default forward expects .* got a dict. Pass `forward=`"):
        fit(tmp_path, guard, DictModel("linear"), train_dataloaders=loader(DictData(x, y)))


def test_a_forward_that_does_not_return_preds_and_target_is_rejected(tmp_path):
    x, y = make_tensors(16)
    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES)}, forward=lambda module, batch: batch[0])
    with pytest.raises(TypeError, match=r"`forward=` must return a \(preds, target\) pair.*got Tensor"):
        fit(tmp_path, guard, train_dataloaders=loader(TensorData(x, y)))


def test_an_empty_clean_loader_warns_once_and_logs_nothing(tmp_path):
    x, y = make_tensors(16)
    empty = DataLoader(TensorData(x[:0], y[:0]), batch_size=4)
    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES)}, dataloader=empty)
    with pytest.warns(UserWarning, match="found no batches") as record:
        pl_trainer = fit(tmp_path, guard, max_epochs=3, train_dataloaders=loader(TensorData(x, y)))
    assert sum("found no batches" in str(w.message) for w in record) == 1
    assert guard.history == []
    assert not any(key.startswith("evalguard/") for key in pl_trainer.callback_metrics)


def test_every_n_epochs_follows_check_val_every_n_epoch(tmp_path):
    x, y = make_tensors(16)
    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES)}, every_n_epochs=2)
    fit(tmp_path, guard, max_epochs=5, train_dataloaders=loader(TensorData(x, y)))
    assert [entry["epoch"] for entry in guard.history] == [1, 3]


def test_no_pass_during_validate_test_or_predict(tmp_path):
    x, y = make_tensors(16)

    class Everything(Classifier):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            pass

        def test_step(self, batch: Any, batch_idx: int) -> None:
            pass

        def predict_step(self, batch: Any, batch_idx: int) -> Any:
            return self(batch[0])

    forwards: list[bool] = []

    def forward(module: pl.LightningModule, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        forwards.append(True)
        return module(batch[0]), batch[1]

    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES)}, forward=forward, guards="off")
    pl_trainer = trainer(tmp_path, max_epochs=1, callbacks=[guard], num_sanity_val_steps=2)
    model = Everything("linear")
    data = loader(TensorData(x, y))
    pl_trainer.fit(model, data, val_dataloaders=loader(TensorData(x, y)))
    assert len(forwards) == 2  # the fit-start check and the pass, not the sanity check
    pl_trainer.validate(model, loader(TensorData(x, y)))
    pl_trainer.test(model, loader(TensorData(x, y)))
    pl_trainer.predict(model, loader(TensorData(x, y)))
    assert len(forwards) == 2 and len(guard.history) == 1


def test_dataset_augmentation_is_off_but_numpy_noise_dataset_is_measured_clean(tmp_path):
    x, y = make_tensors(48)
    model = Classifier("both")
    guard = EvalGuard(
        {"acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")}, eval_transform=nn.Identity()
    )
    fit(tmp_path, guard, model, max_epochs=2, train_dataloaders=loader(TensorData(x, y, NumpyNoise(2.0))))
    assert guard.history[-1]["clean"]["acc"] == pytest.approx(accuracy(model, x, y), abs=1e-6)


class CountsTransfers(pl.Callback):
    """Counts the calls of the strategy's batch_to_device (Lightning's hook dispatch) during EvalGuard's pass only."""

    def __init__(self) -> None:
        self.calls = 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # before EvalGuard's
        strategy = trainer.strategy
        original = type(strategy).batch_to_device

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(strategy, *args, **kwargs)

        strategy.batch_to_device = counted  # type: ignore[method-assign]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        del trainer.strategy.batch_to_device  # the class's method again


@pytest.mark.parametrize(("hooks", "expected"), [(False, 0), (True, 4)])
def test_without_user_batch_hooks_batches_take_the_direct_path(tmp_path, hooks, expected):
    x, y = make_tensors(20)
    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")}, guards="off", batch_size=5)

    class NoHooks(Classifier):
        on_after_batch_transfer = pl.LightningModule.on_after_batch_transfer  # Lightning's own, not overridden

    counter = CountsTransfers()
    model = HookedModule() if hooks else NoHooks("linear")
    trainer(tmp_path, max_epochs=1, callbacks=[counter, guard]).fit(model, loader(TensorData(x, y)))
    # no hook overridden: move_data_to_device directly; hooks overridden: Lightning's dispatch, every batch
    assert counter.calls == expected


def test_a_subset_sampler_restricts_the_clean_pass_to_its_indices(tmp_path):
    x, y = make_tensors(100)
    train_indices = list(range(0, 100, 3))  # 34 samples; the others are held out
    train = DataLoader(IndexData(x, y), batch_size=8, sampler=torch.utils.data.SubsetRandomSampler(train_indices))
    guard = EvalGuard({"seen": SeenIndices()}, forward=index_forward)
    fit(tmp_path, guard, train_dataloaders=train)
    assert [i for i in recorder_of(guard).indices if i] == [train_indices]

    subset_guard = EvalGuard({"seen": SeenIndices()}, forward=index_forward, limit_batches=0.5)
    fit(tmp_path, subset_guard, train_dataloaders=train)
    (seen,) = [i for i in recorder_of(subset_guard).indices if i]
    assert len(seen) == 17 and set(seen) <= set(train_indices)


def test_an_unknown_sampler_is_warned_about(tmp_path):
    x, y = make_tensors(24)

    class EveryOther(torch.utils.data.Sampler[int]):
        def __iter__(self) -> Any:
            return iter(range(0, 24, 2))

        def __len__(self) -> int:
            return 12

    train = DataLoader(TensorData(x, y), batch_size=6, sampler=EveryOther())
    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES)})
    with pytest.warns(
        UserWarning, match=r"sampler of the training loader is a EveryOther, which EvalGuard does not know"
    ):
        fit(tmp_path, guard, train_dataloaders=train)


def test_default_forward_names_forward_when_the_module_returns_a_dict(tmp_path):
    x, y = make_tensors(16)

    class DictOut(Classifier):
        def forward(self, x: torch.Tensor) -> Any:
            return {"logits": super().forward(x)}

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self(batch[0])["logits"], batch[1])

    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES)})
    with pytest.raises(TypeError, match=r"the module returned a dict, not a tensor. Pass `forward=`"):
        fit(tmp_path, guard, DictOut("linear"), train_dataloaders=loader(TensorData(x, y)))


def test_eval_transform_val_refuses_a_validation_set_sharing_the_training_dataset(tmp_path):
    x, y = make_tensors(40)
    full = TensorData(x, y, Tag(100.0))
    train, val = Subset(full, list(range(30))), Subset(full, list(range(30, 40)))

    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES)}, eval_transform="val")
    pl_trainer = trainer(tmp_path, max_epochs=1, callbacks=[guard], num_sanity_val_steps=1)
    with pytest.raises(ValueError, match=r"validation and training sets read the same TensorData object"):
        pl_trainer.fit(WithValidation("linear"), loader(train), loader(val, shuffle=False))


@pytest.mark.filterwarnings("ignore::lightning_evalguard.EvalGuardWarning")  # a shuffling clean loader: guards warn
def test_a_user_loader_generator_is_left_as_it_was(tmp_path):
    x, y = make_tensors(24)
    generator = torch.Generator().manual_seed(11)
    state = generator.get_state()
    clean = DataLoader(TensorData(x, y), batch_size=8, shuffle=True, generator=generator)
    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES)}, dataloader=clean, guards="warn")
    fit(tmp_path, guard, max_epochs=2, train_dataloaders=loader(TensorData(x, y)))
    assert len(guard.history) == 2
    assert torch.equal(generator.get_state(), state)


class WholeBatches(torch.utils.data.Dataset):
    """Each item is a whole batch of 8 samples: a loader with batch_size=None yields them as they are."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y) // 8

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[8 * index : 8 * index + 8], self.y[8 * index : 8 * index + 8]


def test_a_training_loader_without_automatic_batching_says_what_to_pass_before_training(tmp_path):
    x, y = make_tensors(32)
    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES)})
    with pytest.raises(ValueError, match=r"batch_size=None \(automatic batching off\).*`batch_size=`.*`dataloader=`"):
        fit(tmp_path, guard, NoTraining("linear"), train_dataloaders=DataLoader(WholeBatches(x, y), batch_size=None))


class OneSampleSteps(Classifier):
    """Trains on one sample per step (a training loader with batch_size=None over single samples)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return super().training_step((x.unsqueeze(0), y.unsqueeze(0)), batch_idx)


def test_single_samples_without_automatic_batching_are_batched_with_batch_size(tmp_path):
    x, y = make_tensors(30)
    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")}, batch_size=8)
    model = OneSampleSteps("linear")
    fit(tmp_path, guard, model, train_dataloaders=DataLoader(TensorData(x, y), batch_size=None))
    assert guard.history[-1]["clean"]["acc"] == pytest.approx(accuracy(model, x, y), abs=1e-6)


def test_a_per_sample_collate_fn_without_automatic_batching_is_refused_before_training(tmp_path):
    x, y = make_tensors(16)

    def per_sample(item: Any) -> Any:
        return item

    train = DataLoader(TensorData(x, y), batch_size=None, collate_fn=per_sample)
    guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")}, batch_size=8)
    with pytest.raises(ValueError, match=r"batch_size=None.*collate_fn \('per_sample'\).*one sample at a time"):
        fit(tmp_path, guard, NoTraining("linear"), train_dataloaders=train)
