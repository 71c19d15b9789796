#!/usr/bin/env bash
# The test command (README): set up .venv with the dev extras, lint, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup_env.sh dev
.venv/bin/ruff check .
# Two workers (one per core here): XLA compiles on one core while the other runs a test.
# The sharding tests force 8 host devices in their own subprocesses.
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-2}" --durations=15 "$@"
