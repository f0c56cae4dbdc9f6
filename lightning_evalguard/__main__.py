"""``python -m lightning_evalguard report LOGDIR [--png FILE]``: the same command as the ``evalguard`` script."""

from lightning_evalguard.report import main

if __name__ == "__main__":
    raise SystemExit(main())
