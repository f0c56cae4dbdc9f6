"""Per-sample training dynamics from the clean passes (``track_samples=True``): exact, keyed by dataset index."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_evalguard import EvalGuard
from lightning_evalguard.samples import PassOutputs, SampleStats, SampleTracker, classification_outputs

from helpers import (
    Classifier,
    NoTraining,
    NumpyNoise,
    TensorData,
    assert_training_unchanged_by,
    loader,
    make_tensors,
    micro_accuracy,
    reference_sample_stats,
    trainer,
)


class Outputs(pl.Callback):
    """After EvalGuard at each epoch end: the eval-mode logits of every sample, from a copy of the model."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.logits: list[torch.Tensor] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = copy.deepcopy(pl_module).eval()
        with torch.no_grad():
            self.logits.append(model(self.x).double())


def test_the_statistics_equal_a_float64_loop_over_each_epochs_eval_outputs(tmp_path):
    x, y = make_tensors(40)
    guard = EvalGuard({"acc": micro_accuracy()}, eval_transform=nn.Identity(), track_samples=True, batch_size=7)
    outputs = Outputs(x)
    model = Classifier("both", batch_noise=0.3)
    trainer(tmp_path, max_epochs=4, callbacks=[guard, outputs]).fit(model, loader(TensorData(x, y, NumpyNoise())))
    stats = guard.samples
    assert stats is not None and stats.passes == 4 and len(stats) == 40
    assert stats.indices.tolist() == list(range(40)) and stats.targets.tolist() == y.tolist()
    expected = reference_sample_stats(outputs.logits, y)
    for name in ("mean_margin", "last_margin", "confidence", "variability"):
        assert getattr(stats, name).double().tolist() == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
    for name in ("correct", "forgetting", "first_learned", "last_prediction"):
        assert getattr(stats, name).tolist() == expected[name], name


def test_a_subset_tracks_its_samples_and_the_pass_values_are_logged(tmp_path):
    x, y = make_tensors(40)
    guard = EvalGuard(
        {"acc": micro_accuracy()}, eval_transform=nn.Identity(), track_samples=True, limit_batches=0.5, batch_size=8
    )
    pl_trainer = trainer(tmp_path, max_epochs=2, callbacks=[guard])
    pl_trainer.fit(Classifier("linear"), loader(TensorData(x, y)))
    stats = guard.samples
    assert stats is not None and len(stats) == 20 and stats.indices.tolist() == sorted(stats.indices.tolist())
    learned = float(pl_trainer.callback_metrics["evalguard/samples/learned"])
    assert learned == pytest.approx(guard.history[-1]["clean"]["acc"], abs=1e-6)  # accuracy over the same samples
    never = float(pl_trainer.callback_metrics["evalguard/samples/never_learned"])
    assert never == pytest.approx(float((stats.first_learned < 0).double().mean()))
    assert "evalguard/samples/forgotten" in pl_trainer.callback_metrics


def test_tracking_leaves_training_bit_identical(tmp_path):
    guard = assert_training_unchanged_by(
        tmp_path, lambda: EvalGuard({"acc": micro_accuracy()}, eval_transform=nn.Identity(), track_samples=True)
    )
    assert guard.samples is not None and guard.samples.passes == 3  # type: ignore[attr-defined]


def test_suspects_csv_dict_and_checkpoint_round_trip(tmp_path):
    x, y = make_tensors(24)
    guard = EvalGuard({"acc": micro_accuracy()}, eval_transform=nn.Identity(), track_samples=True)
    trainer(tmp_path, max_epochs=2, callbacks=[guard]).fit(Classifier("linear"), loader(TensorData(x, y)))
    stats = guard.samples
    assert stats is not None
    suspects = stats.suspects(5)
    margins = [row["mean_margin"] for row in suspects]
    assert margins == sorted(margins) and len(suspects) == 5
    assert margins[0] == pytest.approx(float(stats.mean_margin.min()))
    path = stats.to_csv(tmp_path / "samples.csv")
    lines = path.read_text().splitlines()
    assert lines[0].split(",")[:3] == ["indices", "targets", "mean_margin"] and len(lines) == 25
    assert set(stats.to_dict()) >= {"passes", "indices", "confidence", "forgetting"}
    torch.save(guard.state_dict(), tmp_path / "state.pt")
    restored = EvalGuard({"acc": micro_accuracy()}, eval_transform=nn.Identity(), track_samples=True)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert restored.samples is not None and restored.samples.passes == 2
    for name in ("indices", "mean_margin", "confidence", "variability", "correct", "first_learned"):
        assert torch.equal(getattr(restored.samples, name), getattr(stats, name)), name


def test_sample_score_replaces_the_margin_and_leaves_the_classification_fields_unset(tmp_path):
    x, y = make_tensors(24)
    guard = EvalGuard(
        {"acc": micro_accuracy()},
        eval_transform=nn.Identity(),
        track_samples=True,
        sample_score=lambda preds, target: -nn.functional.cross_entropy(preds, target, reduction="none"),
    )
    trainer(tmp_path, max_epochs=2, callbacks=[guard]).fit(Classifier("linear"), loader(TensorData(x, y)))
    stats = guard.samples
    assert stats is not None and stats.scored
    assert torch.isnan(stats.confidence).all() and (stats.correct == -1).all() and (stats.forgetting == -1).all()
    assert (stats.mean_margin <= 0).all()  # minus a loss


def test_a_clean_loader_of_your_own_needs_sample_ids(tmp_path):
    x, y = make_tensors(24)
    clean = DataLoader(TensorData(x, y), batch_size=8)
    guard = EvalGuard({"acc": micro_accuracy()}, dataloader=clean, track_samples=True)
    with pytest.raises(ValueError, match=r"track_samples=True\) keys its statistics by dataset index.*`sample_ids=`"):
        trainer(tmp_path, callbacks=[guard]).fit(NoTraining("linear"), loader(TensorData(x, y)))


class Indexed(TensorData):
    def __getitem__(self, index: int) -> Any:
        x, y = super().__getitem__(index)
        return x, y, torch.tensor(index)


def test_sample_ids_key_a_user_loader_by_the_ids_it_gives(tmp_path):
    x, y = make_tensors(24)
    clean = DataLoader(Indexed(x, y), batch_size=8)
    guard = EvalGuard(
        {"acc": micro_accuracy()}, dataloader=clean, track_samples=True, sample_ids=lambda batch: batch[2] + 100
    )
    trainer(tmp_path, max_epochs=1, callbacks=[guard]).fit(Classifier("linear"), loader(TensorData(x, y)))
    assert guard.samples is not None and guard.samples.indices.tolist() == list(range(100, 124))


def test_outputs_it_cannot_score_fail_before_training(tmp_path):
    x, y = make_tensors(24)
    guard = EvalGuard(
        {"acc": micro_accuracy()},
        eval_transform=nn.Identity(),
        track_samples=True,
        forward=lambda module, batch: (module(batch[0]), batch[1].float()),
    )
    with pytest.raises((ValueError, RuntimeError)):
        trainer(tmp_path, callbacks=[guard]).fit(NoTraining("linear"), loader(TensorData(x, y)))


def test_binary_and_probability_outputs_are_read_as_two_classes():
    logits = torch.tensor([2.0, -1.0, 0.5])
    margin, probability, prediction = classification_outputs(logits, torch.tensor([1, 1, 0]))
    assert margin.tolist() == pytest.approx([2.0, -1.0, -0.5])  # z when the label is 1, -z when 0
    assert probability.tolist() == pytest.approx(
        [1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0)), 1 / (1 + math.exp(0.5))]
    )
    assert prediction.tolist() == [1, 0, 1]
    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    margin, probability, _ = classification_outputs(probabilities, torch.tensor([0, 0]))
    assert margin.tolist() == pytest.approx([0.5, -0.7]) and probability.tolist() == pytest.approx([0.7, 0.1])


def test_outputs_kept_in_chunks_equal_those_computed_batch_by_batch():
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(count, 5, generator=generator) for count in (3, 4, 0, 2, 5)]
    batches[3] = batches[3].double()  # a dtype change starts a new chunk
    labels = [torch.randint(0, 5, (len(batch),), generator=generator) for batch in batches]
    outputs = PassOutputs(SampleTracker(None, None), order=list(range(100, 114)), chunk_bytes=8 * 5 * 4)  # 8 rows
    for preds, target in zip(batches, labels, strict=True):
        outputs.observe(None, preds, target)
    ids, targets, scores, probabilities, predictions = outputs.to_host()
    expected = [classification_outputs(preds, target) for preds, target in zip(batches, labels, strict=True)]
    assert ids.tolist() == list(range(100, 114)) and targets.tolist() == torch.cat(labels).tolist()
    assert scores.tolist() == pytest.approx(torch.cat([e[0].double() for e in expected]).tolist(), rel=1e-6)
    assert probabilities.tolist() == pytest.approx(torch.cat([e[1].double() for e in expected]).tolist(), rel=1e-6)
    assert predictions.tolist() == torch.cat([e[2] for e in expected]).tolist()


def test_the_pass_first_batch_decides_probabilities_or_logits():
    outputs = PassOutputs(SampleTracker(None, None), order=list(range(4)))
    outputs.observe(None, torch.tensor([2.0, -1.0]), torch.tensor([1, 0]))  # binary logits
    outputs.observe(None, torch.tensor([0.5, 0.25]), torch.tensor([1, 0]))  # in [0, 1], but logits like the first
    _, _, margins, probabilities, _ = outputs.to_host()
    sigmoid = [1 / (1 + math.exp(-z)) for z in (2.0, 1.0, 0.5, -0.25)]  # of the given label's logit
    assert probabilities.tolist() == pytest.approx(sigmoid)
    assert margins.tolist() == pytest.approx([2.0, 1.0, 0.5, -0.25])


def test_a_forward_that_reuses_its_output_buffer_is_measured_batch_by_batch(tmp_path):
    x, y = make_tensors(40)
    buffers: dict[int, torch.Tensor] = {}

    def reusing(module: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        logits = module(batch[0])  # like a CUDA graph: every batch's output is written into the same tensor
        buffer = buffers.setdefault(logits.shape[0], torch.empty_like(logits))
        return buffer.copy_(logits), batch[1]

    stats = []
    for forward in (None, reusing):
        guard = EvalGuard(
            {"acc": micro_accuracy()}, eval_transform=nn.Identity(), track_samples=True, batch_size=8, forward=forward
        )
        pl.seed_everything(3)
        trainer(tmp_path, max_epochs=2, callbacks=[guard]).fit(Classifier("linear"), loader(TensorData(x, y)))
        assert guard.samples is not None
        stats.append(guard.samples.to_dict())
    for name, value in stats[0].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(stats[1][name])), name


def test_statistics_memory_stays_under_64_bytes_per_sample():
    stats = SampleStats()
    ids = torch.arange(1000)
    for epoch in range(3):
        stats.update(epoch, ids, ids % 3, torch.randn(1000).double(), torch.rand(1000).double(), ids % 3)
    size = sum(
        tensor.element_size() * tensor.numel()
        for tensor in stats.state_dict().values()
        if isinstance(tensor, torch.Tensor)
    )
    assert size <= 64 * 1000


def test_the_end_of_fit_writes_the_csv_and_the_data_map_and_the_summary_names_the_suspects(tmp_path, capsys):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = make_tensors(30)
    guard = EvalGuard({"acc": micro_accuracy()}, eval_transform=nn.Identity(), track_samples=True)
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer(tmp_path, max_epochs=2, callbacks=[guard], logger=logger).fit(
        Classifier("linear"), loader(TensorData(x, y))
    )
    assert guard.samples_path == __import__("pathlib").Path(logger.log_dir) / "samples.csv"
    assert guard.samples_path.read_text().count("\n") == 31
    assert guard.data_map_path is not None and guard.data_map_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert "evalguard/data_map" in events.Tags()["images"]
    out = capsys.readouterr().out
    assert "never predicted right; strongest suspects (index, given, predicted):" in out
    assert guard.summary().splitlines()[-1].startswith("Samples: ")


def test_a_resumed_run_ends_with_the_statistics_of_an_uninterrupted_one(tmp_path):
    # a deterministic fit (no shuffling, no random layer, no augmentation), so both runs train the same weights
    x, y = make_tensors(30)

    def run(epochs: int, ckpt_path: Any = None, save: Any = None) -> EvalGuard:
        pl.seed_everything(0, verbose=False)
        guard = EvalGuard({"acc": micro_accuracy()}, track_samples=True, print_summary=False)
        pl_trainer = trainer(tmp_path, max_epochs=epochs, callbacks=[guard], enable_checkpointing=True)
        pl_trainer.fit(Classifier("linear"), loader(TensorData(x, y), shuffle=False), ckpt_path=ckpt_path)
        if save is not None:
            pl_trainer.save_checkpoint(save)
        return guard

    uninterrupted = run(4)
    run(2, save=tmp_path / "two.ckpt")
    resumed = run(4, ckpt_path=tmp_path / "two.ckpt")
    assert uninterrupted.samples is not None and resumed.samples is not None and resumed.samples.passes == 4
    for name, value in uninterrupted.samples.to_dict().items():
        other = resumed.samples.to_dict()[name]
        assert value == other if isinstance(value, int) else torch.equal(value, other), name
