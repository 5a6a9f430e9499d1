"""Throughput of `psm.merge` against a plain numpy copy of the same bytes.

Builds K models (K separate trees, as a trainer that saved K replicas would hold
them) of `--params` float32 parameters in `--leaves` leaves plus a base, and
times every merge method. For each method it prints the achieved bandwidth
(bytes of inputs read + output written, per second) and that bandwidth as a
share of two numpy copies moving the same number of bytes (read + write),
measured interleaved with the method in every round:

- `np.copyto` into preallocated, already-touched arrays: pure memory bandwidth,
  the strictest baseline (a merge must produce a fresh output, this copy does
  not); the `ok` verdict uses it;
- an allocating `x.copy()`: produces fresh output like a merge does, so it pays
  the same first-touch cost (page faults) for its result.

It also prints the time relative to `average`, the cores a call kept busy (CPU
time over wall time: on a small machine a merge is CPU-bound as much as
bandwidth-bound), the minor page faults per call, each call's peak memory above
the memory before it (merging never stacks the K trees into a `[K, ...]` copy),
and the target share.

Memory comes from glibc's default allocator, as in any process: a result may
reuse pages that an earlier call freed (see the faults column). `--fresh-pages`
instead serves every allocation of 1 MiB or more with its own mmap, so each
result (and each allocating copy) gets fresh pages as in a one-off merge; it
also makes large host temporaries (TIES) fault every time, which a normal
process would recycle.

    python benchmarks/bench_merge.py                 # K = 4 x 50M params, 16 leaves
    python benchmarks/bench_merge.py --params=5e6    # quick smoke run
    python benchmarks/bench_merge.py --numpy-inputs  # + rows for numpy input trees
    python benchmarks/bench_merge.py --params=5e6 --tie-densities=0.2,0.5,0.8

Tie-heavy rows: TIES on task vectors whose entries share few magnitudes, where
whole classes of entries tie with the trim threshold: `ties tie-heavy` (float32
deltas from {0, +-1, ..., +-4} x 2^-7 on a base on a 2^-10 grid: five exact
magnitudes, as quantised deltas) and `ties bf16` (bfloat16 models and base:
Gaussian deltas rounded to the base's spacing, a few dozen magnitudes), next to
`average bf16`, the reference for the bfloat16 row (`x avg` of the bf16 rows is
relative to `average bf16`).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
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


def _hwm_mb() -> float:
    """Peak RSS since the last `_reset_peak_rss` (VmHWM, which clear_refs resets;
    getrusage's ru_maxrss is a lifetime peak that it does not reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _settle() -> None:
    """Lets JAX release host buffers of dropped arrays now (it defers that to the
    next operation or garbage collection), so the memory freed by one call is
    not returned during the next measurement."""
    gc.collect()
    jax.block_until_ready(jax.device_put(np.zeros(1, np.float32)))


def _malloc_trim() -> None:
    """Returns freed heap memory to the OS (glibc), where available."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _fresh_pages_for_large_allocations() -> bool:
    """Makes glibc serve every allocation of 1 MiB or more with its own mmap, so a
    freed result's pages go back to the OS and the next result gets fresh pages.

    By default, whether a merge (or the allocating copy) reuses pages freed by an
    earlier call depends on glibc's dynamic mmap threshold and on the order of
    the calls; reused pages skip the first-touch cost (page faults and zeroing).
    Fresh pages for every result is the case of a one-off merge. False where
    unsupported.
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


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


def _tie_heavy_models(base: dict, models: list, unchanged: float):
    """The float32 models with quantised deltas: base on a 2^-10 grid, deltas from
    {0, +-1, ..., +-4} x 2^-7 (exact in float32: five distinct magnitudes), a
    fraction `unchanged` of them 0."""
    key = jax.random.key(7)
    gen = jax.jit(lambda kk, b: b + jnp.where(
        jax.random.uniform(jax.random.fold_in(kk, 1), b.shape) < unchanged, 0.0,
        jax.random.randint(kk, b.shape, -4, 5).astype(jnp.float32) * 2.0**-7))
    qbase = {n: jnp.round(b * 1024) / 1024 for n, b in base.items()}
    qmodels = [{n: gen(jax.random.fold_in(key, 100 * i + j), qbase[n])
                for j, n in enumerate(m)} for i, m in enumerate(models)]
    jax.block_until_ready((qbase, qmodels))
    return qbase, qmodels


def _bf16_models(base: dict, models: list):
    """bfloat16 copies of the base and the models (Gaussian deltas rounded to the
    base's bfloat16 spacing: many exact magnitude ties)."""
    cast = lambda t: {n: x.astype(jnp.bfloat16) for n, x in t.items()}  # noqa: E731
    out = cast(base), [cast(m) for m in models]
    jax.block_until_ready(out)
    return out


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


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed(fn):
    """(seconds, minor page faults, CPU seconds) of one call of fn, results ready."""
    f0, c0 = _faults(), _cpu_seconds()
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    t = time.perf_counter() - t0
    del out
    return t, _faults() - f0, _cpu_seconds() - c0


def _round(cases, sources, dests, samples) -> None:
    """One timing round: for each case the preallocated copy, the allocating copy
    and the method."""
    for name, fn, _, _ in cases:
        src, rec = sources[name], samples[name]
        _settle()  # the previous result's pages are released here, not in a timing
        rec["copyto"].append(_timed(lambda: [np.copyto(d, x) for d, x in zip(dests, src)])[0])
        t, f, _ = _timed(lambda: [x.copy() for x in src])
        rec["alloc"].append(t)
        rec["afaults"].append(f)
        t, f, c = _timed(fn)
        rec["method"].append(t)
        rec["faults"].append(f)
        rec["cores"].append(c / t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=5e7, help="parameters per model")
    ap.add_argument("--leaves", type=int, default=16)
    ap.add_argument("--k", type=int, default=4, help="number of models")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds")
    ap.add_argument("--unchanged", type=float, default=0.3,
                    help="fraction of each task vector that is exactly 0")
    ap.add_argument("--fresh-pages", action="store_true",
                    help="mmap every allocation >= 1 MiB, so every result gets fresh pages "
                         "(a one-off merge) instead of possibly reusing freed ones")
    ap.add_argument("--numpy-inputs", action="store_true",
                    help="also time average, resampling and TIES on numpy copies of the "
                         "inputs (a separate run: the copies change the process's memory "
                         "state, and with it the other rows)")
    ap.add_argument("--tie-densities", default="0.2",
                    help="comma-separated densities of the tie-heavy and bfloat16 TIES rows "
                         "('' for none)")
    args = ap.parse_args()
    tie_densities = [float(d) for d in args.tie_densities.split(",") if d.strip()]
    fresh = args.fresh_pages and _fresh_pages_for_large_allocations()
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
    # Tie-heavy task vectors (see the module doc); no target, compare `x avg`
    # with the `ties density=0.2` row.
    bytes_per = {}  # case -> bytes of one model, where not float32
    if tie_densities:
        q_base, q_models = _tie_heavy_models(base, models, args.unchanged)
        h_base, h_models = _bf16_models(base, models)
        cases.append(("average bf16", lambda: M.average(h_models), k, None))
        for d in tie_densities:
            cases += [
                (f"ties tie-heavy d={d:g}", lambda d=d: M.ties(q_models, q_base, d), k + 1,
                 None),
                (f"ties bf16 d={d:g}", lambda d=d: M.ties(h_models, h_base, d), k + 1, None),
            ]
        bytes_per = {name: model_bytes // 2 for name, *_ in cases if "bf16" in name}
    if args.numpy_inputs:
        # The same models as numpy arrays, as a checkpoint loader returns them
        # (fresh arrays: not 64-byte aligned, so XLA cannot use them whole in place).
        np_models = [{name: np.array(x) for name, x in m.items()} for m in models]
        np_base = {name: np.array(x) for name, x in base.items()}
        cases += [
            ("average (numpy in)", lambda: M.average(np_models), k, None),
            ("select r=3 (numpy in)", lambda: M.select(np_models, key=key, base=np_base,
                                                       resample=3), k + 1, None),
            ("ties 0.2 (numpy in)", lambda: M.ties(np_models, np_base, 0.2), k + 1, None),
        ]
    # Memory: one call of each method after a reset of the peak RSS; the extra
    # peak over the RSS before the call is the merge's working memory.
    for name, fn, _, _ in cases:
        jax.block_until_ready(fn())  # compile + warm up
    extra = {}
    for name, fn, _, _ in cases:
        _settle()
        _malloc_trim()  # give freed heap back, so reuse of it does not hide usage
        before = _current_rss_mb()
        if not _reset_peak_rss():
            extra[name] = float("nan")
            continue
        out = fn()
        jax.block_until_ready(out)
        del out
        extra[name] = _hwm_mb() - before
    # Time: every round runs, for each method, the preallocated copy, the
    # allocating copy and the method, so all three see the same machine state;
    # the medians over rounds are reported.
    host_leaves = [np.asarray(x) for x in base.values()]
    samples = {name: {"method": [], "copyto": [], "alloc": [], "faults": [], "afaults": [],
                      "cores": []}
               for name, *_ in cases}
    sources = {name: _copy_sources(host_leaves, (n_in + 1) * bytes_per.get(name, model_bytes))
               for name, _, n_in, _ in cases}
    longest = max(sources.values(), key=len)
    dests = [np.ones_like(x) for x in longest]  # preallocated and touched once
    load_before = os.getloadavg()
    # Methods with a target form one set of interleaved rounds and the extra
    # variants another, so that a variant's memory churn (e.g. the `[2, K, ...]`
    # L1 buffers of DARE l1, which fragment memory and make the next huge-page
    # faults compact memory) does not land on the first target method of a round.
    # The tie-heavy rows join the first set, so that they interleave with the
    # distinct-magnitude TIES row they are compared with.
    tied = [c for c in cases if c[0] in bytes_per or c[0].startswith("ties tie-heavy")]
    groups = [[c for c in cases if c[3] is not None] + tied,
              [c for c in cases if c[3] is None and c not in tied]]
    for group in groups:
        for _ in range(args.repeats):
            _round(group, sources, dests, samples)
    med = {name: {k: float(np.median(v)) for k, v in rec.items()} for name, rec in samples.items()}
    t_avg = med["average"]["method"]
    t_ref = {name: med["average bf16"]["method"] if name in bytes_per else t_avg
             for name in med}
    print(f"load average before timing: {' '.join(f'{x:.2f}' for x in load_before)}; after: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    print(f"{'method':<21}{'time s':>8}{'GB/s':>7}{'copyto':>8}{'%':>5}{'alloc':>7}{'%':>6}"
          f"{'x avg':>7}{'cores':>6}{'faults':>8}{'+MB':>6}{'target':>8}  ok (copyto / alloc)")
    for name, _, n_in, target in cases:
        m = med[name]
        nbytes = (n_in + 1) * bytes_per.get(name, model_bytes)
        bw = nbytes / m["method"]
        bw_copyto, bw_alloc = nbytes / m["copyto"], nbytes / m["alloc"]
        share, share_alloc = bw / bw_copyto, bw / bw_alloc
        tgt = f">={100 * target:.0f}%" if target else "-"
        if target is None:
            ok = "-"
        else:
            ok = (f"{'yes' if share >= target else 'NO'} / "
                  f"{'yes' if share_alloc >= target else 'NO'}")
        if name == "select resample=3":
            ok += f"; {'yes' if m['method'] / t_avg <= 1.2 else 'NO'} (<= 1.2x avg)"
        print(f"{name:<21}{m['method']:>8.4f}{bw / 1e9:>7.2f}{bw_copyto / 1e9:>8.2f}"
              f"{100 * share:>4.0f}%{bw_alloc / 1e9:>7.2f}{100 * share_alloc:>5.0f}%"
              f"{m['method'] / t_ref[name]:>7.2f}{m['cores']:>6.2f}{m['faults']:>8.0f}"
              f"{extra[name]:>6.0f}{tgt:>8}  {ok}")
    afaults = float(np.median([v for rec in samples.values() for v in rec["afaults"]]))
    print(f"Medians of {args.repeats} interleaved rounds. GB/s = (bytes of inputs read + "
          "output written) / time.")
    print("copyto GB/s: np.copyto of the same number of bytes (read + write) into "
          "preallocated, touched arrays\n(no page faults); the % next to it decides 'ok'. "
          "alloc GB/s: x.copy() of the same bytes, a fresh\nresult like a merge's (median "
          f"{afaults:.0f} page faults per copy; numpy advises huge pages for large arrays).\n"
          + ("Allocations >= 1 MiB are mmap'd (mallopt), so every result gets fresh pages, as "
             "in a one-off merge (--fresh-pages)." if fresh else "glibc's default allocation: "
             "a result may reuse pages freed by earlier calls (see faults)."))
    print("cores = CPU time (user + system, all threads) / wall time of a merge call: "
          "how many cores it kept busy.")
    print("faults = minor page faults per merge call. +MB = peak RSS of one call above the "
          f"RSS before it (the merged\nmodel is {model_bytes / _MB:.0f} MB).")
    print(f"model size {model_bytes / _MB:.0f} MB; inputs (K models + base) "
          f"{(k + 1) * model_bytes / _MB:.0f} MB; a stacked [K, ...] copy of the models "
          f"would add {k * model_bytes / _MB:.0f} MB")
    if args.numpy_inputs:
        print("(numpy in): the same inputs as fresh numpy arrays (a second copy, so the "
              "process holds both).")
    print(f"process peak RSS: {rss_inputs:.0f} MB after building the inputs, "
          f"{_rss_mb():.0f} MB at the end (includes the copy benchmark's buffers)")


if __name__ == "__main__":
    main()
