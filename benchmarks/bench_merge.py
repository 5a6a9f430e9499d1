"""Throughput of `psm.merge` against a plain numpy copy of the same bytes.

Builds K models (K separate trees, as a trainer that saved K replicas would hold
them) of `--params` float32 parameters in `--leaves` leaves plus a base, and
times every merge method. For each method it prints the achieved bandwidth
(bytes of inputs read + output written, per second), that bandwidth as a share
of a numpy copy moving the same number of bytes (read + write; `np.copyto` into
preallocated arrays) measured in the same run, the time relative to `average`,
each call's peak memory above the memory before it (to show merging never
stacks the K trees into a `[K, ...]` copy), and the target share.

    python benchmarks/bench_merge.py                 # K = 4 x 50M params, 16 leaves
    python benchmarks/bench_merge.py --params=5e6    # quick smoke run
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import sys
import time

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from psm import merge as M  # noqa: E402

_MB = 1 << 20


def _rss_mb() -> float:
    """Peak resident set size so far (resource.getrusage), MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / _MB


def _malloc_trim() -> None:
    """Returns freed heap memory to the OS (glibc), where available."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Resets the peak RSS to the current RSS (Linux clear_refs); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _make_models(n_params: int, n_leaves: int, k: int, unchanged: float):
    """Base and K fine-tuned trees; a fraction `unchanged` of each delta is exactly 0."""
    per = n_params // n_leaves
    cols = 1024
    rows = max(1, per // cols)
    base, models = {}, [dict() for _ in range(k)]
    key = jax.random.key(0)
    gen = jax.jit(lambda kk, b: b + jnp.where(
        jax.random.uniform(jax.random.fold_in(kk, 1), b.shape) < unchanged, 0.0,
        1e-2 * jax.random.normal(kk, b.shape)))
    for j in range(n_leaves):
        name = f"layers/{j}/kernel"
        b = jax.random.normal(jax.random.fold_in(key, j), (rows, cols), jnp.float32)
        base[name] = b
        for i in range(k):
            models[i][name] = gen(jax.random.fold_in(key, 1000 * (i + 1) + j), b)
    jax.block_until_ready((base, models))
    return base, models


def _time_once(fn) -> float:
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - t0


def _copy_sources(leaves, nbytes: int) -> list:
    """Host arrays (the base's leaves, cycled) whose copy moves nbytes (read + write)."""
    out, total = [], 0
    while total < nbytes // 2:
        for leaf in leaves:
            if total >= nbytes // 2:
                break
            out.append(leaf)
            total += leaf.nbytes
    return out


def _copy_time(sources, dests) -> float:
    """Seconds of np.copyto of every source into preallocated arrays (best of two)."""
    best = np.inf
    for _ in range(2):
        t0 = time.perf_counter()
        for src, dst in zip(sources, dests):
            np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=5e7, help="parameters per model")
    ap.add_argument("--leaves", type=int, default=16)
    ap.add_argument("--k", type=int, default=4, help="number of models")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--unchanged", type=float, default=0.3,
                    help="fraction of each task vector that is exactly 0")
    args = ap.parse_args()
    k, key = args.k, jax.random.key(1)
    base, models = _make_models(int(args.params), args.leaves, k, args.unchanged)
    model_bytes = sum(x.nbytes for x in base.values())
    rss_inputs = _rss_mb()
    n_actual = model_bytes // 4
    print(f"K = {k} models x {n_actual / 1e6:.1f}M float32 params in {args.leaves} leaves "
          f"(+ base), {jax.device_count()} device(s): {jax.devices()[0].device_kind}")

    cases = [
        ("average", lambda: M.average(models), k, 0.60),
        ("select", lambda: M.select(models, key=key), k, 0.60),
        ("select resample=3", lambda: M.select(models, key=key, base=base, resample=3),
         k + 1, 0.60),
        ("select resample=100", lambda: M.select(models, key=key, base=base, resample=100),
         k + 1, None),
        ("task_arithmetic", lambda: M.task_arithmetic(models, base, 0.5), k + 1, 0.60),
        ("ties density=0.2", lambda: M.ties(models, base, 0.2), k + 1, 0.25),
        ("ties trim=model", lambda: M.ties(models, base, 0.2, trim="model"), k + 1, None),
        ("dare p=0.5", lambda: M.dare(models, base, 0.5, key=key), k + 1, 0.60),
        ("dare p=0.5 ties+l1", lambda: M.dare(models, base, 0.5, key=key, rescale="l1",
                                              combine="ties"), k + 1, None),
    ]
    # Memory: one call of each method after a reset of the peak RSS; the extra
    # peak over the RSS before the call is the merge's working memory.
    for name, fn, _, _ in cases:
        jax.block_until_ready(fn())  # compile + warm up
    extra = {}
    for name, fn, _, _ in cases:
        _malloc_trim()  # give freed heap back, so reuse of it does not hide usage
        before = _current_rss_mb()
        if not _reset_peak_rss():
            extra[name] = float("nan")
            continue
        out = fn()
        jax.block_until_ready(out)
        del out
        extra[name] = _rss_mb() - before
    # Time: rounds interleave every method with copies of the same bytes; the
    # minimum over rounds filters out interference from other processes.
    host_leaves = [np.asarray(x) for x in base.values()]
    best = {name: [np.inf, np.inf] for name, *_ in cases}
    for _ in range(args.repeats):
        for name, fn, n_in, _ in cases:
            sources = _copy_sources(host_leaves, (n_in + 1) * model_bytes)
            dests = [np.empty_like(x) for x in sources]
            t_copy = _copy_time(sources, dests)
            del dests
            t = _time_once(fn)
            best[name] = [min(best[name][0], t), min(best[name][1], t_copy)]
    t_avg = best["average"][0]
    print(f"{'method':<21}{'time s':>8}{'GB/s':>7}{'copy GB/s':>10}{'% copy':>8}"
          f"{'x avg':>7}{'+MB':>6}{'target':>8}  ok")
    for name, _, n_in, target in cases:
        t, t_copy = best[name]
        nbytes = (n_in + 1) * model_bytes
        bw, bw_copy = nbytes / t, nbytes / t_copy
        share = bw / bw_copy
        tgt = f">={100 * target:.0f}%" if target else "-"
        ok = "-" if target is None else ("yes" if share >= target else "NO")
        if name == "select resample=3":
            ok += (" / yes" if t / t_avg <= 1.2 else " / NO") + " (<= 1.2x avg)"
        print(f"{name:<21}{t:>8.4f}{bw / 1e9:>7.2f}{bw_copy / 1e9:>10.2f}{100 * share:>7.0f}%"
              f"{t / t_avg:>7.2f}{extra[name]:>6.0f}{tgt:>8}  {ok}")
    print("GB/s = (bytes of inputs read + output written) / time; copy = np.copyto of the "
          "same number of bytes\n(read + write) into preallocated arrays, measured "
          "interleaved with each method; best of --repeats rounds.\n"
          "+MB = peak RSS of one call above the RSS before it (the merged model is "
          f"{model_bytes / _MB:.0f} MB).")
    print(f"model size {model_bytes / _MB:.0f} MB; inputs (K models + base) "
          f"{(k + 1) * model_bytes / _MB:.0f} MB; a stacked [K, ...] copy of the models "
          f"would add {k * model_bytes / _MB:.0f} MB")
    print(f"process peak RSS: {rss_inputs:.0f} MB after building the inputs, "
          f"{_rss_mb():.0f} MB at the end (includes the copy benchmark's buffers)")

if __name__ == "__main__":
    main()
