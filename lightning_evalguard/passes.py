"""EvalGuard's passes over the clean data: the clean pass, passes B and C, and the checks at fit start.

A pass runs inside :func:`pass_context`, which sets what its :class:`PassKind` needs (modes, trainer stage, transform,
grad mode, rank 0's buffers) and puts every piece back in ``finally``. :class:`Passes` runs them over the clean
sources and turns the metrics into numbers; at fit start it draws the first clean batch for the guards and for the
cache's size.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import BatchSampler, DataLoader
from torchmetrics import MetricCollection

from lightning_evalguard._lightning import uses_inference_mode
from lightning_evalguard.cache import device_cache_placement, size_at_fit_start
from lightning_evalguard.distributed import (
    any_rank,
    any_reading,
    broadcast_buffers,
    gather,
    plan_pass,
    shared_batch,
    summed,
    total,
)
from lightning_evalguard.forward import ForwardFn, batch_path, checked_forward, default_batch_path, prepare_batch
from lightning_evalguard.guards import (
    GuardPolicy,
    StateSnapshot,
    augmentation_difference,
    describe_module,
    rng_changes,
    rng_state,
    snapshot,
    state_changes,
    stochastic_module,
    watching_batch_hooks,
    watching_modules,
)
from lightning_evalguard.isolation import (
    eval_mode,
    preserved_buffers,
    preserved_generator,
    preserved_generators,
    reseed,
    swapped_attribute,
    trainer_not_training,
)
from lightning_evalguard.metrics import SampleMoments, check_fits, flatten_scalars, is_mean_of_samples, join_key
from lightning_evalguard.progress import pass_progress
from lightning_evalguard.samples import SampleTracker
from lightning_evalguard.sources import (
    CleanData,
    CleanSource,
    fetch_in_main_process,
    first_indices,
    is_iterable_dataset,
)

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["Measured", "PassKind", "Passes", "check_decomposable", "pass_context", "run_pass"]

Warn = Callable[[str, str], None]


class PassKind(enum.Enum):
    """The passes a measurement may run: the clean one, and for ``decompose=True`` passes B and C.

    - ``CLEAN``: eval mode, ``trainer.training`` False, the eval transform;
    - ``TRAIN_MODE`` (pass B): the modules' own training flags, ``trainer.training`` False, the eval transform;
    - ``AUGMENTED`` (pass C): the modules' own training flags, ``trainer.training`` True, the dataset's own transform.
    """

    CLEAN = "clean"
    TRAIN_MODE = "train_mode_pass"
    AUGMENTED = "augmented_pass"

    @property
    def description(self) -> str:
        """How the progress bar names the pass."""
        return "EvalGuard clean pass" if self is PassKind.CLEAN else f"EvalGuard {self.value.replace('_', ' ')}"


#: The values each pass measured, by pass kind and then logged name (``<loader>/<metric>``).
Measured = dict[PassKind, dict[str, float]]


@contextlib.contextmanager
def pass_context(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    source: CleanSource,
    kind: PassKind,
    eval_transform: Any,
    before_training: bool = False,
) -> Iterator[None]:
    """Set up one pass over ``source``, and restore everything it set afterwards, also when the body raises.

    Rank 0's buffers (every rank's own come back), then by kind (see :class:`PassKind`) modes, the trainer's stage and
    the transform; the grad mode of Lightning's validation (inference mode, or ``no_grad`` with
    ``Trainer(inference_mode=False)``); a user loader's own generator.

    Args:
        trainer: The Trainer.
        pl_module: The LightningModule.
        source: The clean source the pass reads.
        kind: The pass.
        eval_transform: The value set on it (clean pass and pass B).
        before_training: For the checks before the first training step: ``no_grad`` rather than inference mode, so
            a tensor a forward creates and keeps (a lazily built cache) is not an inference tensor in training.

    Yields:
        None.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(preserved_buffers(pl_module))
        broadcast_buffers(pl_module, src=0)  # under DDP every rank evaluates rank 0's model
        if kind is PassKind.CLEAN:
            stack.enter_context(eval_mode(pl_module))
        if kind is not PassKind.AUGMENTED:
            stack.enter_context(trainer_not_training(trainer))
            if source.transform_holders:
                stack.enter_context(swapped_attribute(source.transform_holders, source.transform_attr, eval_transform))
        inference = uses_inference_mode(trainer) and not before_training
        stack.enter_context(torch.inference_mode() if inference else torch.no_grad())
        if source.mechanism != "rebuilt":
            stack.enter_context(preserved_generator(getattr(source.loader, "generator", None)))
        # Augmentation objects (and models) with a generator of their own: what the pass draws from them goes back.
        stack.enter_context(preserved_generators(*_data_objects(source.loader), pl_module))
        yield


def _data_objects(loader: Any) -> tuple[Any, ...]:
    # What a loader reads through: its dataset, samplers, generator and collate_fn (not its live worker iterator).
    if not isinstance(loader, DataLoader):
        return (loader,)
    return (loader.dataset, loader.sampler, loader.batch_sampler, loader.generator, loader.collate_fn)


def run_pass(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    loader: Iterable[Any],
    metrics: MetricCollection,
    forward: ForwardFn,
    max_batches: int | None = None,
    on_batch: Callable[[], Any] | None = None,
    count: int | None = None,
    observe: Callable[[Any, Any, Any], Any] | None = None,
) -> int:
    """Feed every batch of ``loader`` through the model and update ``metrics``; return the number of batches.

    Each batch goes through ``precision_plugin.convert_input``, ``on_before_batch_transfer`` and
    ``strategy.batch_to_device`` (``transfer_batch_to_device`` and ``on_after_batch_transfer``), as in the training
    loop, and the forward runs under the precision plugin's validation context (autocast for mixed precision).
    Nothing here syncs with the host. The caller sets modes, grad mode, RNG and trainer stage.

    Under DDP every rank makes the same number of forwards, since under sharded strategies each forward is itself a
    collective: the ranks agree on the most batches any of them reads (``distributed.plan_pass``), and a rank with
    fewer runs padding forwards on a batch it already has (its first; another rank's when its shard is empty), whose
    outputs update no metric. A loader whose length is unknown (``count`` None) is read in lockstep, agreeing batch by
    batch. The values stay those of the unpadded shards.

    Args:
        trainer: The Trainer.
        pl_module: The LightningModule (not the DDP wrapper: its forward would sync buffers per batch).
        loader: The clean batches.
        metrics: The metrics to update, already reset and on the module's device.
        forward: Computes ``(preds, target)`` from the module and a batch.
        max_batches: Stop after this many batches.
        on_batch: Called after every batch (advances a progress bar).
        count: The batches this rank reads (at most ``max_batches``), when known before reading: under DDP.
        observe: Called with ``(batch, preds, target)`` after each batch's metric update (per-sample statistics);
            not for padding forwards.

    Returns:
        The number of batches evaluated (padding forwards not counted).
    """
    to_device = batch_path(trainer, pl_module)
    batches = 0

    def evaluate(batch: Any) -> None:
        nonlocal batches
        preds, target = checked_forward(trainer, pl_module, forward, batch)
        metrics.update(preds, target)
        if observe is not None:
            observe(batch, preds, target)
        batches += 1
        if on_batch is not None:
            on_batch()

    raw: Iterator[Any] = iter(loader) if max_batches is None else itertools.islice(loader, max_batches)
    if trainer.world_size == 1:
        for batch in raw:
            evaluate(to_device(batch))
        return batches
    device = pl_module.device
    first_raw = next(raw, _END)
    first = None if first_raw is _END else to_device(first_raw)
    plan = plan_pass(trainer, device, count, first is not None)
    padding = shared_batch(trainer, device, first) if plan.lacking else first
    stream = itertools.chain([] if first is None else [first], (to_device(batch) for batch in raw))
    if plan.forwards is not None:
        for batch in stream:
            evaluate(batch)
        for _ in range(plan.forwards - batches):
            checked_forward(trainer, pl_module, forward, padding)
        return batches
    while True:  # lengths unknown: agree before every forward
        batch = next(stream, _END)
        if not any_reading(trainer, device, batch is not _END):
            return batches
        if batch is _END:
            checked_forward(trainer, pl_module, forward, padding)
        else:
            evaluate(batch)


#: Marks the end of an iterator (a batch may be None).
_END: Any = object()


def check_decomposable(trainer: pl.Trainer, pl_module: pl.LightningModule, sources: list[CleanSource] | None) -> None:
    """Refuse, before training, a ``decompose=True`` that cannot run: call before and after building the sources.

    Args:
        trainer: The Trainer.
        pl_module: The LightningModule.
        sources: The clean sources, or None before they are built (only the model is checked then).

    Raises:
        ValueError: Under DDP with ``SyncBatchNorm`` (passes B and C in train mode would synchronise every batch
            over shards of different lengths, and hang); with a clean loader EvalGuard does not rebuild.
    """
    if sources is None:
        if trainer.world_size > 1 and any(isinstance(m, torch.nn.SyncBatchNorm) for m in pl_module.modules()):
            raise ValueError(
                "EvalGuard(decompose=True) runs passes B and C in train mode, where SyncBatchNorm synchronises"
                " every batch across ranks; the ranks' shards of the training set have different numbers of"
                " batches, so that would hang. Use decompose=False, or BatchNorm without sync_batchnorm."
            )
    elif any(source.mechanism != "rebuilt" for source in sources):
        raise ValueError(
            "EvalGuard(decompose=True) runs the same samples with and without augmentation, so it needs to"
            " rebuild the training loader; it cannot with `dataloader=` or `clean_train_dataloader()`. Use"
            " `eval_transform=` instead, or decompose=False."
        )


def check_trackable(sources: list[CleanSource], sample_ids: Any) -> None:
    """Refuse, before training, a ``track_samples=True`` whose samples cannot be identified.

    Args:
        sources: The clean sources.
        sample_ids: The callback's ``sample_ids`` argument.

    Raises:
        ValueError: With several training loaders, or without the dataset index of each sample (a clean loader
            EvalGuard did not rebuild over a map-style dataset) and no ``sample_ids``.
    """
    if len(sources) > 1:
        raise ValueError(
            f"EvalGuard(track_samples=True) follows the samples of one training loader; this fit has {len(sources)}."
            " Track one of them with `dataloader=` (its clean loader) and `sample_ids=`, or pass track_samples=False."
        )
    if sources and sources[0].order is None and sample_ids is None:
        raise ValueError(
            "EvalGuard(track_samples=True) keys its statistics by dataset index, which it knows only for the loader it"
            " rebuilds over a map-style dataset. With `dataloader=`, `clean_train_dataloader()` or an IterableDataset,"
            " pass `sample_ids=`: a callable (batch) -> LongTensor[B] of each sample's index."
        )


class Passes:
    """Runs EvalGuard's passes over the clean sources with clones of the metrics, and the fit-start checks.

    Attributes:
        template: The metrics every source's clones are made from (never updated).
        forward: ``(module, batch) -> (preds, target)``.
        seed: The RNG state every pass starts from, and the seed of the loaders' own generators.
        policy: What the guards do with what they find.
    """

    def __init__(
        self,
        template: MetricCollection,
        forward: ForwardFn,
        seed: int,
        policy: GuardPolicy,
        warn: Warn,
        tracker: SampleTracker | None = None,
    ) -> None:
        """Store what the passes need.

        Args:
            template: The metrics every source's clones are made from.
            forward: ``(module, batch) -> (preds, target)``.
            seed: The RNG state every pass starts from.
            policy: What the guards do with what they find.
            warn: ``(key, message)``: gives a warning once.
            tracker: Collects per-sample statistics from the clean passes (``track_samples=True``).
        """
        self.template = template
        self.tracker = tracker
        self.samples_logged: dict[str, float] = {}
        #: ``(count, sum, sum of squares)`` of the per-sample values of mean-of-samples metrics, by logged name, from
        #: the last clean pass over each random subset (for their standard errors).
        self.moments: dict[str, tuple[float, float, float]] = {}
        self._per_sample = {
            str(name): metric for name, metric in template.items(keep_base=False) if is_mean_of_samples(metric)
        }
        self.forward = forward
        self.seed = seed
        self.policy = policy
        self._warn = warn
        self._metrics: dict[str | None, MetricCollection] = {}

    def metrics(self) -> dict[str | None, MetricCollection]:
        """The metric clones the passes updated, by source name (None for a single loader).

        Returns:
            A new dict of the clones (the objects themselves, as the last pass left them).
        """
        return dict(self._metrics)

    # ------------------------------------------------------------------ at fit start

    def check_at_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, data: CleanData) -> None:
        """Before the first training step, on the first clean batch: the set-up checks, and the guards unless off.

        Always: the first clean batch of each source is produced (in this process) and brought to the model, the
        eval-mode forward runs on the first one found, and a clone of each metric is updated with its
        ``(preds, target)``, so a batch the forward cannot take, a ``forward=`` that returns something else or a
        metric that does not fit the outputs fail now. With the guards on, also: the sampler must not draw (a
        shuffling loader), producing the batch and the batch hooks must not draw random numbers, the batch drawn
        under two seeds must be the same, and the forward must not draw or differ. The caller isolates the RNG.

        Args:
            trainer: The Trainer.
            pl_module: The LightningModule.
            data: The clean data.

        Raises:
            TypeError: If the batch or the forward's output is not what the forward or the metrics take.
            Exception: A metric's own error when it does not fit the outputs (see ``metrics.check_fits``).
            EvalGuardError: With ``guards="raise"``, when a guard finds something.
        """
        sources = data.get(trainer, pl_module)
        eval_value = data.eval_transform(trainer, pl_module)
        model_batch: Any = None
        for source in sources:
            with pass_context(trainer, pl_module, source, PassKind.CLEAN, eval_value, before_training=True):
                batch = self._first_batch(trainer, pl_module, source)
            if model_batch is None:
                model_batch = batch
        culprit, drew = None, False
        # Under DDP a rank with an empty shard runs the same forwards on another rank's batch.
        model_batch = shared_batch(trainer, pl_module.device, model_batch)
        # Entered on every rank (it broadcasts rank 0's buffers), also one whose shard is empty.
        with pass_context(trainer, pl_module, sources[0], PassKind.CLEAN, eval_value, before_training=True):
            if model_batch is not None:
                preds, target = checked_forward(trainer, pl_module, self.forward, model_batch)
                check_fits(self.template, preds, target, pl_module.device)
                if self.tracker is not None:
                    self.tracker.check(preds, target)  # fails now for outputs it cannot score
                if self.policy.enabled:
                    culprit, drew = self._model_culprit(trainer, pl_module, model_batch)
        if self.policy.enabled:
            self.policy.stochastic(trainer, culprit, pl_module, drew)

    def _first_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, source: CleanSource) -> Any:
        """The source's first clean batch as it reaches the model; with the guards on, checked on the way."""
        loader = source.loader
        owners = (getattr(trainer, "datamodule", None), pl_module)
        if not self.policy.enabled:  # through the loader, its workers and worker_init_fn, as the passes read it
            raw = next(iter(loader), None)
            return None if raw is None else prepare_batch(trainer, pl_module, raw)
        before = rng_state()
        sampler_states = [generator.get_state() for generator in _sampler_generators(loader)]
        indices = first_indices(loader)
        sampler_drew = bool(rng_changes(before, rng_state())) or any(
            not torch.equal(state, generator.get_state())
            for state, generator in zip(sampler_states, _sampler_generators(loader), strict=True)
        )
        self.policy.shuffle(trainer, _sampler_name(loader) if sampler_drew else None, source.where)

        def draw(seed: int, hooks_drew: list[str] | None = None) -> Any:
            reseed(seed)
            before = rng_state()
            raw = fetch_in_main_process(loader, indices)
            data_drew.extend(change for change in rng_changes(before, rng_state()) if change not in data_drew)
            if raw is None:
                return None
            if hooks_drew is None:
                return prepare_batch(trainer, pl_module, raw)
            with watching_batch_hooks(owners, hooks_drew):
                return prepare_batch(trainer, pl_module, raw)

        data_drew: list[str] = []
        hooks_drew: list[str] = []
        found, batch = augmentation_difference(lambda seed: draw(seed, hooks_drew if seed == 1 else None))
        self.policy.augmentation(trainer, found, source.where, data_drew, hooks_drew)
        return batch

    def _model_culprit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> tuple[str | None, bool]:
        """The first module that draws random numbers in eval mode (``drew`` True), else one whose output differs."""

        def predict() -> Any:
            return checked_forward(trainer, pl_module, self.forward, batch)[0]

        modules_drew: list[str] = []
        reseed(1)
        before = rng_state()
        with watching_modules(pl_module, modules_drew):
            predict()
        forward_drew = bool(rng_changes(before, rng_state()))
        differs = stochastic_module(pl_module, predict)  # always: every rank makes the same three forwards
        if modules_drew:
            return modules_drew[0], True
        if forward_drew:
            return "forward=", True
        return differs, False

    def size_caches(self, trainer: pl.Trainer, pl_module: pl.LightningModule, data: CleanData) -> None:
        """Size each source's cache from its first clean batch before training (see ``cache.size_at_fit_start``).

        A source whose batches the cache cannot copy loses its cache. The caller isolates the RNG.

        Args:
            trainer: The Trainer.
            pl_module: The LightningModule.
            data: The clean data, with its sources built.

        Raises:
            ValueError: If a cache would exceed ``cache_max_bytes``.
        """
        sources = data.get(trainer, pl_module)
        eval_value = data.eval_transform(trainer, pl_module)
        device_path = default_batch_path(trainer, pl_module)
        for source in sources:
            if source.cache is None:  # the same on every rank
                continue
            with pass_context(trainer, pl_module, source, PassKind.CLEAN, eval_value, before_training=True):
                first = next(iter(source.loader), None)
                converted = trainer.precision_plugin.convert_input(first) if first is not None else None
            batches = source.num_batches or 0
            source.cache = size_at_fit_start(
                trainer, source.cache, first, converted, device_path, batches, source.where, self._warn
            )

    # ------------------------------------------------------------------ at epoch end

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, data: CleanData, decompose: bool) -> Measured:
        """Run the clean pass (and passes B and C when decomposing) over every source.

        Every pass starts from the same RNG state (``seed``; the caller isolates the RNG), so passes B and C draw the
        same Dropout masks, and without augmentation they agree exactly. The clean pass is watched from inside: what
        something it called changed is reported before anything is restored.

        Args:
            trainer: The Trainer.
            pl_module: The LightningModule.
            data: The clean data.
            decompose: Whether to run passes B and C.

        Returns:
            The values by kind (every kind run, empty where nothing was measured).

        Raises:
            EvalGuardError: With ``guards="raise"``, when the guard inside the clean pass finds something.
        """
        sources = data.get(trainer, pl_module)
        data.size_subsets(trainer)  # limit_batches="auto": the subset the last pass sized
        eval_value = data.eval_transform(trainer, pl_module)
        kinds = list(PassKind) if decompose else [PassKind.CLEAN]
        self.moments = {}
        values: dict[tuple[PassKind, str], torch.Tensor] = {}
        for kind in kinds:
            for source in sources:
                reseed(self.seed)
                with pass_context(trainer, pl_module, source, kind, eval_value):
                    watch = kind is PassKind.CLEAN and self.policy.enabled
                    inside = snapshot(trainer, pl_module) if watch else None
                    computed = self._pass_over(trainer, pl_module, source, kind)
                    if inside is not None:
                        self._check_inside(trainer, pl_module, source, inside)
                values.update({(kind, name): value for name, value in computed.items()})
        measured: Measured = {kind: {} for kind in kinds}
        if values:
            # One host sync per pass, not per batch (MPS has no float64).
            dtype = torch.float32 if pl_module.device.type == "mps" else torch.float64
            numbers = torch.stack([value.detach().to(pl_module.device, dtype) for value in values.values()]).tolist()
            for (kind, name), number in zip(values, numbers, strict=True):
                measured[kind][name] = number
        return measured

    def _pass_over(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, source: CleanSource, kind: PassKind
    ) -> dict[str, torch.Tensor]:
        metrics = self._metrics_for(source.name, pl_module.device)
        if source.generator is not None:
            source.generator.manual_seed(self.seed)
        loader: Any = source.loader
        max_batches = source.max_batches
        count = None if is_iterable_dataset(source.loader) else source.num_batches  # None: read in lockstep
        if source.cache is not None and kind is not PassKind.AUGMENTED:  # pass C reads augmented batches: never cached
            cache = source.cache
            placement = (
                device_cache_placement(trainer, pl_module, cache.device_estimate, cache.max_bytes)
                if cache.filling
                else None
            )
            if cache.batches is not None:
                count = len(cache.batches)
            loader, max_batches = cache.read(source.loader, source.max_batches, placement), None
        description = kind.description + (f" [{source.name}]" if source.name else "")
        outputs = self.tracker.start_pass(source.order) if self.tracker and kind is PassKind.CLEAN else None
        moments = None
        if kind is PassKind.CLEAN and source.sampled and self._per_sample:
            moments = SampleMoments({join_key(source.name, name): m for name, m in self._per_sample.items()})
        observers = [observer.observe for observer in (outputs, moments) if observer is not None]

        def observe_all(batch: Any, preds: Any, target: Any) -> None:
            for observer in observers:
                observer(batch, preds, target)

        observe = None if not observers else observers[0] if len(observers) == 1 else observe_all
        with pass_progress(trainer, source.num_batches, description) as step:
            batches = run_pass(trainer, pl_module, loader, metrics, self.forward, max_batches, step, count, observe)
        computed: dict[str, torch.Tensor] = {}
        if total(trainer, pl_module.device, batches) == 0:
            self._warn(
                f"empty:{source.name}",
                "EvalGuard's clean pass found no batches"
                + (f" in{source.where}" if source.name else "")
                + "; nothing is logged for it. Is the training set empty?",
            )
        else:
            scalars = flatten_scalars(metrics.compute())
            computed = {join_key(source.name, name): value for name, value in scalars.items()}
            if moments is not None:
                table = summed(trainer, moments.table(pl_module.device)).tolist()
                for name, (count, sum_, squares) in zip(moments.metrics, table, strict=True):
                    self.moments[name] = (count, sum_, squares)
        if outputs is not None and self.tracker is not None:  # every rank's values, folded in on every rank
            self.samples_logged = self.tracker.fold(trainer.current_epoch, gather(trainer, outputs.to_host()))
        return computed

    def _check_inside(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, source: CleanSource, inside: StateSnapshot
    ) -> None:
        """Before restoring anything: did something called during the pass change modes, stage or RNG?

        When RNG states changed, the first clean batch is run once more, watched, to name what draws.
        """
        changes = state_changes(inside, snapshot(trainer, pl_module))
        if source.mechanism != "rebuilt":  # a user loader without its own generator draws its seed from torch's RNG
            changes = [change for change in changes if change != "torch CPU RNG state"]
        drew = any(change.endswith(" state") for change in changes)
        culprit = self._drawer(trainer, pl_module, source) if any_rank(trainer, drew) else None
        self.policy.inside_pass(trainer, changes, culprit)

    def _drawer(self, trainer: pl.Trainer, pl_module: pl.LightningModule, source: CleanSource) -> str | None:
        """What draws random numbers on the first clean batch: the data, a batch hook, a module or ``forward=``.

        Under DDP every rank runs it (one forward each, on another rank's batch when its shard is empty).
        """
        indices = first_indices(source.loader)
        reseed(self.seed)
        before = rng_state()
        raw = fetch_in_main_process(source.loader, indices)
        data_drew = bool(rng_changes(before, rng_state()))
        hooks_drew: list[str] = []
        batch = None
        if raw is not None:
            with watching_batch_hooks((getattr(trainer, "datamodule", None), pl_module), hooks_drew):
                batch = prepare_batch(trainer, pl_module, raw)
        batch = shared_batch(trainer, pl_module.device, batch)
        if batch is None:
            return None
        modules_drew: list[str] = []
        before = rng_state()
        with watching_modules(pl_module, modules_drew):
            checked_forward(trainer, pl_module, self.forward, batch)
        forward_drew = bool(rng_changes(before, rng_state()))
        if raw is not None and data_drew:
            return f"the clean data{source.where} (its dataset or collate_fn, while producing the batch)"
        if hooks_drew:
            return f"{hooks_drew[0]} (with trainer.training False)"
        if modules_drew:
            return describe_module(modules_drew[0], pl_module)
        return "the `forward=` callable passed to EvalGuard" if forward_drew else None

    def _metrics_for(self, name: str | None, device: torch.device) -> MetricCollection:
        if name not in self._metrics:
            self._metrics[name] = self.template.clone()
        metrics = self._metrics[name].to(device)
        self._metrics[name] = metrics
        metrics.reset()
        return metrics


def _sampler_generators(loader: Any) -> list[torch.Generator]:
    # The generators a loader's sampler may draw its order from (besides torch's global one).
    samplers = [getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)]
    found = [getattr(sampler, "generator", None) for sampler in samplers] + [getattr(loader, "generator", None)]
    unique = {id(generator): generator for generator in found if isinstance(generator, torch.Generator)}
    return list(unique.values())


def _sampler_name(loader: Any) -> str:
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if batch_sampler is not None and type(batch_sampler) is not BatchSampler:  # a custom batch sampler
        sampler = batch_sampler
    return type(sampler).__name__
