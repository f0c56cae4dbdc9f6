#!/usr/bin/env bash
# Run pytest with the given interpreter; "no tests ran" (pytest's exit code 5) counts as a failure.
# Usage: scripts/run_pytest.sh PYTHON [pytest arguments...]
set -uo pipefail
python="$1"
shift
"$python" -m pytest -p no:cacheprovider "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
