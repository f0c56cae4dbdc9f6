"""lightning-evalguard: a clean, side-effect-free measurement of the training set at the end of training epochs."""

from lightning_evalguard.callback import EvalGuard
from lightning_evalguard.errors import EvalGuardError, EvalGuardWarning

__all__ = ["EvalGuard", "EvalGuardError", "EvalGuardWarning"]
__version__ = "0.1.0"
