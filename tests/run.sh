#!/usr/bin/env bash
# The test command (README): set up .venv with the dev extras, lint, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup_env.sh dev
.venv/bin/ruff check .
# 8 host devices: the sharding tests compare 1 vs 8 devices inside one process.
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
