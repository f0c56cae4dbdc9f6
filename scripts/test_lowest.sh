#!/usr/bin/env bash
# Run the test suite against the lowest supported versions (README, "Supported versions") in .venv-lowest.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .venv-lowest
python3 -m venv .venv-lowest
.venv-lowest/bin/python -m pip install --quiet --upgrade pip
.venv-lowest/bin/python -m pip install --quiet "torch==2.13.0"
# tensorboard < 2.21's server imports pkg_resources, which setuptools 81 and newer no longer ship.
# The test extra's Hugging Face datasets: 3.6.0 with pyarrow 19 runs on numpy 1.x (datasets 5 needs pyarrow >= 24,
# which needs numpy 2).
lowest=("lightning==2.4.0" "pytorch-lightning==2.4.0" "torchmetrics==1.3.0.post0" "tensorboard==2.18.0" "numpy==1.26.4"
  "datasets==3.6.0" "pyarrow==19.0.1")
.venv-lowest/bin/python -m pip install --quiet "${lowest[@]}" "setuptools<81"
.venv-lowest/bin/python -m pip install --quiet -e ".[test]" "${lowest[@]}"
# ddp_spawn under lightning 2.4.0 with torch 2.13 now and then aborts a worker while tearing down the gloo process
# group ("terminate called without an active exception"), after the fit and every check in it have passed. The
# spawn cases run against the newest versions (scripts/test.sh); here ddp_fork and the launched ddp script cover DDP.
scripts/run_pytest.sh .venv-lowest/bin/python -q -k "not ddp_spawn"
