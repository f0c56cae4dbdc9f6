"""EvalGuard for the standalone ``pytorch_lightning`` package: ``pip install "lightning-evalguard[pytorch-lightning]"``.

``from lightning_evalguard.pytorch_lightning import EvalGuard`` gives a callback that ``pytorch_lightning.Trainer``
accepts (and ``lightning.pytorch.Trainer`` too), whatever the import order. ``lightning_evalguard.EvalGuard`` is
that same class when ``pytorch_lightning`` was imported before ``lightning_evalguard``.
"""

from __future__ import annotations

import pytorch_lightning

from lightning_evalguard.callback import EvalGuard as _EvalGuard

__all__ = ["EvalGuard"]

if issubclass(_EvalGuard, pytorch_lightning.Callback):
    EvalGuard = _EvalGuard
else:

    class EvalGuard(_EvalGuard, pytorch_lightning.Callback):  # type: ignore[misc,no-redef]
        """``lightning_evalguard.EvalGuard``, also a ``pytorch_lightning.Callback``; see its documentation."""
