#!/usr/bin/env bash
# Set everything up (.venv, torch==2.13.0 CPU pinned first) and run the digits example; logs go to ./lightning_logs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh examples
.venv/bin/python examples/digits.py "$@"
