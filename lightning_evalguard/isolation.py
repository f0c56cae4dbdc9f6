"""Context managers that change one piece of state for the clean pass and put it back in ``finally``.

Each one saves the state on entry, yields, and restores the state on exit even when the body raises, so the
clean pass leaves training exactly as it found it: module modes, buffers, RNG streams, the trainer's stage and
the dataset's transform.
"""

from __future__ import annotations

import copy
import functools
import random
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Subset

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "accelerator_rng_states",
    "seed_accelerator_rngs",
    "preserved_generator",
    "eval_mode",
    "find_attribute_holders",
    "find_generators",
    "isolated_rng",
    "preserved_buffers",
    "preserved_generators",
    "reseed",
    "swapped_attribute",
    "trainer_not_training",
]


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule of ``module`` in eval mode, then restore each submodule's own ``training`` flag.

    The flags are captured per module object, not only at the root, so a BatchNorm that the user froze in eval mode
    inside a model in train mode comes back frozen. Restoring sets ``training`` directly instead of calling
    ``train()``, which would recurse and overwrite the children's flags.

    Args:
        module: The module tree to switch.

    Yields:
        None; the tree is in eval mode inside the block.
    """
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    try:
        module.eval()
        yield
    finally:
        for submodule, training in modes:
            submodule.training = training


def _accelerator_rngs() -> list[tuple[str, Any]]:
    # The accelerator generator families in use: (name, torch submodule). CUDA and XPU only once initialised (before
    # that nothing has drawn from them, and touching them would queue a seed for their lazy initialisation); MPS has
    # no lazy initialisation.
    found: list[tuple[str, Any]] = []
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        found.append(("CUDA", torch.cuda))
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available() and xpu.is_initialized():
        found.append(("XPU", xpu))
    if torch.backends.mps.is_available():
        found.append(("MPS", torch.mps))
    return found


def accelerator_rng_states() -> dict[str, list[torch.Tensor]]:
    """The states of the accelerator generators in use (CUDA and XPU once initialised, MPS when available).

    Returns:
        ``{"CUDA": [state per device], ...}``.
    """
    states: dict[str, list[torch.Tensor]] = {}
    for name, family in _accelerator_rngs():
        states[name] = list(family.get_rng_state_all()) if name != "MPS" else [family.get_rng_state()]
    return states


def seed_accelerator_rngs(seed: int) -> None:
    """Seed the accelerator generators that :func:`accelerator_rng_states` reads (and :func:`isolated_rng` restores).

    Args:
        seed: The seed.
    """
    for name, family in _accelerator_rngs():
        if name == "MPS":
            family.manual_seed(seed)
        else:
            family.manual_seed_all(seed)


def _restore_accelerator_rngs(states: dict[str, list[torch.Tensor]]) -> None:
    families = dict(_accelerator_rngs())
    for name, saved in states.items():
        if name == "MPS":
            families[name].set_rng_state(saved[0])
        else:
            families[name].set_rng_state_all(saved)


@contextmanager
def isolated_rng() -> Iterator[None]:
    """Save the global RNG states (torch CPU, CUDA, XPU, MPS, numpy, Python ``random``) and restore them on exit.

    Unlike ``lightning.pytorch.utilities.seed.isolate_rng`` the states are restored in ``finally``, so they come
    back also when the body raises. CUDA and XPU states are saved only once initialised: before that no generator
    of theirs has been drawn from.

    Yields:
        None.
    """
    torch_state = torch.get_rng_state()
    accelerator_states = accelerator_rng_states()
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        _restore_accelerator_rngs(accelerator_states)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


@contextmanager
def preserved_buffers(module: nn.Module) -> Iterator[None]:
    """Snapshot every buffer of ``module`` and put the snapshot back on exit.

    Both the tensor object registered under each name and its values are restored, so a buffer that the body
    reassigned (``self.count = self.count + 1``) or updated in place (BatchNorm running statistics) is back as it
    was, bit for bit.

    Args:
        module: The module whose buffers (recursively) are preserved.

    Yields:
        None.
    """
    saved: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
    for submodule in module.modules():
        for name, buffer in submodule.named_buffers(recurse=False):
            saved.append((submodule, name, buffer, buffer.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for submodule, name, buffer, values in saved:
                if getattr(submodule, name, None) is not buffer:
                    setattr(submodule, name, buffer)
                buffer.copy_(values)


@contextmanager
def preserved_generator(generator: torch.Generator | None) -> Iterator[None]:
    """Save a ``torch.Generator``'s state (a user loader's own) and put it back on exit; no-op for None.

    Args:
        generator: The generator, or None.

    Yields:
        None.
    """
    if not isinstance(generator, torch.Generator):
        yield
        return
    state = generator.get_state()
    try:
        yield
    finally:
        generator.set_state(state)


@contextmanager
def trainer_not_training(trainer: pl.Trainer) -> Iterator[None]:
    """Make ``trainer.training`` False for the block, then restore the trainer's previous stage.

    Batch-level augmentation written the way Lightning documents it (``if self.trainer.training: ...`` inside
    ``on_after_batch_transfer``) is then skipped. The stage must be restored before anything is logged: while it is
    None, ``LightningModule.log`` raises.

    Args:
        trainer: The running Trainer.

    Yields:
        None.
    """
    previous = trainer.state.stage
    try:
        trainer.training = False
        yield
    finally:
        trainer.state.stage = previous


def find_attribute_holders(dataset: Any, attr: str) -> list[Any]:
    """Find the datasets that hold ``attr``, looking through ``Subset`` and ``ConcatDataset`` wrappers.

    A dataset that has the attribute itself is a holder and is not looked into further.

    Args:
        dataset: The dataset to search.
        attr: The attribute name, e.g. ``"transform"``.

    Returns:
        The holders, each once, in the order they were found.
    """
    holders: list[Any] = []
    seen: set[int] = set()

    def visit(node: Any) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if hasattr(node, attr):
            holders.append(node)
        elif isinstance(node, Subset):
            visit(node.dataset)
        elif isinstance(node, ConcatDataset):
            for child in node.datasets:
                visit(child)

    visit(dataset)
    return holders


@contextmanager
def swapped_attribute(holders: Sequence[Any], attr: str, value: Any) -> Iterator[None]:
    """Set ``attr`` to ``value`` on each holder for the block, then put each holder's own value back.

    Args:
        holders: Objects whose attribute is swapped, e.g. from ``find_attribute_holders``.
        attr: The attribute name.
        value: The value set for the duration of the block.

    Yields:
        None.
    """
    originals = [(holder, getattr(holder, attr)) for holder in holders]
    try:
        for holder in holders:
            setattr(holder, attr, value)
        yield
    finally:
        for holder, original in originals:
            setattr(holder, attr, original)


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


#: Containers longer than this are data (samples, paths, labels), not configuration: the generator search skips them.
_MAX_SEARCHED_ITEMS = 256


def _generator_state(generator: Any) -> tuple[Callable[[], Any], Callable[[Any], Any]] | None:
    # (get, set) of a random generator object's state, or None when ``generator`` is none of the four kinds.
    if isinstance(generator, torch.Generator):
        return generator.get_state, generator.set_state
    if isinstance(generator, np.random.Generator):
        bit_generator = generator.bit_generator
        return lambda: bit_generator.state, lambda state: setattr(bit_generator, "state", state)
    if isinstance(generator, np.random.RandomState):
        return generator.get_state, generator.set_state
    if isinstance(generator, random.Random) and not isinstance(generator, random.SystemRandom):  # that has none
        return generator.getstate, generator.setstate
    return None


def find_generators(*roots: Any) -> list[Any]:
    """The random generators reachable from ``roots``: torch and numpy generators, ``RandomState``, ``random.Random``.

    Augmentation objects may keep their own generator (albumentations' ``A.Compose(..., seed=...)``, a transform
    holding ``np.random.default_rng()``), which restoring the global RNG states does not put back. The search follows
    attributes (``__dict__`` and ``__slots__``), mappings, lists, tuples and sets, ``functools.partial`` arguments, a
    function's closure, defaults and
    the globals it names (``transform=lambda x: aug(image=x)["image"]``), a bound method's object; it skips tensors,
    arrays, strings, numbers, classes and modules, and containers of more than 256 items (data, not configuration).
    In an ``nn.Module`` it follows the submodules and the attributes whose names do not start with ``_``.

    Args:
        *roots: Where to search, e.g. a dataset.

    Returns:
        Each generator once, in the order found.
    """
    found: list[Any] = []
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if id(node) in seen or node is None:
            continue
        seen.add(id(node))
        if _generator_state(node) is not None:
            found.append(node)
            continue
        if isinstance(node, (str, bytes, int, float, complex, bool, torch.Tensor, np.ndarray, type)):
            continue
        if isinstance(node, (types.BuiltinFunctionType, types.BuiltinMethodType)):
            continue
        if isinstance(node, functools.partial):
            stack.extend((node.func, *node.args, *node.keywords.values()))
            continue
        if isinstance(node, Mapping):
            try:  # a lazy mapping (a Hydra DictConfig with a missing value) may raise on reading: not configuration
                if len(node) <= _MAX_SEARCHED_ITEMS:
                    stack.extend(node.values())
            except Exception:
                pass
            continue
        if isinstance(node, (list, tuple, set, frozenset)):
            if len(node) <= _MAX_SEARCHED_ITEMS:
                stack.extend(node)
            continue
        if isinstance(node, types.ModuleType):
            continue
        if isinstance(node, types.MethodType):
            stack.extend((node.__self__, node.__func__))
            continue
        if isinstance(node, types.FunctionType):  # a transform written as a function: what it closes over or names
            for cell in node.__closure__ or ():
                try:
                    stack.append(cell.cell_contents)
                except ValueError:  # an empty cell
                    pass
            stack.extend(node.__globals__[name] for name in node.__code__.co_names if name in node.__globals__)
            stack.extend(node.__defaults__ or ())
            continue
        attributes = getattr(node, "__dict__", None)
        if isinstance(node, nn.Module):  # its submodules and public attributes: not the Trainer, hooks or tensors
            stack.extend(node._modules.values())
            attributes = {key: value for key, value in node.__dict__.items() if not key.startswith("_")}
        if isinstance(attributes, dict):
            stack.extend(attributes.values())
        for cls in type(node).__mro__:
            slots = getattr(cls, "__slots__", ())
            for slot in (slots,) if isinstance(slots, str) else slots:
                try:
                    stack.append(getattr(node, slot, None))
                except Exception:  # a slot read through a descriptor that raises
                    pass
    return found


@contextmanager
def preserved_generators(*roots: Any) -> Iterator[None]:
    """Save the state of every random generator reachable from ``roots`` (see :func:`find_generators`) and put it back.

    So a pass that runs the training transform (pass C, the guards' draws with augmentation still on) leaves an
    augmentation object with its own generator exactly as it found it, and training draws what it would have drawn.

    Args:
        *roots: Where to search, e.g. the dataset a pass reads.

    Yields:
        None.
    """
    saved = []
    for generator in find_generators(*roots):
        get, put = _generator_state(generator)  # type: ignore[misc]
        saved.append((put, copy.deepcopy(get())))
    try:
        yield
    finally:
        for put, state in saved:
            put(state)
