#!/usr/bin/env bash
# Set everything up and run the test suite, ruff and mypy. pytest's "no tests ran" (exit 5) counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,docs
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/mkdocs build --strict --quiet -d "$(mktemp -d)"
set +e
.venv/bin/python -m pytest -p no:cacheprovider
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
