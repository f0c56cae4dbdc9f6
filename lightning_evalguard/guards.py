"""Checks that catch a clean pass that would not be clean, and the policy that acts on what they find.

- ``augmentation_difference``: the first clean batch, drawn twice under different seeds, must be identical;
  otherwise augmentation is still on.
- ``stochastic_module``: the model in eval mode, run twice on that batch under different seeds, must give the
  same output; otherwise a layer ignores eval mode, and forward hooks name the first one.
- ``state_changes``: module flags, the trainer's stage and RNG states must be as they were, inside a pass (nothing
  the pass called changed them) and after it (everything was put back).

``GuardPolicy`` owns every guard message and the ``guards`` decision: raise, warn once, or off; under DDP with
``guards="raise"`` every rank raises together.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from lightning_evalguard._lightning import user_overrides
from lightning_evalguard.arguments import GuardMode
from lightning_evalguard.distributed import any_rank
from lightning_evalguard.errors import EvalGuardError
from lightning_evalguard.forward import BATCH_HOOKS
from lightning_evalguard.isolation import accelerator_rng_states, reseed

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "AUGMENTATION_FIXES",
    "GuardMode",
    "GuardPolicy",
    "RngState",
    "StateSnapshot",
    "augmentation_difference",
    "describe_module",
    "difference",
    "rng_changes",
    "rng_state",
    "snapshot",
    "state_changes",
    "stochastic_module",
    "watching_batch_hooks",
    "watching_modules",
]

Warn = Callable[[str, str], None]

#: The ways to switch augmentation off, listed in the guard's message.
AUGMENTATION_FIXES = (
    "pass `eval_transform=` (a clean transform, 'val' for the validation dataset's, or torch.nn.Identity()) so"
    " EvalGuard sets it on the training dataset's `transform_attr` for the pass; pass `dataloader=` with a clean"
    " loader; define `clean_train_dataloader()` on your LightningDataModule or LightningModule; and gate batch-level"
    " augmentation in on_before_batch_transfer/on_after_batch_transfer on `self.trainer.training`. A clean loader"
    " must not shuffle either."
)


#: A dataclass field that was never set (``init=False`` without a default).
_UNSET: Any = object()


def difference(first: Any, second: Any, where: str = "batch") -> str | None:
    """Describe the first place where two nested structures differ, or return None when they are the same.

    Floating-point tensors within a relative 1e-5 (absolute 1e-6) of each other count as the same: nondeterministic
    kernels differ in the last bits, randomness does not stay that close.

    Args:
        first: A batch or output (tensors in tuples, lists, dicts, dataclasses, or other comparable objects).
        second: The other one.
        where: How to name the root in the description.

    Returns:
        E.g. ``"batch[0] differs (max abs difference 0.41)"``, or None.
    """
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        if first.shape != second.shape or first.dtype != second.dtype:
            return (
                f"{where} differs in shape or dtype ({tuple(first.shape)} {first.dtype} vs"
                f" {tuple(second.shape)} {second.dtype})"
            )
        if torch.equal(first, second):
            return None
        if first.is_floating_point() or first.is_complex():
            # Last-bit differences from nondeterministic kernels (GPU atomics) are not randomness: tolerate them.
            if torch.allclose(first, second, rtol=1e-5, atol=1e-6, equal_nan=True):
                return None
            gap = (first.double() - second.double()).abs().max().item()
            return f"{where} differs (max abs difference {gap:.3g})"
        return f"{where} differs"
    if isinstance(first, Mapping) and isinstance(second, Mapping):
        if first.keys() != second.keys():
            return f"{where} differs in its keys"
        for key in first:
            found = difference(first[key], second[key], f"{where}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(first, Sequence) and isinstance(second, Sequence) and not isinstance(first, str):
        if len(first) != len(second):
            return f"{where} differs in length"
        for index, (a, b) in enumerate(zip(first, second, strict=True)):
            found = difference(a, b, f"{where}[{index}]")
            if found:
                return found
        return None
    if (
        dataclasses.is_dataclass(first)
        and not isinstance(first, type)
        and type(first) is type(second)  # a dataclass batch: compare its fields (its == would compare tensors)
    ):
        for item in dataclasses.fields(first):
            if not item.compare:  # e.g. an id the dataclass itself leaves out of ==
                continue
            values = getattr(first, item.name, _UNSET), getattr(second, item.name, _UNSET)
            found = None if values[0] is _UNSET and values[1] is _UNSET else difference(*values, f"{where}.{item.name}")
            if found:
                return found
        return None
    try:
        return None if bool(first == second) else f"{where} differs"
    except Exception:  # objects whose comparison is ambiguous: not comparable, so not reported
        return None


def augmentation_difference(draw: Callable[[int], Any]) -> tuple[str | None, Any]:
    """Draw the first clean batch under two seeds and describe how they differ.

    Args:
        draw: ``seed -> batch``: seeds every RNG the data pipeline may use (see ``reseed``) and returns the first
            clean batch as it reaches the model, or None when the loader is empty.

    Returns:
        ``(difference or None, the first draw)``; ``(None, None)`` for an empty loader.
    """
    first, second = draw(1), draw(2)
    if first is None or second is None:
        return None, None
    return difference(first, second), first


@contextmanager
def _recording(module: nn.Module, calls: list[tuple[str, Any, Any]]) -> Iterator[None]:
    names = {id(submodule): name for name, submodule in module.named_modules()}

    def hook(submodule: nn.Module, args: Any, output: Any) -> None:
        calls.append((names.get(id(submodule), type(submodule).__name__), args, output))

    handles = [submodule.register_forward_hook(hook) for submodule in module.modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def stochastic_module(module: nn.Module, run: Callable[[], Any]) -> str | None:
    """Find a module that is random in eval mode: run the model twice under different seeds and compare.

    Forward hooks record every module call's input and output in completion order; the first call whose input is
    identical in both runs but whose output differs is the culprit (a Dropout used with ``training=True``, a custom
    stochastic layer). Inline randomness in a module's own ``forward`` names that module.

    Args:
        module: The model, already in eval mode.
        run: Runs the forward on the first clean batch under the current RNG state; returns its predictions.

    Returns:
        The qualified name of the first module whose output differs for an identical input (``""`` for the root
            module), ``"forward="`` when the randomness is outside every module, or None when both runs agree.
    """
    first_calls: list[tuple[str, Any, Any]] = []
    second_calls: list[tuple[str, Any, Any]] = []
    reseed(1)
    with _recording(module, first_calls):
        first = run()
    reseed(2)
    with _recording(module, second_calls):
        second = run()
    if difference(first, second) is None:
        return None
    for (name, args_one, out_one), (other, args_two, out_two) in zip(first_calls, second_calls, strict=False):
        if name != other:
            break
        if difference(args_one, args_two) is None and difference(out_one, out_two) is not None:
            return name
    return "forward="


@dataclass(frozen=True)
class RngState:
    """The global RNG states: torch CPU, the accelerators' in use, numpy, Python ``random``."""

    torch_rng: torch.Tensor
    numpy_rng: tuple[Any, ...]
    python_rng: Any
    accelerator_rng: dict[str, list[torch.Tensor]]


def rng_state() -> RngState:
    """Record the global RNG states.

    Returns:
        The states.
    """
    return RngState(
        torch_rng=torch.get_rng_state(),
        numpy_rng=tuple(np.random.get_state(legacy=True)),
        python_rng=random.getstate(),
        accelerator_rng=accelerator_rng_states(),
    )


def rng_changes(before: RngState, after: RngState) -> list[str]:
    """Name the global RNGs whose state differs between two records (something drew from them).

    Args:
        before: The earlier record.
        after: The later one.

    Returns:
        E.g. ``["torch CPU RNG state", "numpy RNG state"]``; empty when nothing drew.
    """
    changes = []
    if not torch.equal(before.torch_rng, after.torch_rng):
        changes.append("torch CPU RNG state")
    for name in sorted(set(before.accelerator_rng) | set(after.accelerator_rng)):
        first, second = before.accelerator_rng.get(name, []), after.accelerator_rng.get(name, [])
        if len(first) != len(second) or any(not torch.equal(a, b) for a, b in zip(first, second, strict=False)):
            changes.append(f"{name} RNG state")
    if (
        before.numpy_rng[0] != after.numpy_rng[0]
        or not np.array_equal(before.numpy_rng[1], after.numpy_rng[1])
        or (before.numpy_rng[2:] != after.numpy_rng[2:])
    ):
        changes.append("numpy RNG state")
    if before.python_rng != after.python_rng:
        changes.append("Python random state")
    return changes


@dataclass(frozen=True)
class StateSnapshot:
    """What a pass must leave as it found it: module flags, trainer stage, RNG states."""

    modes: tuple[tuple[str, bool], ...]
    stage: Any
    rng: RngState


def snapshot(trainer: pl.Trainer, module: nn.Module) -> StateSnapshot:
    """Record module flags, the trainer's stage and the global RNG states.

    Args:
        trainer: The Trainer.
        module: The LightningModule.

    Returns:
        The snapshot.
    """
    return StateSnapshot(
        modes=tuple((name, submodule.training) for name, submodule in module.named_modules()),
        stage=trainer.state.stage,
        rng=rng_state(),
    )


def state_changes(before: StateSnapshot, after: StateSnapshot) -> list[str]:
    """List what differs between two snapshots, in words.

    Args:
        before: Taken before the pass.
        after: Taken after it.

    Returns:
        One phrase per change, empty when nothing changed.
    """
    changes = []
    flags_after = dict(after.modes)
    for name, training in before.modes:
        if name in flags_after and flags_after[name] != training:
            changes.append(f"module {name or '(root)'!r} training flag {training} -> {flags_after[name]}")
    if before.stage != after.stage:
        changes.append(f"trainer stage {before.stage} -> {after.stage}")
    return changes + rng_changes(before.rng, after.rng)


@contextmanager
def watching_modules(module: nn.Module, drew: list[str]) -> Iterator[None]:
    """Record, in ``drew``, the modules whose forward draws from a global RNG, innermost first.

    Forward pre-hooks record the RNG states and forward hooks compare them, so a module that draws is found whatever
    it draws (a flip with probability 0.05 draws as surely as one with 0.95): in eval mode no module should draw.

    Args:
        module: The model.
        drew: Receives the qualified names (``""`` for the root) in the order their forwards completed.

    Yields:
        None; the hooks are removed on exit.
    """
    names = {id(submodule): name for name, submodule in module.named_modules()}
    started: list[RngState] = []

    def before(submodule: nn.Module, args: Any) -> None:
        started.append(rng_state())

    def after(submodule: nn.Module, args: Any, output: Any) -> None:
        if started and rng_changes(started.pop(), rng_state()):
            name = names.get(id(submodule), type(submodule).__name__)
            if name not in drew:
                drew.append(name)

    handles = [submodule.register_forward_pre_hook(before) for submodule in module.modules()]
    handles += [submodule.register_forward_hook(after) for submodule in module.modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def watching_batch_hooks(owners: Sequence[Any], drew: list[str]) -> Iterator[None]:
    """Record, in ``drew``, the user's batch-transfer hooks that draw from a global RNG (as ``Class.hook``).

    Each hook a user overrides on the LightningModule or LightningDataModule is shadowed on the instance by a wrapper
    that compares the RNG states around the call; Lightning's dispatch looks hooks up on the instance, so it calls
    the wrapper. The instances are put back as they were on exit.

    Args:
        owners: The LightningDataModule (or None) and the LightningModule.
        drew: Receives ``"<Class>.<hook>"`` for each hook that drew.

    Yields:
        None.
    """
    shadowed: list[tuple[Any, str, Any]] = []
    missing = object()
    try:
        for owner in owners:
            for hook in BATCH_HOOKS:
                if owner is None or not user_overrides(owner, hook):
                    continue
                original = getattr(owner, hook)
                label = f"{type(owner).__name__}.{hook}"

                def watched(*args: Any, _original: Any = original, _label: str = label, **kwargs: Any) -> Any:
                    before = rng_state()
                    result = _original(*args, **kwargs)
                    if rng_changes(before, rng_state()) and _label not in drew:
                        drew.append(_label)
                    return result

                shadowed.append((owner, hook, owner.__dict__.get(hook, missing)))
                setattr(owner, hook, watched)
        yield
    finally:
        for owner, hook, previous in reversed(shadowed):
            if previous is missing:
                delattr(owner, hook)
            else:
                setattr(owner, hook, previous)


#: What a pass calls, named in the messages of the guards inside and after a pass.
_HOOK_CALLS = "on_before_batch_transfer, transfer_batch_to_device, on_after_batch_transfer, forward"
_PASS_CALLS = "on_before_batch_transfer, transfer_batch_to_device, on_after_batch_transfer, the forward"


class GuardPolicy:
    """Acts on the guards' findings as ``guards`` says, and words every guard message.

    ``"raise"``: an ``EvalGuardError``; ``"warn"``: one ``EvalGuardWarning`` per kind of finding, on rank zero;
    ``"off"``: the guards do not run (:attr:`enabled` is False). Under DDP with ``"raise"`` each decision is reduced
    across ranks (``distributed.any_rank``), so every rank raises together: a rank that raised alone would leave the
    others waiting in their next collective.

    Attributes:
        mode: ``"raise"``, ``"warn"`` or ``"off"``.
    """

    def __init__(self, mode: GuardMode, warn: Warn) -> None:
        """Store the mode.

        Args:
            mode: The callback's ``guards`` argument.
            warn: ``(key, message)``: gives a warning once.
        """
        self.mode = mode
        self._warn = warn

    @property
    def enabled(self) -> bool:
        """Whether the guards run (``guards`` is not ``"off"``)."""
        return self.mode != "off"

    def decide(self, trainer: pl.Trainer, kind: str, message: str | None) -> None:
        """Act on one guard's finding; with ``guards="raise"`` under DDP, called on every rank.

        Args:
            trainer: The Trainer.
            kind: The guard, e.g. ``"augmentation"`` (one warning per kind).
            message: What it found, or None when it found nothing.

        Raises:
            EvalGuardError: With ``guards="raise"``, when this or (under DDP) another rank found something.
        """
        if self.mode == "raise" and any_rank(trainer, message is not None) and message is None:
            message = f"EvalGuard's {kind} guard failed on another rank (its error says what it found)."
        if message is None:
            return
        if self.mode == "raise":
            raise EvalGuardError(message + ' Pass guards="warn" or guards="off" to EvalGuard to go on anyway.')
        self._warn(f"guard:{kind}", message)

    def shuffle(self, trainer: pl.Trainer, sampler: str | None, where: str) -> None:
        """The fit-start guard: the clean loader's sampler drew random numbers (it shuffles), or not (None).

        Args:
            trainer: The Trainer.
            sampler: The type name of the sampler that drew.
            where: The source, e.g. ``" training loader 'a'"`` (``""`` for a single loader).

        Raises:
            EvalGuardError: As :meth:`decide`.
        """
        message = None
        if sampler is not None:
            message = (
                f"EvalGuard's clean loader{where} shuffles: its sampler ({sampler}) draws random numbers for a new"
                " order at every pass, so a pass would not read the same batches twice and it changes the random"
                " state it is given. Pass a loader with shuffle=False (a SequentialSampler, or under DDP an"
                " UnrepeatedDistributedSampler with shuffle=False), or leave out `dataloader=` /"
                " `clean_train_dataloader()` and pass `eval_transform=` so EvalGuard rebuilds a sequential loader."
            )
        self.decide(trainer, "shuffle", message)

    def augmentation(
        self,
        trainer: pl.Trainer,
        found: str | None,
        where: str,
        data_drew: Sequence[str] = (),
        hooks_drew: Sequence[str] = (),
    ) -> None:
        """The fit-start guard: is augmentation still on in the first clean batch?

        It is when producing the batch drew random numbers (``data_drew``: the dataset or ``collate_fn``; whatever
        the probability of a random transform, the draw happens), when a batch hook drew while ``trainer.training``
        is False (``hooks_drew``), or when the batch, drawn twice under different seeds, differs (``found``: e.g. a
        transform with its own generator).

        Args:
            trainer: The Trainer.
            found: How the two draws differ, from :func:`augmentation_difference`, or None.
            where: The source, e.g. ``" training loader 'a'"`` (``""`` for a single loader).
            data_drew: The global RNGs that producing the batch drew from (see :func:`rng_changes`).
            hooks_drew: The batch hooks that drew, as ``"<Class>.<hook>"``.

        Raises:
            EvalGuardError: As :meth:`decide`.
        """
        source = f" of{where}" if where else ""
        message = None
        if hooks_drew:
            message = (
                f"EvalGuard's clean pass is not clean: {hooks_drew[0]} draws random numbers while"
                " `trainer.training` is False, so batch-level augmentation still runs in the clean pass (whatever its"
                " probability, it draws). Gate it on `self.trainer.training`: `if self.trainer.training: ...`."
            )
        elif data_drew:
            message = (
                f"EvalGuard's clean pass is not clean: producing the first clean batch{source} drew from the "
                + " and ".join(change.removesuffix(" state") for change in data_drew)
                + ", so augmentation is still on in the dataset or collate_fn (whatever its probability, it draws)."
                " To switch it off: " + AUGMENTATION_FIXES
            )
        elif found is not None:
            message = (
                f"EvalGuard's clean pass is not clean: the first clean batch{source}, drawn twice under different"
                f" seeds, differs ({found}), so augmentation is still on. To switch it off: " + AUGMENTATION_FIXES
            )
        self.decide(trainer, "augmentation", message)

    def stochastic(
        self, trainer: pl.Trainer, culprit: str | None, pl_module: pl.LightningModule, drew: bool = False
    ) -> None:
        """The fit-start guard: the eval-mode model draws random numbers, or gives different outputs under two seeds.

        Args:
            trainer: The Trainer.
            culprit: The module found (see :func:`stochastic_module`), or None.
            pl_module: The LightningModule.
            drew: Whether the culprit was found drawing from a global RNG (else: by its differing output).

        Raises:
            EvalGuardError: As :meth:`decide`.
        """
        message = None if culprit is None else _stochastic_message(culprit, pl_module, drew)
        self.decide(trainer, "stochastic", message)

    def inside_pass(self, trainer: pl.Trainer, changes: Sequence[str], culprit: str | None = None) -> None:
        """The guard inside a clean pass, before anything is restored: what something the pass called changed.

        Args:
            trainer: The Trainer.
            changes: What :func:`state_changes` found.
            culprit: What a search for the first thing that draws random numbers found (e.g. ``"module 'net.1'
                (Flip)"``), when RNG states changed.

        Raises:
            EvalGuardError: As :meth:`decide`.
        """
        message = None
        if changes:
            message = (
                f"EvalGuard's clean pass after epoch {trainer.current_epoch} was not clean: during it, "
                + "; ".join(changes)
                + f" changed. Something called during the pass ({_PASS_CALLS}, the dataset) switched a module's"
                " mode or drew random numbers."
                + (f" The first that draws random numbers on the first clean batch: {culprit}." if culprit else "")
            )
        self.decide(trainer, "inside", message)

    def after_pass(self, trainer: pl.Trainer, changes: Sequence[str]) -> None:
        """The guard after a pass, once everything was restored: what is still not as it was.

        Args:
            trainer: The Trainer.
            changes: What :func:`state_changes` found.

        Raises:
            EvalGuardError: As :meth:`decide`.
        """
        message = None
        if changes:
            message = (
                f"EvalGuard's clean pass after epoch {trainer.current_epoch} did not leave the run as it found it: "
                + "; ".join(changes)
                + f". A hook called during the pass ({_HOOK_CALLS}) changed it."
            )
        self.decide(trainer, "state", message)


def describe_module(name: str, pl_module: nn.Module) -> str:
    """How messages name a submodule: ``module 'net.1' (Flip)``, or the LightningModule's own forward for ``""``.

    Args:
        name: The qualified name.
        pl_module: The LightningModule.

    Returns:
        The words.
    """
    if name == "":
        return f"the forward of the LightningModule itself ({type(pl_module).__name__}.forward)"
    return f"module {name!r} ({type(pl_module.get_submodule(name)).__name__})"


def _stochastic_message(culprit: str, pl_module: pl.LightningModule, drew: bool) -> str:
    if drew:
        where = (
            "the `forward=` callable passed to EvalGuard (outside every module)"
            if culprit == "forward="
            else describe_module(culprit, pl_module)
        )
        return (
            "EvalGuard's clean pass is not deterministic: in eval mode, the forward on the first clean batch draws"
            f" random numbers, first in {where}. It ignores eval mode (e.g. a random augmentation module such as"
            " kornia's or torchvision.transforms.v2's, F.dropout(x, training=True), or a custom random layer):"
            " make it check `self.training`, or move batch augmentation into on_after_batch_transfer gated on"
            " `self.trainer.training`."
        )
    if culprit == "forward=":
        where = "the `forward=` callable passed to EvalGuard (the randomness is outside every module)"
    else:
        where = describe_module(culprit, pl_module)
    return (
        "EvalGuard's clean pass is not deterministic: in eval mode, the same clean batch gives different outputs"
        f" under different seeds. The first module whose output differs for an identical input is {where}. It"
        " ignores eval mode (e.g. F.dropout(x, training=True), or a custom random layer): make it check"
        " `self.training`."
    )
