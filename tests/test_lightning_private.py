"""Breaks loudly when a Lightning upgrade moves an internal EvalGuard relies on (every one is in lightning_evalguard/_lightning.py)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lightning_evalguard._lightning import logged_flags, on_before_batch_transfer

from helpers import Classifier, TensorData, loader, make_tensors, trainer


def test_lightning_module_still_has_the_private_before_batch_transfer_dispatch(tmp_path):
    class Hooked(Classifier):
        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            return ("module", batch)

    class HookedData(pl.LightningDataModule):
        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            return ("datamodule", batch)

    model = Hooked("linear")
    assert on_before_batch_transfer(model, 1) == ("module", 1)  # no trainer: the module's own hook
    x, y = make_tensors(8)
    datamodule = HookedData()
    datamodule.train_dataloader = lambda: loader(TensorData(x, y))  # type: ignore[method-assign]
    pl_trainer = trainer(tmp_path, max_epochs=1, limit_train_batches=0)
    model = Classifier("linear")
    pl_trainer.fit(model, datamodule=datamodule)
    assert on_before_batch_transfer(model, 2) == ("datamodule", 2)  # the trainer picks the datamodule's hook


def test_result_collection_still_exposes_how_each_key_was_logged(tmp_path):
    seen: dict[str, Any] = {}

    class Logs(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            self.log("step_only", loss, on_step=True, on_epoch=False)
            self.log("epoch_too", loss, on_step=True, on_epoch=True)
            return loss

    class Read(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            seen.update(logged_flags(trainer))

    x, y = make_tensors(16)
    trainer(tmp_path, max_epochs=1, callbacks=[Read()]).fit(Logs("linear"), loader(TensorData(x, y)))
    assert seen["step_only"].on_epoch is False and seen["step_only"].on_step is True
    assert seen["epoch_too"].on_epoch is True
    assert seen["train_acc"].on_epoch is True and seen["train_acc"].fx == "training_step"
    assert seen["epoch_too"].is_tensor is True  # a tensor: Lightning averages it over batches
    assert seen["train_acc"].is_tensor is False  # a torchmetrics Metric object: its own compute()


def test_distributed_sampler_wrapper_still_holds_the_users_sampler():
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    from lightning_evalguard._lightning import unwrap_distributed_sampler

    inner = torch.utils.data.SubsetRandomSampler([3, 1, 2])
    wrapper = DistributedSamplerWrapper(inner, num_replicas=2, rank=0, shuffle=False)
    assert unwrap_distributed_sampler(wrapper) is inner
    assert unwrap_distributed_sampler(inner) is inner


def test_trainer_still_keeps_its_inference_mode_argument_on_the_validate_loop(tmp_path):
    from lightning_evalguard._lightning import uses_inference_mode

    assert uses_inference_mode(trainer(tmp_path)) is True
    assert uses_inference_mode(trainer(tmp_path, inference_mode=False)) is False


def test_the_base_strategy_still_defines_batch_to_device_where_evalguard_looks(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    from lightning_evalguard._lightning import base_batch_to_device

    assert base_batch_to_device(trainer(tmp_path).strategy) is True
    assert base_batch_to_device(SingleDeviceStrategy(torch.device("cpu"))) is True
    assert base_batch_to_device(DDPStrategy()) is True

    class Moves(SingleDeviceStrategy):
        def batch_to_device(self, batch: Any, device: Any = None, dataloader_idx: int = 0) -> Any:
            return batch

    assert base_batch_to_device(Moves(torch.device("cpu"))) is False


def test_lightnings_unrepeated_samplers_are_still_named_so():
    from lightning.pytorch.overrides.distributed import (
        UnrepeatedDistributedSampler,
        UnrepeatedDistributedSamplerWrapper,
    )

    from lightning_evalguard._lightning import is_unrepeated_sampler

    data = list(range(5))
    assert is_unrepeated_sampler(UnrepeatedDistributedSampler(data, num_replicas=2, rank=0))
    wrapper = UnrepeatedDistributedSamplerWrapper(torch.utils.data.SequentialSampler(data), num_replicas=2, rank=0)
    assert is_unrepeated_sampler(wrapper)
    assert not is_unrepeated_sampler(torch.utils.data.DistributedSampler(data, num_replicas=2, rank=0))


def test_lightnings_default_hooks_still_live_in_its_own_modules():
    from lightning_evalguard._lightning import user_overrides

    class Hooked(Classifier):
        def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
            return batch

    for hook in ("on_before_batch_transfer", "transfer_batch_to_device"):
        assert user_overrides(pl.LightningModule(), hook) is False
        assert user_overrides(pl.LightningDataModule(), hook) is False
    assert user_overrides(pl.LightningDataModule(), "val_dataloader") is False
    assert user_overrides(Hooked("linear"), "transfer_batch_to_device") is True
    assert user_overrides(Classifier("linear"), "on_after_batch_transfer") is True


def test_the_fit_loop_still_keeps_the_validation_loaders_passed_to_fit(tmp_path):
    from lightning_evalguard._lightning import fit_validation_loaders

    seen: list[Any] = []

    class Read(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            seen.append((trainer.val_dataloaders, fit_validation_loaders(trainer)))

    x, y = make_tensors(16)
    val = loader(TensorData(x, y))
    pl_trainer = trainer(tmp_path, max_epochs=1, check_val_every_n_epoch=2, callbacks=[Read()])
    pl_trainer.fit(Classifier("linear"), loader(TensorData(x, y)), val)
    assert seen == [(None, val)]  # not loaded yet, but kept where EvalGuard looks
    pl_trainer = trainer(tmp_path, max_epochs=1, callbacks=[Read()])
    pl_trainer.fit(Classifier("linear"), loader(TensorData(x, y)))
    assert seen[-1] == (None, None)  # the module is the source: the caller asks its val_dataloader()
