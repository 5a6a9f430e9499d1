"""Merging on the accelerator: every method's share of the device's copy bandwidth.

Builds K models and a base of `--params` parameters each (`--dtype`, default
bfloat16, in `--leaves` equal leaves) directly in device memory, and times every
`psm.merge` method on them against a jitted elementwise copy of the same bytes
(`x * s` with a runtime scalar `s`, so XLA cannot elide it: one read and one
write per element). Bandwidth of a method = (inputs read + output written) /
time, with the inputs being the K models (+ the base where the method reads
it); its share = that bandwidth / the copy's. Timings are medians over
`--repeats` interleaved rounds (copy, then each method), results ready
(`block_until_ready`); the first call of each is a compile + warm-up, not timed.

    python benchmarks/bench_merge_device.py                      # the GPU run: K=4 x 1G bf16
    python benchmarks/bench_merge_device.py --params=2e6 --repeats=2   # CPU smoke

The target (on one H200, ~3.26 TB/s copy): every method >= 85% of the copy.
On a CPU the "device" is host memory and the table is only a smoke check.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from psm import merge as M  # noqa: E402

TARGET_SHARE = 0.85


def make_models(n_params: int, leaves: int, k: int, dtype, unchanged: float, seed: int = 0):
    """Base and K fine-tuned-like models, built on the default device.

    Each model is base + a small Gaussian task vector of which a fraction
    `unchanged` is exactly zero (so resampling has draws to redo).

    Returns:
      (base, models): `{"w{i}": [n_params // leaves]}` trees, and a list of K such trees.
    """
    size = n_params // leaves

    @jax.jit
    def one_leaf(key):
        kb, *kd = jax.random.split(key, k + 1)
        base = jax.random.normal(kb, (size,), jnp.float32) * 0.02
        outs = []
        for kk in kd:
            kn, km = jax.random.split(kk)
            delta = jax.random.normal(kn, (size,), jnp.float32) * 1e-3
            keep = jax.random.uniform(km, (size,)) >= unchanged
            outs.append((base + jnp.where(keep, delta, 0.0)).astype(dtype))
        return base.astype(dtype), outs

    base, models = {}, [{} for _ in range(k)]
    for i, key in enumerate(jax.random.split(jax.random.key(seed), leaves)):
        b, ms = one_leaf(key)
        base[f"w{i}"] = b
        for m, x in zip(models, ms):
            m[f"w{i}"] = x
    return jax.block_until_ready((base, models))


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=1e9, help="parameters per model")
    ap.add_argument("--leaves", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--unchanged", type=float, default=0.3,
                    help="fraction of each task vector that is exactly 0")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    k, dtype = args.k, jnp.dtype(args.dtype)
    base, models = make_models(int(args.params), args.leaves, k, dtype, args.unchanged)
    model_bytes = sum(x.nbytes for x in base.values())
    key = jax.random.key(1)
    cases = [  # name, call, models read (the base counts as one)
        ("average", lambda: M.average(models), k),
        ("select", lambda: M.select(models, key=key), k),
        ("select resample=3", lambda: M.select(models, key=key, base=base, resample=3), k + 1),
        ("task_arithmetic", lambda: M.task_arithmetic(models, base, 0.5), k + 1),
        ("ties density=0.2", lambda: M.ties(models, base, 0.2), k + 1),
        ("dare p=0.5", lambda: M.dare(models, base, 0.5, key=key), k + 1),
    ]
    # The copy moves one model's bytes in and out per leaf; it is timed once per
    # round over all leaves and scaled to each method's bytes.
    scale = jax.jit(lambda x, s: x * s)
    one = jnp.asarray(1.0, dtype)
    copy = lambda: [scale(x, one) for x in base.values()]  # noqa: E731
    for _, fn, _ in cases:
        jax.block_until_ready(fn())
    jax.block_until_ready(copy())
    times: dict[str, list[float]] = {name: [] for name, *_ in cases}
    copy_times: list[float] = []
    for _ in range(args.repeats):
        copy_times.append(_seconds(copy))
        for name, fn, _ in cases:
            times[name].append(_seconds(fn))
    copy_bw = 2 * model_bytes / statistics.median(copy_times)
    dev = jax.devices()[0]
    print(f"K = {k} models x {model_bytes / dtype.itemsize / 1e6:,.0f}M {dtype.name} params "
          f"in {args.leaves} leaves (+ base) on {dev.platform}: {dev.device_kind}; "
          f"median of {args.repeats} rounds")
    print(f"copy (x * s, read + write): {copy_bw / 1e9:,.1f} GB/s")
    print(f"| method | ms | GB/s | share of copy | target {TARGET_SHARE:.0%} |")
    print("|---|---|---|---|---|")
    for name, _, reads in cases:
        t = statistics.median(times[name])
        bw = (reads + 1) * model_bytes / t
        share = bw / copy_bw
        print(f"| {name} | {t * 1e3:,.1f} | {bw / 1e9:,.1f} | {share:.2f} | "
              f"{'ok' if share >= TARGET_SHARE else 'below'} |")


if __name__ == "__main__":
    main()
