"""lightning-evalguard: a clean, side-effect-free measurement of the training set at the end of training epochs."""

from lightning_evalguard.callback import EvalGuard, EvalGuardWarning

__all__ = ["EvalGuard", "EvalGuardWarning"]
__version__ = "0.1.0"
