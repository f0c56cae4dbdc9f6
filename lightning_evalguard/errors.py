"""The warning and error classes EvalGuard raises, importable without the callback."""

from __future__ import annotations

__all__ = ["EvalGuardError", "EvalGuardWarning"]


class EvalGuardWarning(UserWarning):
    """A set-up that makes EvalGuard's comparison wrong or impossible (given once, on rank zero)."""


class EvalGuardError(RuntimeError):
    """A guard found that the clean pass would not be clean (raised with ``guards="raise"``)."""
