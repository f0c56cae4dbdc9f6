"""The warning and error classes EvalGuard raises (importable without the callback), and notes on errors passed on."""

from __future__ import annotations

import sys

__all__ = ["EvalGuardError", "EvalGuardWarning", "add_note"]


class EvalGuardWarning(UserWarning):
    """A set-up that makes EvalGuard's comparison wrong or impossible (given once, on rank zero)."""


class EvalGuardError(RuntimeError):
    """A guard found that the clean pass would not be clean (raised with ``guards="raise"``)."""


def add_note(exc: BaseException, note: str) -> None:
    """Add ``note`` to ``exc`` (``BaseException.add_note`` from Python 3.11; ``__notes__`` before).

    Args:
        exc: The exception passed on unchanged otherwise.
        note: The note.
    """
    if sys.version_info >= (3, 11):
        exc.add_note(note)
    else:  # pragma: no cover - Python 3.10
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]
