#!/usr/bin/env bash
# Mutation check of methods/: mutmut mutates a scratch copy of the repository and runs the fast
# method tests ([tool.mutmut] in pyproject.toml) against each mutant; the checkout is not touched.
#
#   scripts/mutation.sh                # all mutants of methods/, then the summary and survivors
#   scripts/mutation.sh 'methods.robust.x_group_step*'   # only these mutants (mutmut's name globs)
#
# Needs the mutation extra: pip install -c constraints.txt -e '.[dev,mutation]'.
# MUTATION_DIR keeps the scratch copy (and mutmut's cache) between runs; PYTHON picks the interpreter.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
work=${MUTATION_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/bench-mutation.XXXXXX")}
mkdir -p "$work"
for path in methods tests bench tasks pyproject.toml; do
  rm -rf "${work:?}/$path"
  cp -r "$repo/$path" "$work/$path"
done
find "$work" -name __pycache__ -prune -exec rm -rf {} +
cd "$work"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
start=$(date +%s)
"$python" -m mutmut run "$@" 2>&1 | tee "$work/mutmut-run.log" | tail -n 5
echo "mutmut run took $(($(date +%s) - start)) s in $work"
"$python" -m mutmut export-cicd-stats >/dev/null
"$python" - <<'PY'
import json

s = json.load(open("mutants/mutmut-cicd-stats.json"))
killed = s["killed"] + s["timeout"] + s.get("caught_by_type_check", 0)
print(f"killed {killed} / {s['total']} mutants ({100 * killed / max(s['total'], 1):.1f} %): {s}")
PY
"$python" -m mutmut results  # the mutants not killed (survived, no tests, suspicious, ...)
