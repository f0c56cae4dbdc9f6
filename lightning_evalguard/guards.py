"""Checks that catch a clean pass that would not be clean: run at fit start, and after every pass.

- ``augmentation_difference``: the first clean batch, drawn twice under different seeds, must be identical;
  otherwise augmentation is still on.
- ``stochastic_module``: the model in eval mode, run twice on that batch under different seeds, must give the
  same output; otherwise a layer ignores eval mode, and forward hooks name the first one.
- ``state_changes``: module flags, the trainer's stage and RNG states must be back after a pass.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from lightning_evalguard.isolation import accelerator_rng_states, seed_accelerator_rngs

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "AUGMENTATION_FIXES",
    "GuardMode",
    "StateSnapshot",
    "augmentation_difference",
    "check_guard_mode",
    "difference",
    "reseed",
    "snapshot",
    "state_changes",
    "stochastic_module",
]

GuardMode = Literal["raise", "warn", "off"]

#: The ways to switch augmentation off, listed in the guard's message.
AUGMENTATION_FIXES = (
    "pass `eval_transform=` (a clean transform, 'val' for the validation dataset's, or torch.nn.Identity()) so"
    " EvalGuard sets it on the training dataset's `transform_attr` for the pass; pass `dataloader=` with a clean"
    " loader; define `clean_train_dataloader()` on your LightningDataModule or LightningModule; and gate batch-level"
    " augmentation in on_before_batch_transfer/on_after_batch_transfer on `self.trainer.training`. A clean loader"
    " must not shuffle either."
)


def check_guard_mode(value: Any) -> GuardMode:
    """Check the ``guards`` argument.

    Args:
        value: The argument.

    Returns:
        The mode.

    Raises:
        ValueError: If it is not one of ``"raise"``, ``"warn"``, ``"off"``.
    """
    if value not in ("raise", "warn", "off"):
        raise ValueError(f"`guards` must be 'raise', 'warn' or 'off' (got {value!r}).")
    return value  # type: ignore[no-any-return]


def reseed(seed: int, generator: torch.Generator | None = None) -> None:
    """Seed the global torch, numpy and Python RNGs, and ``generator`` when given.

    Only the generators that ``isolated_rng`` restores are seeded: torch's CPU generator, and the accelerators' (CUDA
    and XPU once initialised, MPS when available). ``torch.manual_seed`` would also queue a seed for CUDA's lazy
    initialisation when it has not happened yet, which nothing would put back.

    Args:
        seed: The seed.
        generator: A loader's own generator (its worker seeds derive from it).
    """
    torch.default_generator.manual_seed(seed)
    seed_accelerator_rngs(seed)
    np.random.seed(seed)
    random.seed(seed)
    if generator is not None:
        generator.manual_seed(seed)


def difference(first: Any, second: Any, where: str = "batch") -> str | None:
    """Describe the first place where two nested structures differ, or return None when they are the same.

    Floating-point tensors within a relative 1e-5 (absolute 1e-6) of each other count as the same: nondeterministic
    kernels differ in the last bits, randomness does not stay that close.

    Args:
        first: A batch or output (tensors in tuples, lists, dicts, or other comparable objects).
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
class StateSnapshot:
    """What a pass must leave as it found it: module flags, trainer stage, RNG states."""

    modes: tuple[tuple[str, bool], ...]
    stage: Any
    torch_rng: torch.Tensor
    numpy_rng: tuple[Any, ...]
    python_rng: Any
    accelerator_rng: dict[str, list[torch.Tensor]]


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
        torch_rng=torch.get_rng_state(),
        numpy_rng=tuple(np.random.get_state(legacy=True)),
        python_rng=random.getstate(),
        accelerator_rng=accelerator_rng_states(),
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
    if not torch.equal(before.torch_rng, after.torch_rng):
        changes.append("torch CPU RNG state")
    for name in sorted(set(before.accelerator_rng) | set(after.accelerator_rng)):
        first, second = before.accelerator_rng.get(name, []), after.accelerator_rng.get(name, [])
        if len(first) != len(second) or any(not torch.equal(a, b) for a, b in zip(first, second, strict=False)):
            changes.append(f"{name} RNG state")
    if before.numpy_rng[0] != after.numpy_rng[0] or not np.array_equal(before.numpy_rng[1], after.numpy_rng[1]) or (
        before.numpy_rng[2:] != after.numpy_rng[2:]
    ):
        changes.append("numpy RNG state")
    if before.python_rng != after.python_rng:
        changes.append("Python random state")
    return changes
