"""Where one training step's time goes: the compiled step's ops grouped by kind.

    python benchmarks/profile_step.py --model=small --seq=256 --batch=4

Traces `--steps` steps of the trainer's vmapped step (`bench_train`'s model and
batch) with `jax.profiler`, maps every executed op of the trace back to its
instruction in the compiled HLO, and prints the op time in four groups:

  matmul          dots / library matmul fusions (XLA:CPU's `__ynn_fusion`, GPU gemms)
  layout copies   copy and transpose fusions that only move data between layouts
  elementwise     the other fusions (norms, activations, masks, Adam)
  softmax/reduce  exponentials, logs and reductions

Op times are summed over threads, so on a multi-core CPU they add up to more
than the wall time of a step; the shares are what to read. The largest
layout copies are listed with their output shapes.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_train  # noqa: E402

from psm.models import llama  # noqa: E402
from psm.training import replicas  # noqa: E402

_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w-]+)\(")


def op_times(trace_dir: str) -> collections.Counter:
    """Total microseconds per event name over the complete ('X') events of the trace."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        raise SystemExit(f"no trace written under {trace_dir}")
    with gzip.open(max(files, key=os.path.getmtime)) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    out = collections.Counter()
    for e in events:
        if e.get("ph") == "X":
            out[e["name"]] += e.get("dur", 0)
    return out


def group_of(name: str, instruction: str) -> str:
    if "__ynn_fusion" in instruction or " dot(" in instruction or "custom-call" in instruction \
            or "gemm" in name:
        return "matmul"
    if name.startswith(("copy", "transpose")) or "_copy" in name:
        return "layout copies"
    if "exponential" in name or "log" in name or "reduce" in instruction:
        return "softmax/reduce"
    return "elementwise"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small", help=f"one of {list(bench_train.MODELS)}")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--top", type=int, default=6, help="largest layout copies to list")
    args = ap.parse_args(argv)
    cfg = bench_train.model_config(args.model, args.seq, args.dtype, "float32")
    graphdef, base = nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(0)))
    tx, _ = replicas.make_optimizer(learning_rate=1e-4, total_steps=1000, warmup_steps=0,
                                    schedule="constant", master_weights=False)
    batch = jax.device_put(bench_train.make_batch(cfg, args.k, args.batch, args.seq))
    params = replicas.stack(base, args.k)
    opt = replicas.init_opt_state(tx, params)
    step = replicas.make_train_step(graphdef, tx)
    hlo = step.lower(params, opt, batch).compile().as_text()
    params, opt, m = step(params, opt, batch)  # compile + warm-up
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for _ in range(args.steps):
            params, opt, m = step(params, opt, batch)
        jax.block_until_ready(m)
        wall = (time.perf_counter() - t0) / args.steps
        jax.profiler.stop_trace()
        times = op_times(trace_dir)
    instructions = {}
    for line in hlo.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            instructions[match.group(1)] = line.strip()
    groups, copies = collections.Counter(), []
    for name, us in times.items():
        if name in instructions:
            g = group_of(name, instructions[name])
            groups[g] += us
            if g == "layout copies":
                copies.append((us, name, instructions[name]))
    total = sum(groups.values())
    if not total:
        raise SystemExit("the trace holds no op of the compiled step (profiler without op "
                         "events on this backend?)")
    tokens = args.k * args.batch * args.seq
    print(f"model {args.model}, K={args.k}, B={args.batch}, T={args.seq}, {args.dtype}, "
          f"{jax.devices()[0].device_kind}: {wall * 1e3:.0f} ms per step (traced), "
          f"{tokens / wall:,.0f} tokens/s")
    print("| group | op ms per step (summed over threads) | share |")
    print("|---|---|---|")
    for g, us in groups.most_common():
        print(f"| {g} | {us / args.steps / 1e3:.1f} | {us / total:.1%} |")
    print("largest layout copies (per step):")
    for us, name, line in sorted(copies, reverse=True)[:args.top]:
        shape = line.split(" = ")[1].split(" ")[0]
        print(f"  {us / args.steps / 1e3:6.2f} ms  {name}  {shape}")


if __name__ == "__main__":
    main()
