"""EvalGuard: a clean pass over the training set at the end of training epochs, and its gap to the running metrics."""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

from lightning.pytorch import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from torchmetrics import Metric, MetricCollection
from typing_extensions import override

from lightning_evalguard import arguments
from lightning_evalguard.distributed import from_rank_zero
from lightning_evalguard.errors import EvalGuardError, EvalGuardWarning, add_note
from lightning_evalguard.forward import ForwardFn, default_forward
from lightning_evalguard.guards import GuardPolicy, snapshot, state_changes
from lightning_evalguard.isolation import isolated_rng
from lightning_evalguard.metrics import MetricInfo, collection_keys, join_key, metric_infos, micro_accuracy_names
from lightning_evalguard.passes import Measured, Passes, PassKind, check_decomposable, check_trackable
from lightning_evalguard.reference import References
from lightning_evalguard.results import (
    Decomposition,
    Subset,
    history_entry,
    result_groups,
    rowless_moments,
    standard_errors,
)
from lightning_evalguard.samples import SampleStats, SampleTracker, draw_data_map, summary_line
from lightning_evalguard.sampling import AutoSubset
from lightning_evalguard.sources import CleanData, SourceOptions
from lightning_evalguard.summary import (
    add_image,
    print_summary,
    summary_rows,
    summary_text,
    tensorboard_layout,
    write_metric_info,
    write_tensorboard_layout,
)

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["EvalGuard", "EvalGuardError", "EvalGuardWarning"]

# The standalone `pytorch_lightning` package: when the user has imported it, EvalGuard is a callback of both
# namespaces, so the same object works with `lightning.pytorch.Trainer` and `pytorch_lightning.Trainer` (their hooks
# are the same). It is never imported here: importing it re-routes Lightning's log messages to its own logger.
# `lightning_evalguard.pytorch_lightning.EvalGuard` works whatever the import order.
if TYPE_CHECKING or "pytorch_lightning" not in sys.modules:
    _StandaloneCallback = object
else:
    from pytorch_lightning import Callback as _StandaloneCallback


class EvalGuard(Callback, _StandaloneCallback):
    r"""Measure the training set cleanly at the end of training epochs and log the gap to the running metrics.

    After every ``every_n_epochs``-th training epoch, EvalGuard runs the model over the training data with every
    module in eval mode, under ``torch.inference_mode()``, with augmentation off, and measures it with clones of
    ``metrics``. It logs, through the LightningModule (so every attached logger and ``trainer.callback_metrics``
    receive them at the step of the epoch-level train metrics):

    - ``<prefix>/clean/<name>``: the metric over the training data, eval mode, augmentation off;
    - ``<prefix>/running/<name>``: the running train metric it is compared with;
    - ``<prefix>/gap/<name>``: clean - running;
    - ``<prefix>/generalization/<name>``: clean - validation, for epochs where validation ran;
    - ``<prefix>/effect/train_mode/<name>``, ``<prefix>/effect/augmentation/<name>``,
      ``<prefix>/effect/weight_drift/<name>``: with ``decompose=True``, the gap's three causes (they add up to it);
    - ``<prefix>/stderr/<name>``: on a random ``limit_batches`` subset of n of N samples, the clean value's standard
      error: sqrt(p (1 - p) / n * (N - n) / (N - 1)) for micro-averaged accuracies, s / sqrt(n) * sqrt((N - n) /
      (N - 1)) for ``MeanSquaredError`` and ``MeanAbsoluteError`` (s: the per-sample errors' standard deviation);
      with it ``<prefix>/clean_low/<name>`` and ``<prefix>/clean_high/<name>``, clean -/+ 2 standard errors;
    - ``<prefix>/samples/learned``, ``<prefix>/samples/forgotten``, ``<prefix>/samples/never_learned``: with
      ``track_samples=True``, the fraction of tracked samples predicted right in the pass, its forgetting events, and
      the fraction never predicted right so far;
    - ``<prefix>/time/pass_seconds``: how long EvalGuard's work at that epoch end took.

    With several training loaders, ``<name>`` is ``<loader name or index>/<name>``; a metric computing a vector
    logs element ``i`` as ``<name>/i``.

    The pass changes nothing in training: each submodule's ``training`` flag, every buffer, the global RNG states
    (torch, CUDA, numpy, Python), the trainer's stage and the dataset's transform are put back afterwards, also when
    the pass raises.

    Augmentation is switched off, in this order of precedence, by ``dataloader=``; a ``clean_train_dataloader()``
    method on the LightningDataModule or else on the LightningModule; or a loader EvalGuard rebuilds over the
    training dataset with ``eval_transform`` set on its ``transform_attr``. In every case ``trainer.training`` is
    False while batches pass through the batch-transfer hooks, so batch-level augmentation gated on it is skipped.

    Args:
        metrics: A torchmetrics ``Metric``, a ``MetricCollection``, or a mapping of names to ``Metric`` objects.
            They are cloned; the objects passed are never updated. Names are the mapping's keys, a single metric's
            class name, or a collection's base names; for a collection with a prefix or postfix (the one the module
            logs with ``self.log_dict``), the running key of each metric is the collection's own key.
        dataloader: An explicit clean loader, or a callable building one from the Trainer (called once per fit).
        eval_transform: A transform set on the training dataset's ``transform_attr`` during the pass (looked for
            through ``Subset`` and ``ConcatDataset``), or ``"val"`` to take the validation dataset's.
        transform_attr: The name of the dataset's transform attribute.
        running: Metric name -> key in ``trainer.callback_metrics`` of the running metric. Without it, the key of a
            collection with a prefix or postfix, else the first of ``train_<name>``, ``train/<name>``,
            ``train_<name>_epoch``, ``train/<name>_epoch`` is used.
        forward: ``(module, batch) -> (preds, target)``. The default takes ``(inputs, target, ...)`` batches and
            returns ``(module(inputs), target)``.
        every_n_epochs: Run the pass after epochs where ``(current_epoch + 1) % every_n_epochs == 0``.
        limit_batches: Evaluate a fixed random subset, drawn once from ``seed``: a float in (0, 1] is a fraction of
            the samples, an int a number of clean-pass batches. With ``dataloader=`` or the hook, the loader's
            first batches are taken instead. None evaluates everything. ``"auto"`` sizes the subset before every
            pass so that each micro-averaged accuracy's standard error is at most ``target_stderr`` (drawn without
            replacement: n = n0 / (1 + (n0 - 1) / N), n0 = p (1 - p) / target_stderr**2, p = 0.5 at the first pass,
            then the last pass's value); every subset is a prefix of one permutation drawn from ``seed``.
        batch_size: The clean-pass batch size of a rebuilt loader; default: the training loader's.
        prefix: The first part of every logged key.
        seed: Seeds the subset draw, the clean loader's own generator, and the RNG state every pass starts from
            (torch, numpy and Python ``random`` alike): an int in [0, 2**32 - 1], the range numpy accepts.
        val: Metric name -> key in ``trainer.callback_metrics`` of the validation metric. Without it, the first of
            ``val_<name>``, ``val/<name>`` is used.
        decompose: Also run pass B (the modules' own training flags, augmentation off) and pass C (training flags,
            augmentation on, ``trainer.training`` True) over the same batches, and log the effects
            ``train_mode`` = clean - B, ``augmentation`` = B - C, ``weight_drift`` = C - running.
        guards: ``"raise"``, ``"warn"`` or ``"off"``: what a guard finding does. Before the first training step
            nothing may draw random numbers while the first clean batch is picked, produced and brought to the model
            or in the eval-mode forward (the first that draws is named), and the batch and outputs must be the same
            under two seeds; during and after every pass, module flags, the trainer's stage and the RNG states must
            stay and come back. The set-up checks (the first batch through the forward and a clone of each metric)
            run whatever ``guards`` says.
        print_summary: Print ``summary`` (a rich table when rich is installed) on rank zero at the end of fit.
        cache: Keep the clean batches in memory after the first pass; later passes skip loading and transforms. On a
            CUDA device, without batch-transfer hooks, the batches stay on the device when they take at most half
            of its free memory; otherwise in host memory.
        cache_max_bytes: The most memory the cache may take; a cache estimated above it is refused at fit start.
        track_samples: Keep per-sample statistics of the clean passes in ``samples`` (margin of the given label,
            confidence, variability, forgetting, ... by dataset index), written to ``samples.csv`` (and with
            matplotlib ``data_map.png``) in the first logger's directory at the end of fit.
        sample_score: ``(preds, target) -> Tensor[B]`` (higher = fits better) replacing the classification margin.
        sample_ids: ``(batch) -> LongTensor[B]``: the dataset indices of a batch, needed to track the samples of a
            clean loader EvalGuard did not rebuild.
        target_stderr: With ``limit_batches="auto"``, the standard error of each micro-averaged accuracy to reach:
            a float in (0, 0.5); 0.005 is half a point.

    Raises:
        TypeError: If an argument has the wrong type (the message names it, what was expected and what was given).
        ValueError: If an argument has a wrong value, e.g. ``every_n_epochs=0`` or ``limit_batches=1.5``.
        EvalGuardError: From ``guards="raise"``, when a guard finds the pass would not be clean.

    At fit start (before the first training step) a ``TypeError``/``ValueError`` says what to pass when the clean
    data cannot be built: an ``IterableDataset`` without ``dataloader=``, the hook or an int ``limit_batches``; an
    ``eval_transform`` with no ``transform_attr`` to set; a training loader without a readable batch size. An
    exception inside the pass propagates unchanged, with a note naming EvalGuard and the epoch.

    Attributes:
        history: One dict per evaluated epoch: ``{"epoch", "step", "clean": {name: float}, "running": {...},
            "gap": {...}, "validation": {...}, "generalization": {...}, "time": {"pass_seconds": float}}``, plus
            ``"effect/train_mode"``, ``"effect/augmentation"``, ``"effect/weight_drift"`` when decomposing and
            ``"stderr"``, ``"clean_low"``, ``"clean_high"`` on a random subset, and with ``limit_batches`` over a
            rebuilt loader ``"n"``: the samples evaluated (a dict by loader name with several loaders).
        metric_names: The metric names.
        samples_path: The ``samples.csv`` written at the end of fit (``track_samples=True``, rank zero), else None.
        data_map_path: The ``data_map.png`` written beside it (with matplotlib), else None.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from torchmetrics.classification import MulticlassAccuracy
        >>> from lightning_evalguard import EvalGuard
        >>> guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=10, average="micro")}, eval_transform="val")
        >>> trainer = Trainer(callbacks=[guard], logger=False)  # logs evalguard/clean/acc, .../running/acc, .../gap/acc
        >>> guard.metric_names
        ['acc']
        >>> guard in trainer.callbacks
        True
    """

    def __init__(
        self,
        metrics: Union[Metric, MetricCollection, Mapping[str, Metric]],
        *,
        dataloader: Union[DataLoader[Any], Callable[[pl.Trainer], DataLoader[Any]], None] = None,
        eval_transform: Union[str, Callable[..., Any], None] = None,
        transform_attr: str = "transform",
        running: Union[Mapping[str, str], None] = None,
        forward: Union[ForwardFn, None] = None,
        every_n_epochs: int = 1,
        limit_batches: Union[int, float, Literal["auto"], None] = None,
        batch_size: Union[int, None] = None,
        prefix: str = "evalguard",
        seed: int = 0,
        val: Union[Mapping[str, str], None] = None,
        decompose: bool = False,
        guards: Literal["raise", "warn", "off"] = "raise",
        print_summary: bool = True,
        cache: bool = False,
        cache_max_bytes: int = 1 << 30,
        track_samples: bool = False,
        sample_score: Union[Callable[[Any, Any], Any], None] = None,
        sample_ids: Union[Callable[[Any], Any], None] = None,
        target_stderr: float = 0.005,
    ) -> None:
        super().__init__()
        template = arguments.check_metrics(metrics)
        self.metric_names: list[str] = [str(name) for name in template.keys()]
        self.dataloader = arguments.check_dataloader(dataloader)
        self.eval_transform = arguments.check_eval_transform(eval_transform)
        self.transform_attr = arguments.check_str("transform_attr", transform_attr, allow_empty=False)
        self.running = arguments.check_running(running, self.metric_names)
        self.forward: ForwardFn = arguments.check_forward(forward) or default_forward
        self.every_n_epochs = arguments.check_every_n_epochs(every_n_epochs)
        self.limit_batches = arguments.check_limit_batches(limit_batches)
        self.batch_size = arguments.check_batch_size(batch_size)
        self.prefix = arguments.check_str("prefix", prefix, allow_empty=True)
        self.seed = arguments.check_seed(seed)
        self.val = arguments.check_running(val, self.metric_names, name="val")
        self.decompose = arguments.check_bool("decompose", decompose)
        self.guards = arguments.check_guards(guards)
        self.print_summary = arguments.check_bool("print_summary", print_summary)
        self.cache = arguments.check_bool("cache", cache)
        self.cache_max_bytes = arguments.check_positive_int("cache_max_bytes", cache_max_bytes)
        self.track_samples = arguments.check_bool("track_samples", track_samples)
        self.sample_score = arguments.check_callable("sample_score", sample_score, "(preds, target) -> Tensor[B]")
        self.sample_ids = arguments.check_callable("sample_ids", sample_ids, "(batch) -> LongTensor[B]")
        self.target_stderr = arguments.check_target_stderr(
            target_stderr, self.limit_batches, micro_accuracy_names(template), self.cache
        )
        self.samples_path: Path | None = None
        self.data_map_path: Path | None = None

        self.history: list[dict[str, Any]] = []
        self._warned: set[str] = set()
        self._accuracies = micro_accuracy_names(template)
        self._infos: dict[str, MetricInfo] = metric_infos(template)  # by logged name once the sources are known
        self._policy = GuardPolicy(self.guards, self._warn_once)
        self._tracker = SampleTracker(self.sample_score, self.sample_ids) if self.track_samples else None
        self._passes = Passes(template, self.forward, self.seed, self._policy, self._warn_once, self._tracker)
        options = SourceOptions(
            dataloader=self.dataloader,
            eval_transform=self.eval_transform,
            transform_attr=self.transform_attr,
            limit_batches=self.limit_batches,
            batch_size=self.batch_size,
            seed=self.seed,
            decompose=self.decompose,
            cache_max_bytes=self.cache_max_bytes if self.cache else None,
            target_stderr=self.target_stderr,
        )
        self._data = CleanData(options, self._warn_once)
        self._references = References({**collection_keys(metrics), **(self.running or {})}, self.val)
        self._validated_epoch: int | None = None
        self._trained_batches = 0  # training batches this process ran in the current epoch

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING:
            self._data.forget()
            self._references.forget()
            self._validated_epoch = None
            self._trained_batches = 0

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        max_epochs = trainer.max_epochs
        if isinstance(max_epochs, int) and 0 <= max_epochs < self.every_n_epochs:
            self._warn_once(
                "never",
                f"EvalGuard(every_n_epochs={self.every_n_epochs}) evaluates after the epochs where (epoch + 1) is a"
                f" multiple of {self.every_n_epochs}, but Trainer(max_epochs={max_epochs}) stops before the first:"
                f" no clean pass will run. Pass every_n_epochs <= {max_epochs}.",
            )
        if self.decompose:
            check_decomposable(trainer, pl_module, None)
        # Build (and so check) the clean data before the first training step, isolated from the training RNG.
        with isolated_rng():
            sources = self._data.get(trainer, pl_module)
            if self.decompose:
                check_decomposable(trainer, pl_module, sources)
            if self.track_samples:
                check_trackable(sources, self.sample_ids)
            if self.eval_transform == "val":
                self._data.eval_transform(trainer, pl_module)  # fails now rather than after an epoch
            self._passes.check_at_fit_start(trainer, pl_module, self._data)  # set-up checks; guards unless off
            if self.cache:
                self._passes.size_caches(trainer, pl_module, self._data)
        names = [join_key(source.name, name) for source in sources for name in self.metric_names]
        infos = metric_infos(self._passes.template)
        self._infos = {join_key(source.name, name): infos[name] for source in sources for name in infos}
        validation_keys = {name: self._references.validation_candidates(name) for name in names}
        bands = [
            join_key(source.name, name)
            for source in sources
            if source.sampled or self.limit_batches == "auto"  # an "auto" subset may cover all at first, not later
            for name, info in infos.items()
            if info.stderr is not None
        ]
        layout = tensorboard_layout(self.prefix, names, validation_keys, self.decompose, bands)
        write_tensorboard_layout(trainer, layout)
        write_metric_info(trainer, self.prefix, self._infos)  # evalguard report words the gaps with it

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._references.check_after_epoch(trainer, self._warn_once)
        self._trained_batches = 0

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._trained_batches += 1

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._references.check_after_epoch(trainer, self._warn_once)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            if self._due(trainer):
                self._evaluate(trainer, pl_module)
        finally:
            self._trained_batches = 0

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING:
            self._data.release_caches()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._data.release_caches()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.samples is not None:
            self._write_samples(trainer)
        if self.print_summary and self.history and trainer.is_global_zero:
            print_summary(self._summary_rows(), self._samples_line())

    def _write_samples(self, trainer: pl.Trainer) -> None:
        """At the end of fit: samples.csv, and with matplotlib data_map.png (also to every TensorBoardLogger)."""
        assert self.samples is not None
        log_dir = next((logger.log_dir for logger in trainer.loggers if getattr(logger, "log_dir", None)), None)
        directory = Path(log_dir or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.samples_path = self.samples.to_csv(directory / "samples.csv")
        image = draw_data_map(self.samples, directory / "data_map.png")
        if image is None:
            return
        self.data_map_path = directory / "data_map.png"
        add_image(trainer, join_key(self.prefix, "data_map"), image, trainer.global_step)

    def _samples_line(self) -> str | None:
        return None if self.samples is None or not len(self.samples) else summary_line(self.samples)

    def summary(self) -> str:
        """The end-of-fit summary as plain text: the last values per metric, and a one-sentence reading of each.

        Returns:
            A table of running, clean, gap, validation and generalization values (and the effects when decomposing)
                from the last evaluated epoch, followed by one reading per metric.
        """
        text = summary_text(self._summary_rows())
        line = self._samples_line()
        return text if line is None else f"{text}\n{line}"

    @property
    def samples(self) -> SampleStats | None:
        """The per-sample statistics of the clean passes (``track_samples=True``); None before the first pass."""
        return None if self._tracker is None else self._tracker.stats

    @override
    def state_dict(self) -> dict[str, Any]:
        subsets = {key: list(indices) for key, indices in self._data.subsets.items()}
        state: dict[str, Any] = {"history": copy.deepcopy(self.history), "subsets": subsets}
        if self._data.autos:
            state["auto_subsets"] = {key: auto.state_dict() for key, auto in self._data.autos.items()}
        if self.samples is not None:
            state["samples"] = self.samples.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = copy.deepcopy(list(state_dict.get("history", [])))
        subsets = dict(state_dict.get("subsets", {}))
        self._data.subsets = {str(key): [int(index) for index in indices] for key, indices in subsets.items()}
        autos = dict(state_dict.get("auto_subsets", {})) if self.limit_batches == "auto" else {}  # else: not ours
        self._data.autos = {str(key): AutoSubset.from_state_dict(auto) for key, auto in autos.items()}
        if self._tracker is not None and "samples" in state_dict:
            self._tracker.stats = SampleStats.from_state_dict(state_dict["samples"])

    # ------------------------------------------------------------------ the epoch end

    def _due(self, trainer: pl.Trainer) -> bool:
        return (
            trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        )

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure, check that the run was left as it was found, and log."""
        before = snapshot(trainer, pl_module) if self._policy.enabled else None
        started = time.perf_counter()
        try:
            with isolated_rng():
                measured = self._passes.measure(trainer, pl_module, self._data, self.decompose)
        except Exception as exc:
            add_note(
                exc,
                f"Raised inside EvalGuard's clean pass after training epoch {trainer.current_epoch}. Module modes,"
                " buffers, RNG states, the trainer's stage and the dataset's transform were restored.",
            )
            raise
        if before is not None:
            self._policy.after_pass(trainer, state_changes(before, snapshot(trainer, pl_module)))
        if measured[PassKind.CLEAN]:
            self._log(trainer, pl_module, measured, pass_seconds=time.perf_counter() - started)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, measured: Measured, pass_seconds: float) -> None:
        clean = measured[PassKind.CLEAN]
        non_decomposable = {name for name, info in self._infos.items() if info.decomposable is False}
        running = self._references.running_values(
            trainer, clean, self._warn_once, trained=self._trained_batches > 0, non_decomposable=non_decomposable
        )
        validated = self._validated_epoch == trainer.current_epoch  # validation values only when it ran this epoch
        validation = self._references.validation_values(trainer, clean) if validated else {}
        decomposition = None
        if self.decompose:
            decomposition = Decomposition(measured[PassKind.TRAIN_MODE], measured[PassKind.AUGMENTED])
        stderr = {}
        if self.limit_batches is not None:
            subsets = [
                Subset(source.name, source.total_samples, source.sampled, source.population)
                for source in self._data.sources or []
            ]
            stderr = standard_errors(clean, self._accuracies, subsets, self._passes.moments)
            for name in rowless_moments(self._passes.moments, subsets):
                self._warn_once(
                    f"rows:{name}",
                    f"EvalGuard logs no standard error for {name!r}: its preds did not have one row per sample of the"
                    " subset (flattened or reshaped by `forward`?), so the spread of its per-sample errors is unknown."
                    " Return preds of shape (B, ...) with B the batch's number of samples.",
                )
            self._data.record_pass(clean, self._accuracies)  # sizes the next "auto" subset
        groups = result_groups(clean, running, validation, decomposition, stderr)
        if self._tracker is not None and self._passes.samples_logged:
            groups["samples"] = dict(self._passes.samples_logged)
        groups["time"] = {"pass_seconds": from_rank_zero(trainer, pass_seconds)}  # the same value on every rank
        # The values are already the same on every rank; under DDP sync_dist keeps them so (a mean of equal values)
        # and spares the user Lightning's advice to use it.
        sync = trainer.world_size > 1
        for group, values in groups.items():
            for name, value in values.items():
                pl_module.log(join_key(self.prefix, group, name), value, on_step=False, on_epoch=True, sync_dist=sync)
        entry = history_entry(trainer.current_epoch, trainer.global_step, groups, validation)
        if self.limit_batches is not None:  # how many samples the clean values were measured on
            sizes = {source.name: source.total_samples for source in self._data.sources or []}
            if sizes and all(size is not None for size in sizes.values()):
                entry["n"] = sizes[None] if list(sizes) == [None] else {str(name): n for name, n in sizes.items()}
        self.history.append(entry)

    def _summary_rows(self) -> list[dict[str, str]]:
        if not self.history:
            return []
        last = self.history[-1]
        return summary_rows(list(last["clean"]), last, self._infos)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=EvalGuardWarning)
