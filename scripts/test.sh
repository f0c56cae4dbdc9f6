#!/usr/bin/env bash
# Set everything up and run ruff (lint and format), mypy, the strict docs build and the test suite with the docstring
# examples ("no tests ran" fails).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,docs
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/mkdocs build --strict --quiet -d "$(mktemp -d)"
scripts/run_pytest.sh .venv/bin/python
