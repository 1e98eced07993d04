#!/usr/bin/env bash
# The README's GPU figures in one run (../shared/docs/gpu.md): environment, one lexicon cell on the
# device, Llama-3.2-1B-shaped decoding and REBEL / W-REBEL training steps, the 8B ArmoRM shape
# scoring. Each figure runs in its own process under its own timeout, smallest first, and appends
# one JSON line to $OUT/gpu.jsonl (a figure that crashes or times out leaves a line saying so).
#
#   bash ../shared/scripts/gpu-wheels.sh       # here, once: the missing dependencies' wheels in .whl/
#   bash scripts/gpu-check.sh                  # on the GPU machine (installs .whl/ into /tmp/site)
#   OUT=/tmp/gpu-dry bash scripts/gpu-check.sh --device cpu   # dry run: tiny shapes, the local venv
#
# Options: --device cuda|cpu (default cuda); --wheels / --no-wheels: install .whl/ into /tmp/site
# or use the local environment (.venv/bin/python, else python3); default: the wheels, where .whl/
# holds any, on cuda, the local environment on cpu. Output: ${OUT:-/tmp/gpu-out} (gpu.jsonl, one
# .log per figure, the lexicon cell's results).
# Expected under 4 minutes on an H200; the timeouts below sum to under 8.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

device=cuda
wheels=""
while [ $# -gt 0 ]; do
  case $1 in
    --device) device=${2:?--device needs cuda or cpu}; shift 2 ;;
    --wheels) wheels=1; shift ;;
    --no-wheels) wheels=0; shift ;;
    *) echo "usage: bash scripts/gpu-check.sh [--device cuda|cpu] [--wheels|--no-wheels]" >&2; exit 2 ;;
  esac
done
[ -n "$wheels" ] || wheels=$([ "$device" = cuda ] && echo 1 || echo 0)
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out" && touch "$out/gpu.jsonl" || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export BENCH_CACHE_DIR=${BENCH_CACHE_DIR:-/tmp/gpu-check-cache}  # the lexicon preset, built once

if [ "$wheels" = 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  python=${PYTHON:-python3}
  "$python" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else  # no carried wheels: the local environment (the dry run)
  python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
  export PYTHONPATH=$PWD
fi

echo "== $(date -u +%FT%TZ) $(hostname) device=$device out=$out python=$python"
command -v nvidia-smi >/dev/null && nvidia-smi
"$python" -c 'import sys, torch, transformers
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "cuda available", torch.cuda.is_available())' || exit 1

first=$(($(wc -l <"$out/gpu.jsonl") + 1))  # this run's lines begin here
# figure and its timeout (seconds), smallest first
figures=("env 45" "lexicon-cell 90" "generate 120" "train-step 120" "reward-score 90")
for entry in "${figures[@]}"; do
  read -r figure limit <<<"$entry"
  before=$(wc -l <"$out/gpu.jsonl")
  start=$SECONDS
  timeout -k 10 "$limit" "$python" scripts/gpu_check.py "$figure" --device "$device" --out "$out" \
    </dev/null >"$out/$figure.log" 2>&1
  rc=$?
  after=$(wc -l <"$out/gpu.jsonl")
  echo "== $figure: exit $rc in $((SECONDS - start)) s (log: $out/$figure.log)"
  if [ "$after" = "$before" ]; then  # killed before it could write its line
    why=$([ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "timed out after ${limit} s" || echo "exit $rc")
    printf '{"figure": "%s", "error": "%s", "device": "%s"}\n' "$figure" "$why" "$device" >>"$out/gpu.jsonl"
  fi
  [ "$rc" = 0 ] || tail -n 15 "$out/$figure.log"
done
echo "== $out/gpu.jsonl (this run)"
tail -n +"$first" "$out/gpu.jsonl"
