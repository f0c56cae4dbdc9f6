"""Pytest configuration for the whole repository: what ``--doctest-modules`` does not import."""

# `pytorch_lightning.py` imports the standalone package, which re-routes Lightning's log messages for every later
# test; `__main__.py` is the command line entry point. Neither has a docstring example.
collect_ignore = ["lightning_evalguard/pytorch_lightning.py", "lightning_evalguard/__main__.py"]
