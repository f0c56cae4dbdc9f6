#!/usr/bin/env bash
# Run the test suite against the lowest supported versions (README, "Supported versions") in .venv-lowest.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .venv-lowest
python3 -m venv .venv-lowest
.venv-lowest/bin/python -m pip install --quiet --upgrade pip
.venv-lowest/bin/python -m pip install --quiet "torch==2.13.0"
# tensorboard < 2.21's server imports pkg_resources, which setuptools 81 and newer no longer ship.
.venv-lowest/bin/python -m pip install --quiet \
  "lightning==2.4.0" "pytorch-lightning==2.4.0" "torchmetrics==1.3.0.post0" "tensorboard==2.18.0" "numpy==1.26.4" \
  "setuptools<81"
.venv-lowest/bin/python -m pip install --quiet -e ".[test]" \
  "lightning==2.4.0" "pytorch-lightning==2.4.0" "torchmetrics==1.3.0.post0" "tensorboard==2.18.0" "numpy==1.26.4"
scripts/run_pytest.sh .venv-lowest/bin/python -q
