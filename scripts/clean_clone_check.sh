#!/usr/bin/env bash
# Check the project as a new user (and CI) sees it: a fresh clone beside ../shared, then the
# README's two commands. Usage: bash scripts/clean_clone_check.sh [tests|quickstart|both]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$(dirname "$root")/ci-check"
rm -rf "$dest" && git clone -q "$root" "$dest" && cd "$dest"
what="${1:-both}"
if [[ "$what" != tests ]]; then  # the README's first command, verbatim (the first line of its first bash block)
  first="$(awk '/^```bash/{getline; print; exit}' README.md)"
  time bash -c "$first"
fi
if [[ "$what" != quickstart ]]; then
  time bash .ci/run
fi
