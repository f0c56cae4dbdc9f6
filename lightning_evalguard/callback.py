"""EvalGuard: a clean pass over the training set at the end of training epochs, and its gap to the running metrics."""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, Union

import torch
from lightning.pytorch import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader
from torchmetrics import Metric, MetricCollection
from typing_extensions import override

from lightning_evalguard import arguments
from lightning_evalguard import guards as guard_checks
from lightning_evalguard._lightning import uses_inference_mode
from lightning_evalguard.clean_pass import (
    ForwardFn,
    checked_forward,
    default_batch_path,
    default_forward,
    device_cache_placement,
    prepare_batch,
    run_pass,
)
from lightning_evalguard.data import (
    CleanSource,
    SourceOptions,
    batch_nbytes,
    build_sources,
    uncopyable,
    validation_transform,
)
from lightning_evalguard.errors import EvalGuardError, EvalGuardWarning
from lightning_evalguard.isolation import (
    broadcast_buffers,
    eval_mode,
    isolated_rng,
    preserved_buffers,
    preserved_generator,
    swapped_attribute,
    trainer_not_training,
)
from lightning_evalguard.metrics import (
    clean_collection,
    flatten_scalars,
    is_micro_accuracy,
    join_key,
)
from lightning_evalguard.progress import pass_progress
from lightning_evalguard.reference import References
from lightning_evalguard.summary import render_summary, summary_rows, summary_text, tensorboard_layout

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["EvalGuard", "EvalGuardError", "EvalGuardWarning"]

#: The passes a measurement may run: the clean one, and for ``decompose=True`` pass B and pass C.
_CLEAN, _TRAIN_MODE, _AUGMENTED = "clean", "train_mode_pass", "augmented_pass"

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
    - ``<prefix>/stderr/<name>``: for micro-averaged accuracies on a ``limit_batches`` subset of n samples,
      sqrt(p (1 - p) / n);
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
            They are cloned; the objects passed are never updated. Names are the mapping's keys, or the names
            ``MetricCollection`` gives (the class name, with the collection's prefix and postfix).
        dataloader: An explicit clean loader, or a callable building one from the Trainer (called once per fit).
        eval_transform: A transform set on the training dataset's ``transform_attr`` during the pass (looked for
            through ``Subset`` and ``ConcatDataset``), or ``"val"`` to take the validation dataset's.
        transform_attr: The name of the dataset's transform attribute.
        running: Metric name -> key in ``trainer.callback_metrics`` of the running metric. Without it, the first of
            ``train_<name>``, ``train/<name>``, ``train_<name>_epoch``, ``train/<name>_epoch`` is used.
        forward: ``(module, batch) -> (preds, target)``. The default takes ``(inputs, target, ...)`` batches and
            returns ``(module(inputs), target)``.
        every_n_epochs: Run the pass after epochs where ``(current_epoch + 1) % every_n_epochs == 0``.
        limit_batches: Evaluate a fixed random subset, drawn once from ``seed``: a float in (0, 1] is a fraction of
            the samples, an int a number of clean-pass batches. With ``dataloader=`` or the hook, the loader's
            first batches are taken instead. None evaluates everything.
        batch_size: The clean-pass batch size of a rebuilt loader; default: the training loader's.
        prefix: The first part of every logged key.
        seed: Seeds the subset draw, the clean loader's own generator, and the RNG state every pass starts from.
        val: Metric name -> key in ``trainer.callback_metrics`` of the validation metric. Without it, the first of
            ``val_<name>``, ``val/<name>`` is used.
        decompose: Also run pass B (the modules' own training flags, augmentation off) and pass C (training flags,
            augmentation on, ``trainer.training`` True) over the same batches, and log the effects
            ``train_mode`` = clean - B, ``augmentation`` = B - C, ``weight_drift`` = C - running.
        guards: ``"raise"``, ``"warn"`` or ``"off"``. Before the first training step, the first clean batch is drawn
            under two seeds (if they differ, augmentation is still on) and the eval-mode model is run twice on it
            (if the outputs differ, the first module responsible is named); after every pass, module flags, the
            trainer's stage and the RNG states must be back.
        print_summary: Print ``summary`` (a rich table when rich is installed) on rank zero at the end of fit.
        cache: Keep the clean batches in memory after the first pass; later passes skip loading and transforms. On a
            CUDA device, without batch-transfer hooks, the batches stay on the device when they take at most half
            of its free memory; otherwise in host memory.
        cache_max_bytes: The most memory the cache may take; a cache estimated above it is refused at fit start.

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
            ``"stderr"`` on a subset.
        metric_names: The metric names.

    Example:
        ```python
        from lightning.pytorch import Trainer
        from torchmetrics.classification import MulticlassAccuracy
        from lightning_evalguard import EvalGuard

        guard = EvalGuard({"acc": MulticlassAccuracy(num_classes=10, average="micro")}, eval_transform="val")
        trainer = Trainer(callbacks=[guard])  # logs evalguard/clean/acc, evalguard/running/acc, evalguard/gap/acc
        ```
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
        limit_batches: Union[int, float, None] = None,
        batch_size: Union[int, None] = None,
        prefix: str = "evalguard",
        seed: int = 0,
        val: Union[Mapping[str, str], None] = None,
        decompose: bool = False,
        guards: Literal["raise", "warn", "off"] = "raise",
        print_summary: bool = True,
        cache: bool = False,
        cache_max_bytes: int = 1 << 30,
    ) -> None:
        super().__init__()
        self._template = clean_collection(metrics)
        self.metric_names: list[str] = [str(name) for name in self._template.keys()]
        self.dataloader = arguments.check_dataloader(dataloader)
        self.eval_transform = arguments.check_eval_transform(eval_transform)
        self.transform_attr = arguments.check_str("transform_attr", transform_attr, allow_empty=False)
        self.running = arguments.check_running(running, self.metric_names)
        self.forward: ForwardFn = arguments.check_forward(forward) or default_forward
        self.every_n_epochs = arguments.check_every_n_epochs(every_n_epochs)
        self.limit_batches = arguments.check_limit_batches(limit_batches)
        self.batch_size = arguments.check_batch_size(batch_size)
        self.prefix = arguments.check_str("prefix", prefix, allow_empty=True)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"`seed` must be an int (got {seed!r} that is a {type(seed).__name__}).")
        self.seed = seed
        self.val = arguments.check_running(val, self.metric_names, name="val")
        self.decompose = arguments.check_bool("decompose", decompose)
        self.guards = guard_checks.check_guard_mode(guards)
        self.print_summary = arguments.check_bool("print_summary", print_summary)
        self.cache = arguments.check_bool("cache", cache)
        self.cache_max_bytes = arguments.check_positive_int("cache_max_bytes", cache_max_bytes)

        self.history: list[dict[str, Any]] = []
        self._subsets: dict[str, list[int]] = {}
        self._sources: list[CleanSource] | None = None
        self._sources_for_loaders: Any = None
        self._metrics: dict[str | None, MetricCollection] = {}
        self._warned: set[str] = set()
        self._references = References(self.running, self.val)
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
            self._sources = None
            self._sources_for_loaders = None
            self._references.forget()
            self._validated_epoch = None
            self._trained_batches = 0

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.decompose and trainer.world_size > 1 and _has_sync_batchnorm(pl_module):
            raise ValueError(
                "EvalGuard(decompose=True) runs passes B and C in train mode, where SyncBatchNorm synchronises"
                " every batch across ranks; the ranks' shards of the training set have different numbers of"
                " batches, so that would hang. Use decompose=False, or BatchNorm without sync_batchnorm."
            )
        # Build (and so check) the clean data before the first training step, isolated from the training RNG.
        with isolated_rng():
            sources = self._clean_sources(trainer, pl_module)
            if self.decompose and any(source.mechanism != "rebuilt" for source in sources):
                raise ValueError(
                    "EvalGuard(decompose=True) runs the same samples with and without augmentation, so it needs to"
                    " rebuild the training loader; it cannot with `dataloader=` or `clean_train_dataloader()`. Use"
                    " `eval_transform=` instead, or decompose=False."
                )
            if self.eval_transform == "val" and trainer.val_dataloaders is not None:
                self._eval_transform_value(trainer, pl_module, sources)  # fails now rather than after an epoch
            if self.guards != "off":
                self._start_guards(trainer, pl_module, sources)
            if self.cache:
                self._check_cache_budget(trainer, pl_module, sources)
        self._write_tensorboard_layout(trainer, sources)

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
            self._on_train_epoch_end(trainer, pl_module)
        finally:
            self._trained_batches = 0

    def _on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer):
            return
        epoch = trainer.current_epoch
        before = guard_checks.snapshot(trainer, pl_module) if self.guards != "off" else None
        started = time.perf_counter()
        try:
            with isolated_rng():
                measured = self._measure(trainer, pl_module)
        except Exception as exc:
            _add_note(
                exc,
                f"Raised inside EvalGuard's clean pass after training epoch {epoch}. Module modes, buffers, RNG"
                " states, the trainer's stage and the dataset's transform were restored.",
            )
            raise
        if before is not None:
            changes = guard_checks.state_changes(before, guard_checks.snapshot(trainer, pl_module))
            self._guard(
                trainer,
                "state",
                None
                if not changes
                else f"EvalGuard's clean pass after epoch {epoch} did not leave the run as it found it: "
                + "; ".join(changes)
                + ". A hook called during the pass (on_before_batch_transfer, transfer_batch_to_device,"
                " on_after_batch_transfer, forward) changed it.",
            )
        if measured.get(_CLEAN):
            self._log(trainer, pl_module, measured, pass_seconds=time.perf_counter() - started)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING:
            self._release_caches()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release_caches()

    def _release_caches(self) -> None:
        """Free the cached batches (host or device memory) once the fit is over; their sizes stay readable."""
        for source in self._sources or []:
            if source.cache is not None:
                source.cache.release()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.print_summary and self.history and trainer.is_global_zero:
            _print_summary(self._summary_rows())

    def summary(self) -> str:
        """The end-of-fit summary as plain text: the last values per metric, and a one-sentence reading of each.

        Returns:
            A table of running, clean, gap, validation and generalization values (and the effects when decomposing)
                from the last evaluated epoch, followed by one reading per metric.
        """
        return summary_text(self._summary_rows())

    def _summary_rows(self) -> list[dict[str, str]]:
        if not self.history:
            return []
        last = self.history[-1]
        return summary_rows(list(last["clean"]), last)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": copy.deepcopy(self.history), "subsets": {k: list(v) for k, v in self._subsets.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = copy.deepcopy(list(state_dict.get("history", [])))
        self._subsets = {str(k): [int(i) for i in v] for k, v in dict(state_dict.get("subsets", {})).items()}

    # --------------------------------------------------------------- the pass

    def _due(self, trainer: pl.Trainer) -> bool:
        return (
            trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        )

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, dict[str, float]]:
        """Run the clean pass (and passes B and C when decomposing) over every source.

        Returns:
            ``{"clean": {name: value}}``, plus ``"train_mode_pass"`` and ``"augmented_pass"`` when decomposing.
        """
        sources = self._clean_sources(trainer, pl_module)
        eval_value = self._eval_transform_value(trainer, pl_module, sources)
        flavors = (_CLEAN, _TRAIN_MODE, _AUGMENTED) if self.decompose else (_CLEAN,)
        values: dict[tuple[str, str], torch.Tensor] = {}
        for flavor in flavors:
            for source in sources:
                # Every pass starts from the same RNG state (inside the isolation): passes B and C then draw the same
                # Dropout masks, and without augmentation they agree exactly.
                guard_checks.reseed(self.seed)
                with self._pass_context(trainer, pl_module, source, eval_value, flavor):
                    watch = flavor == _CLEAN and self.guards != "off"
                    inside = guard_checks.snapshot(trainer, pl_module) if watch else None
                    computed = self._pass_over(trainer, pl_module, source, flavor)
                    if inside is not None:
                        self._check_inside_pass(trainer, pl_module, source, inside)
                values.update({(flavor, name): value for name, value in computed.items()})
        measured: dict[str, dict[str, float]] = {flavor: {} for flavor in flavors}
        if values:
            # One host sync per pass, not per batch (MPS has no float64).
            dtype = torch.float32 if pl_module.device.type == "mps" else torch.float64
            numbers = torch.stack([value.detach().to(pl_module.device, dtype) for value in values.values()]).tolist()
            for (flavor, name), number in zip(values, numbers, strict=True):
                measured[flavor][name] = number
        return measured

    @contextlib.contextmanager
    def _pass_context(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, source: CleanSource, eval_value: Any, flavor: str
    ) -> Iterator[None]:
        """Set up one pass: rank 0's buffers, then modes, trainer stage and transform by flavor; restore all after.

        - clean: eval mode, ``trainer.training`` False, the eval transform;
        - B (train-mode pass): the modules' own training flags, ``trainer.training`` False, the eval transform;
        - C (augmented pass): the modules' own training flags, ``trainer.training`` True, the dataset's own transform.
        """
        with contextlib.ExitStack() as stack:
            stack.enter_context(preserved_buffers(pl_module))
            broadcast_buffers(pl_module, src=0)  # under DDP every rank evaluates rank 0's model
            if flavor == _CLEAN:
                stack.enter_context(eval_mode(pl_module))
            if flavor != _AUGMENTED:
                stack.enter_context(trainer_not_training(trainer))
                if source.transform_holders:
                    stack.enter_context(swapped_attribute(source.transform_holders, self.transform_attr, eval_value))
            # As Lightning's validation: inference mode, or no_grad with Trainer(inference_mode=False).
            stack.enter_context(torch.inference_mode() if uses_inference_mode(trainer) else torch.no_grad())
            if source.mechanism != "rebuilt":
                stack.enter_context(preserved_generator(getattr(source.loader, "generator", None)))
            yield

    def _pass_over(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, source: CleanSource, flavor: str
    ) -> dict[str, torch.Tensor]:
        metrics = self._metrics_for(source.name, pl_module.device)
        if source.generator is not None:
            source.generator.manual_seed(self.seed)
        loader: Any = source.loader
        max_batches = source.max_batches
        if source.cache is not None and flavor != _AUGMENTED:  # pass C reads augmented batches: never cached
            cache = source.cache
            placement = (
                device_cache_placement(trainer, pl_module, cache.device_estimate, cache.max_bytes)
                if cache.filling
                else None
            )
            loader, max_batches = cache.read(source.loader, source.max_batches, placement), None
        description = "EvalGuard clean pass" if flavor == _CLEAN else f"EvalGuard {flavor.replace('_', ' ')}"
        description += f" [{source.name}]" if source.name else ""
        with pass_progress(trainer, _length(source), description) as step:
            batches = run_pass(trainer, pl_module, loader, metrics, self.forward, max_batches, on_batch=step)
        if self._total(trainer, pl_module, batches) == 0:
            self._warn_once(
                f"empty:{source.name}",
                "EvalGuard's clean pass found no batches"
                + (f" in training loader {source.name!r}" if source.name else "")
                + "; nothing is logged for it. Is the training set empty?",
            )
            return {}
        return {join_key(source.name, name): value for name, value in flatten_scalars(metrics.compute()).items()}

    # ----------------------------------------------------------------- guards

    def _start_guards(self, trainer: pl.Trainer, pl_module: pl.LightningModule, sources: list[CleanSource]) -> None:
        """Before the first training step: is augmentation off, and is the model deterministic in eval mode?"""
        eval_value = self._eval_transform_value(trainer, pl_module, sources)
        model_batch: Any = None
        for source in sources:
            with self._pass_context(trainer, pl_module, source, eval_value, _CLEAN):

                def draw(seed: int, source: CleanSource = source) -> Any:
                    generator = source.generator or getattr(source.loader, "generator", None)
                    with preserved_generator(generator):
                        guard_checks.reseed(seed, generator)
                        batch = next(iter(source.loader), None)
                    return None if batch is None else prepare_batch(trainer, pl_module, batch)

                found, batch = guard_checks.augmentation_difference(draw)
                where = f" of training loader {source.name!r}" if source.name else ""
                self._guard(
                    trainer,
                    "augmentation",
                    None
                    if found is None
                    else f"EvalGuard's clean pass is not clean: the first clean batch{where}, drawn twice under"
                    f" different seeds, differs ({found}), so augmentation is still on. To switch it off: "
                    + guard_checks.AUGMENTATION_FIXES,
                )
                if model_batch is None:
                    model_batch = batch
        culprit = None
        # Entered on every rank (it broadcasts rank 0's buffers), also one whose shard is empty.
        with self._pass_context(trainer, pl_module, sources[0], eval_value, _CLEAN):
            if model_batch is not None:

                def predict() -> Any:
                    return checked_forward(trainer, pl_module, self.forward, model_batch)[0]

                culprit = guard_checks.stochastic_module(pl_module, predict)
        self._guard(trainer, "stochastic", None if culprit is None else _stochastic_message(culprit, pl_module))

    def _guard(self, trainer: pl.Trainer, kind: str, message: str | None) -> None:
        """Act on one guard's finding (None: nothing found); under DDP with guards="raise", every rank together.

        A rank that raised alone would leave the others waiting in the next collective, so the decision is reduced
        across ranks (one collective per check): if any rank found something, every rank raises.
        """
        if self.guards == "raise" and trainer.world_size > 1:
            anywhere = bool(trainer.strategy.reduce_boolean_decision(message is not None, all=False))
            if anywhere and message is None:
                message = f"EvalGuard's {kind} guard failed on another rank (its error says what it found)."
        if message is not None:
            self._guard_failed(kind, message)

    def _check_cache_budget(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, sources: list[CleanSource]
    ) -> None:
        """Refuse, before training, a cache whose batches would not fit ``cache_max_bytes``."""
        eval_value = self._eval_transform_value(trainer, pl_module, sources)
        for source in sources:
            batches = _length(source) or 0
            if source.cache is None:  # the same on every rank
                continue
            with self._pass_context(trainer, pl_module, source, eval_value, _CLEAN):
                first = next(iter(source.loader), None)
                converted = trainer.precision_plugin.convert_input(first) if first is not None else None
            opaque = uncopyable(first)
            if opaque is not None:  # the same on every rank (the same batch type); no collective depends on it
                self._warn_once(
                    f"uncopyable:{source.name}",
                    f"EvalGuard(cache=True) copies tensors and numpy arrays in dicts, tuples, lists and dataclasses;"
                    f" the clean batches hold a {opaque}, which it cannot copy or size, so"
                    + (f" training loader {source.name!r}" if source.name else " the clean data")
                    + " is not cached. Return tensors in a dict or tuple from the dataset or collate_fn to cache"
                    " them.",
                )
                source.cache = None
                continue
            estimate = batch_nbytes(first) * batches
            source.cache.estimate = estimate
            if default_batch_path(trainer, pl_module):
                source.cache.device_estimate = batch_nbytes(converted) * batches
            over = estimate > self.cache_max_bytes
            if trainer.world_size > 1:  # every rank refuses together, or none does
                over = bool(trainer.strategy.reduce_boolean_decision(over, all=False))
            if over:
                mib = 1 << 20
                raise ValueError(
                    f"EvalGuard(cache=True) would keep about {estimate / mib:.0f} MiB of clean batches ({batches}"
                    f" batches of {batch_nbytes(first) / mib:.1f} MiB), more than"
                    f" cache_max_bytes={self.cache_max_bytes} ({self.cache_max_bytes / mib:.0f} MiB). Evaluate a"
                    " subset with `limit_batches=`, raise `cache_max_bytes=`, or pass cache=False."
                )

    def _check_inside_pass(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        source: CleanSource,
        inside: guard_checks.StateSnapshot,
    ) -> None:
        """Before restoring anything: did something called during the pass change modes, stage or RNG?"""
        changes = guard_checks.state_changes(inside, guard_checks.snapshot(trainer, pl_module))
        if source.mechanism != "rebuilt":  # a user loader without its own generator draws its seed from torch's RNG
            changes = [change for change in changes if change != "torch CPU RNG state"]
        self._guard(
            trainer,
            "inside",
            None
            if not changes
            else f"EvalGuard's clean pass after epoch {trainer.current_epoch} was not clean: during it, "
            + "; ".join(changes)
            + " changed. Something called during the pass (on_before_batch_transfer, transfer_batch_to_device,"
            " on_after_batch_transfer, the forward, the dataset) switched a module's mode or drew random numbers.",
        )

    def _write_tensorboard_layout(self, trainer: pl.Trainer, sources: list[CleanSource]) -> None:
        """Give every attached TensorBoardLogger a custom-scalars dashboard of EvalGuard's curves (rank zero only)."""
        if not trainer.is_global_zero:
            return
        names = [join_key(source.name, name) for source in sources for name in self.metric_names]
        validation_keys = {name: self._references.validation_candidates(name) for name in names}
        layout = tensorboard_layout(self.prefix, names, validation_keys, self.decompose)
        for logger in trainer.loggers:
            if type(logger).__name__ != "TensorBoardLogger":  # either Lightning namespace's; other loggers: untouched
                continue
            writer: Any = getattr(logger, "experiment", None)
            if hasattr(writer, "add_custom_scalars"):
                writer.add_custom_scalars(layout)

    def _guard_failed(self, kind: str, message: str) -> None:
        if self.guards == "raise":
            raise EvalGuardError(message + ' Pass guards="warn" or guards="off" to EvalGuard to go on anyway.')
        self._warn_once(f"guard:{kind}", message)
    def _total(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: int) -> int:
        if trainer.world_size == 1:
            return batches
        total = trainer.strategy.reduce(torch.tensor(batches, device=pl_module.device), reduce_op="sum")
        return int(total.item()) if isinstance(total, torch.Tensor) else int(total)

    def _metrics_for(self, name: str | None, device: torch.device) -> MetricCollection:
        if name not in self._metrics:
            self._metrics[name] = self._template.clone()
        metrics = self._metrics[name].to(device)
        self._metrics[name] = metrics
        metrics.reset()
        return metrics

    def _eval_transform_value(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, sources: list[CleanSource]
    ) -> Any:
        if self.eval_transform != "val" or not any(source.transform_holders for source in sources):
            return self.eval_transform
        training = [holder for source in sources for holder in source.transform_holders]
        return validation_transform(trainer, pl_module, self.transform_attr, training_holders=training)

    # ---------------------------------------------------------- clean sources

    def _clean_sources(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[CleanSource]:
        """Build the clean sources once per fit (again if Lightning reloads the training loaders)."""
        train_loaders = trainer.train_dataloader
        if self._sources is None or self._sources_for_loaders is not train_loaders:
            options = SourceOptions(
                dataloader=self.dataloader,
                eval_transform=self.eval_transform,
                transform_attr=self.transform_attr,
                limit_batches=self.limit_batches,
                batch_size=self.batch_size,
                seed=self.seed,
                decompose=self.decompose,
                cache_max_bytes=self.cache_max_bytes if self.cache else None,
            )
            self._sources = build_sources(trainer, pl_module, options, self._subsets, self._warn_once)
            self._sources_for_loaders = train_loaders
        return self._sources

    # ---------------------------------------------------------------- logging

    def _log(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        measured: dict[str, dict[str, float]],
        pass_seconds: float,
    ) -> None:
        clean = measured[_CLEAN]
        running = self._references.running_values(trainer, clean, self._warn_once, trained=self._trained_batches > 0)
        gap = {name: clean[name] - running[name] for name in running}
        validated = self._validated_epoch == trainer.current_epoch  # validation values only when it ran this epoch
        validation = self._references.validation_values(trainer, clean) if validated else {}
        groups: dict[str, dict[str, float]] = {
            "clean": clean,
            "running": running,
            "gap": gap,
            "generalization": {name: clean[name] - validation[name] for name in validation},
        }
        if self.decompose:
            train_mode, augmented = measured[_TRAIN_MODE], measured[_AUGMENTED]
            groups["effect/train_mode"] = {n: clean[n] - train_mode[n] for n in clean if n in train_mode}
            groups["effect/augmentation"] = {n: train_mode[n] - augmented[n] for n in train_mode if n in augmented}
            groups["effect/weight_drift"] = {n: augmented[n] - running[n] for n in running if n in augmented}
        stderr = self._standard_errors(clean)
        if stderr:
            groups["stderr"] = stderr
        if trainer.world_size > 1:
            pass_seconds = float(trainer.strategy.broadcast(pass_seconds, src=0))  # the same value on every rank
        groups["time"] = {"pass_seconds": pass_seconds}
        # The values are already the same on every rank; under DDP sync_dist keeps them so (a mean of equal values)
        # and spares the user Lightning's advice to use it.
        sync = trainer.world_size > 1
        for group, values in groups.items():
            for name, value in values.items():
                pl_module.log(join_key(self.prefix, group, name), value, on_step=False, on_epoch=True, sync_dist=sync)
        entry: dict[str, Any] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        entry.update({"clean": dict(clean), "running": running, "gap": gap, "validation": validation})
        entry.update({group: values for group, values in groups.items() if group not in entry})
        self.history.append(entry)

    def _standard_errors(self, clean: Mapping[str, float]) -> dict[str, float]:
        """sqrt(p (1 - p) / n) for micro-averaged accuracies measured on a subset of n samples."""
        if self.limit_batches is None or not self._sources:
            return {}
        accuracies = {str(name) for name, metric in self._template.items(keep_base=False) if is_micro_accuracy(metric)}
        stderr: dict[str, float] = {}
        for source in self._sources:
            if source.total_samples is None or not source.sampled:
                continue
            for name in accuracies:
                key = join_key(source.name, name)
                if key in clean and source.total_samples > 0:
                    p = min(max(clean[key], 0.0), 1.0)
                    stderr[key] = math.sqrt(p * (1.0 - p) / source.total_samples)
        return stderr

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=EvalGuardWarning)


def _has_sync_batchnorm(module: torch.nn.Module) -> bool:
    return any(isinstance(submodule, torch.nn.SyncBatchNorm) for submodule in module.modules())


def _length(source: CleanSource) -> int | None:
    """The number of batches a pass over ``source`` reads, when known."""
    try:
        length = len(source.loader)  # type: ignore[arg-type]
    except TypeError:
        return source.max_batches
    return length if source.max_batches is None else min(length, source.max_batches)


def _stochastic_message(culprit: str, pl_module: pl.LightningModule) -> str:
    if culprit == "forward=":
        where = "the `forward=` callable passed to EvalGuard (the randomness is outside every module)"
    elif culprit == "":
        where = f"the forward of the LightningModule itself ({type(pl_module).__name__}.forward)"
    else:
        where = f"module {culprit!r} ({type(pl_module.get_submodule(culprit)).__name__})"
    return (
        "EvalGuard's clean pass is not deterministic: in eval mode, the same clean batch gives different outputs"
        f" under different seeds. The first module whose output differs for an identical input is {where}. It"
        " ignores eval mode (e.g. F.dropout(x, training=True), or a custom random layer): make it check"
        " `self.training`."
    )


@rank_zero_only
def _print_summary(rows: list[dict[str, str]]) -> None:
    # The end-of-fit summary is the one thing EvalGuard prints (print_summary=False turns it off). A rich table in a
    # terminal; plain text elsewhere (log files, pipes), where rich would cut the table at 80 columns.
    rendered = render_summary(rows) if sys.stdout.isatty() else summary_text(rows)
    if isinstance(rendered, str):
        print(rendered)
    else:
        from rich.console import Console

        Console().print(rendered)


def _add_note(exc: BaseException, note: str) -> None:
    if sys.version_info >= (3, 11):
        exc.add_note(note)
    else:  # pragma: no cover - Python 3.10
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]
