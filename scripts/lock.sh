#!/usr/bin/env bash
# Rewrite constraints.txt from the current environment: torch stays at its CPU pin, every other
# installed package at its exact version (the README's figures are measured with these).
#   .venv/bin/pip install -U <what you upgrade> && scripts/lock.sh && git diff constraints.txt
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
torch=$(grep '^torch==' "$repo/constraints.txt")
{
  echo "# The exact versions bench's figures were measured with (README). torch is the CPU build on disk."
  echo "# Refresh both (after upgrading on purpose): scripts/lock.sh, then re-measure what the README quotes."
  echo "$torch"
  "$python" -m pip freeze --exclude-editable | grep -v '^torch==' | grep -iv '^bench'
} > "$repo/constraints.txt.new"
mv "$repo/constraints.txt.new" "$repo/constraints.txt"
