"""Streaming merge (`python -m psm.merge`) against mergekit on HF Llama checkpoints.

Writes (once, cached in --workdir) a base and three fine-tuned Llama
checkpoints in HF format (float32 safetensors written from numpy, a
`LlamaForCausalLM` config.json), about 120M parameters (~480 MB) each by
default. Then runs, each as its own process (wall time from start to exit,
imports included; peak RSS of that process from `os.wait4` in a small launcher
process, see `timed`):

- psm `average` and mergekit `linear` (weights 1/3);
- psm `ties` and mergekit `ties` (density 0.2, weight 1, normalize, lambda 1);
- psm `select --resample=3` (no mergekit counterpart);

and prints one table with the ratios against the targets (psm wall time <=
0.33x mergekit for linear, <= 0.1x for ties; peak RSS <= 0.5x) and the largest
absolute difference between the two outputs. The machine load (os.getloadavg)
before and after is printed with the table: timings on a busy machine are
slower for both tools.

    python benchmarks/bench_merge_stream.py                  # ~120M params per model
    python benchmarks/bench_merge_stream.py --quick          # 2 layers, small vocab
    python benchmarks/bench_merge_stream.py --layers=4 --skip-mergekit
    python benchmarks/bench_merge_stream.py --repeats=3      # fastest of 3 (busy machines)
    python benchmarks/bench_merge_stream.py --compile-cache=off  # every run compiles

psm's compilation cache: with `--compile-cache=warm` (default) the psm
commands use a fresh JAX persistent compilation cache in `<workdir>/jax_cache`,
filled by one untimed run of each command, so the timed runs are reruns on
checkpoints of a known architecture (the command's default: its cache lives in
~/.cache/psm/jax); `off` passes `--no-compile-cache`, so every timed run
compiles its kernels. The cache entries each command wrote (= executables it
compiled) and the entries added by its timed runs (0: nothing recompiled) are
printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from psm.models.llama import LlamaConfig  # noqa: E402


def _hf_names(cfg: LlamaConfig):
    """(name, shape) of every tensor of a HF LlamaForCausalLM, in HF order."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.resolved_head_dim
    out = [("model.embed_tokens.weight", (cfg.vocab_size, d))]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (d,)),
                (p + "self_attn.q_proj.weight", (cfg.num_heads * hd, d)),
                (p + "self_attn.k_proj.weight", (cfg.num_kv_heads * hd, d)),
                (p + "self_attn.v_proj.weight", (cfg.num_kv_heads * hd, d)),
                (p + "self_attn.o_proj.weight", (d, cfg.num_heads * hd)),
                (p + "post_attention_layernorm.weight", (d,)),
                (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                (p + "mlp.down_proj.weight", (d, f))]
    out += [("model.norm.weight", (d,)), ("lm_head.weight", (cfg.vocab_size, d))]
    return out


def make_fixtures(root: str, cfg: LlamaConfig, k: int = 3) -> list[str]:
    """Base + k fine-tuned checkpoints (30% of each delta exactly zero); cached."""
    from safetensors.numpy import save_file
    dirs = [os.path.join(root, "base")] + [os.path.join(root, f"ft{i}") for i in range(k)]
    stamp = os.path.join(root, "fixtures.json")
    want = {"config": cfg.to_dict(), "k": k}
    if os.path.isfile(stamp) and json.load(open(stamp)) == want:
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    for d in dirs:
        os.makedirs(d)
    rng = np.random.default_rng(0)
    tensors = [{} for _ in dirs]
    for name, shape in _hf_names(cfg):
        b = (1.0 + 0.1 * rng.standard_normal(shape, np.float32) if name.endswith("norm.weight")
             else 0.02 * rng.standard_normal(shape, np.float32))
        tensors[0][name] = b
        for i in range(k):
            delta = 2e-3 * rng.standard_normal(shape, np.float32)
            delta[rng.random(shape, np.float32) < 0.3] = 0
            tensors[i + 1][name] = b + delta
    hf = cfg.to_hf_config(torch_dtype="float32", dtype="float32", bos_token_id=1,
                          eos_token_id=2)
    for d, t in zip(dirs, tensors):
        save_file(t, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
    with open(stamp, "w") as f:
        json.dump(want, f)
    return dirs


# Runs the command and reports its exit code, peak RSS (KiB) and wall time. A small
# launcher is needed because Linux carries the peak RSS of the process that spawns a
# child over into the child's own ru_maxrss (the vfork + exec of subprocess), so
# measuring straight from this (large) process would report this process's peak.
_LAUNCHER = """
import json, os, subprocess, sys, time
t = time.perf_counter()
p = subprocess.Popen(sys.argv[2:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
out = p.stdout.read()
_, status, usage = os.wait4(p.pid, 0)
wall = time.perf_counter() - t
with open(sys.argv[1], "w") as f:
    json.dump([os.waitstatus_to_exitcode(status), usage.ru_maxrss, wall,
               out.decode(errors="replace")[-3000:]], f)
"""


def timed(cmd, env=None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, output tail) of one process run to completion."""
    report = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench_ms_{os.getpid()}.json")
    subprocess.run([sys.executable, "-c", _LAUNCHER, report] + list(cmd), env=env, cwd=ROOT,
                   check=True)
    with open(report) as f:
        rc, rss_kib, wall, out = json.load(f)
    os.remove(report)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}):\n{out}")
    return wall, rss_kib / 1024, out


def max_abs_diff(a_dir: str, b_dir: str) -> float:
    """Largest |a - b| over all tensors of two HF folders (read tensor by tensor)."""
    from psm.merge.streaming import HFReader
    a, b = HFReader(a_dir), HFReader(b_dir)
    if set(a.infos) != set(b.infos):
        raise RuntimeError(f"tensor names differ: {sorted(set(a.infos) ^ set(b.infos))[:5]}")
    worst = 0.0
    for name in a.infos:
        worst = max(worst, float(np.max(np.abs(a.read(name).astype(np.float64)
                                               - b.read(name).astype(np.float64)))))
    a.close()
    b.close()
    return worst


def ties_differences(psm_dir: str, mk_dir: str, base_dir: str, model_dirs, density: float):
    """(elements that differ, of all, how many sit on a tie at a model's trim threshold).

    psm keeps exactly k = max(1, int(density * n)) entries per tensor and breaks
    ties in magnitude at the threshold by flat index; mergekit keeps the first k
    of `torch.argsort(|tau|, descending=True)`, whose order among equal
    magnitudes is unspecified. Where the k-th largest |tau| is tied, the two
    may keep different entries.
    """
    from psm.merge.streaming import HFReader
    a, b, base = HFReader(psm_dir), HFReader(mk_dir), HFReader(base_dir)
    models = [HFReader(d) for d in model_dirs]
    differ = total = on_tie = 0
    for name in a.infos:
        x, y = a.read(name), b.read(name)
        total += x.size
        pos = np.flatnonzero(x.reshape(-1) != y.reshape(-1))
        if not len(pos):
            continue
        differ += len(pos)
        bb = base.read(name).reshape(-1)
        tied = np.zeros(len(pos), bool)
        for m in models:
            mag = np.abs(m.read(name).reshape(-1) - bb)
            k = max(1, int(density * mag.size))
            thr = np.partition(mag, mag.size - k)[mag.size - k]
            tied |= (mag[pos] == thr) & (np.count_nonzero(mag == thr) > 1)
        on_tie += int(tied.sum())
    for r in [a, b, base] + models:
        r.close()
    return differ, total, on_tie


def mergekit_yaml(path: str, method: str, models, base, density=None) -> None:
    lines = [f"merge_method: {method}", "dtype: float32", "out_dtype: float32", "models:"]
    for m in models:
        params = {"weight": 1.0} if density is None else {"weight": 1.0, "density": density}
        lines += [f"  - model: {m}", f"    parameters: {json.dumps(params)}"]
    if base is not None:
        lines += [f"base_model: {base}", "parameters: {normalize: true, lambda: 1.0}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="/tmp/psm_bench_merge_stream")
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--quick", action="store_true", help="2 layers, hidden 256, vocab 8000")
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument("--compile-cache", choices=("warm", "off"), default="warm",
                   help="psm runs with a warm persistent compilation cache (default) or none")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every command this many times and report the fastest (the "
                        "machine may be shared: the spread shows the noise)")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.vocab = 2, 256, 688, 8000
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.intermediate, num_layers=args.layers,
                      num_heads=max(1, args.hidden // 64), num_kv_heads=max(1, args.hidden // 64),
                      max_seq_len=2048)
    work = os.path.abspath(args.workdir)
    t = time.perf_counter()
    dirs = make_fixtures(os.path.join(work, "fixtures"), cfg)
    base, models = dirs[0], dirs[1:]
    size = os.path.getsize(os.path.join(base, "model.safetensors"))
    n_params = size // 4
    print(f"fixtures: base + {len(models)} fine-tuned, {n_params / 1e6:.1f}M float32 params "
          f"({size / 1e6:.0f} MB) each, in {work} ({time.perf_counter() - t:.1f} s)")
    load_before = os.getloadavg()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows, diffs, notes = {}, {}, []
    outs = os.path.join(work, "out")
    shutil.rmtree(outs, ignore_errors=True)
    os.makedirs(outs)
    cache_dir = os.path.join(work, "jax_cache")
    shutil.rmtree(cache_dir, ignore_errors=True)
    py = [sys.executable, "-m", "psm.merge", "--models=" + ",".join(models),
          "--no-progress", ("--no-compile-cache" if args.compile_cache == "off"
                            else f"--compile-cache={cache_dir}")]
    # The psm commands end with --out=<dir>; best() clears it before every run.
    runs = [("linear", py + ["--method=average", f"--out={outs}/psm_linear"]),
            ("ties", py + ["--method=ties", f"--base={base}", f"--density={args.density}",
                           f"--out={outs}/psm_ties"]),
            ("select (resample=3)", py + ["--method=select", "--resample=3", f"--base={base}",
                                          "--seed=0", f"--out={outs}/psm_select"])]
    def best(cmd, out_dir):
        """(fastest wall time, its peak RSS) over --repeats runs; all times noted."""
        samples = []
        for _ in range(args.repeats):
            shutil.rmtree(out_dir, ignore_errors=True)
            samples.append(timed(cmd, env)[:2])
        if args.repeats > 1:
            notes.append(f"{os.path.basename(out_dir)} wall times: "
                         + ", ".join(f"{w:.2f}" for w, _ in samples))
        return min(samples)

    def entries():
        return len(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else 0

    for label, cmd in runs:
        if args.compile_cache == "warm":  # one untimed run fills the cache
            shutil.rmtree(cmd[-1].split("=", 1)[1], ignore_errors=True)
            before = entries()
            timed(cmd, env)
            filled = entries()
        rows[label] = {"psm": best(cmd, cmd[-1].split("=", 1)[1])}
        if args.compile_cache == "warm":
            notes.append(f"psm {label}: {filled - before} executables compiled and cached by "
                         f"the first run, {entries() - filled} more by the timed runs")
    exe = shutil.which("mergekit-yaml") or os.path.join(os.path.dirname(sys.executable),
                                                         "mergekit-yaml")
    if not args.skip_mergekit and os.path.exists(exe):
        for label, method, mbase, dens in (("linear", "linear", None, None),
                                           ("ties", "ties", base, args.density)):
            yml = os.path.join(outs, f"{method}.yml")
            mergekit_yaml(yml, method, models, mbase, dens)
            rows[label]["mergekit"] = best([exe, yml, f"{outs}/mk_{method}", "--device", "cpu",
                                            "--no-copy-tokenizer", "--quiet"],
                                           f"{outs}/mk_{method}")
            diffs[label] = max_abs_diff(f"{outs}/psm_{method}", f"{outs}/mk_{method}")
        if "ties" in diffs and diffs["ties"] > 0:
            notes.append("ties: %d of %d elements differ, %d of them on a tie at a model's "
                         "trim threshold (psm keeps the lower flat index; mergekit's argsort "
                         "order among equal magnitudes is unspecified)" % ties_differences(
                             f"{outs}/psm_ties", f"{outs}/mk_ties", base, models,
                             args.density))
    elif not args.skip_mergekit:
        print("mergekit-yaml not found: psm rows only")
    load_after = os.getloadavg()

    targets = {"linear": 0.33, "ties": 0.1}
    print(f"\nload average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, "
          f"after {tuple(round(x, 2) for x in load_after)}; {os.cpu_count()} CPUs")
    head = (f"{'method':<20} {'psm s':>7} {'mk s':>7} {'time ratio':>10} {'target':>6} "
            f"{'psm MiB':>8} {'mk MiB':>8} {'RSS ratio':>9} {'target':>6} {'max|psm-mk|':>12}")
    print(head)
    print("-" * len(head))
    for label, r in rows.items():
        ps, pm = r["psm"]
        if "mergekit" in r:
            ms, mm = r["mergekit"]
            ok_t = "met" if ps / ms <= targets[label] else "MISSED"
            ok_m = "met" if pm / mm <= 0.5 else "MISSED"
            print(f"{label:<20} {ps:>7.2f} {ms:>7.2f} {ps / ms:>10.3f} {ok_t:>6} {pm:>8.0f} "
                  f"{mm:>8.0f} {pm / mm:>9.3f} {ok_m:>6} {diffs[label]:>12.2e}")
        else:
            print(f"{label:<20} {ps:>7.2f} {'-':>7} {'-':>10} {'':>6} {pm:>8.0f} {'-':>8} "
                  f"{'-':>9} {'':>6} {'-':>12}")
    for note in notes:
        print(note)
    print("\nwall time: process start to exit (imports included), the fastest of "
          f"{args.repeats} run(s); psm compilation cache: {args.compile_cache}; "
          "RSS: peak resident set of that run's process (os.wait4). "
          "targets: time ratio <= 0.33 (linear), <= 0.1 (ties); "
          "RSS ratio <= 0.5; max|psm-mk| <= 1e-6 for linear.")


if __name__ == "__main__":
    main()
