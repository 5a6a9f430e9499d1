"""Training throughput of K replicas: one vmapped step vs K sequential steps.

  python benchmarks/bench_train.py                       # CPU: a few-M-parameter Llama
  python benchmarks/bench_train.py --model=smollm2 --seq=512 --batch=8 --dtype=bfloat16
  python benchmarks/bench_train.py --model=tinyllama --ks=1,2,4 --seq=1024 --batch=4

For each K in --ks the same model (random weights, one AdamW per replica, as
the trainer builds them) is trained two ways on the same `[K, B, T]` batch:

  vmapped     `psm.training.replicas.make_train_step`: the K replicas in one jitted,
              vmapped program (what `psm.train` runs);
  sequential  one jitted single-replica step called K times per step, each
              replica with its own state.

Both are compiled (one untimed step) before --steps timed steps; the figures are
tokens per second summed over the K replicas (all tokens: every position
carries loss here), and MFU where the device's peak bf16 FLOP/s is known
(`psm.training.throughput`; the FLOP count is PaLM's, documented there). The last
column says whether vmap pays: vmapped / sequential tokens per second.

Where `torch` is importable, a reference row trains the same architecture
with one replica in plain PyTorch eager, AdamW in float32, on the same `[B, T]`
batch (benchmarks/_torch_llama.py). A configuration that does not fit in
memory prints its error in place of the numbers.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

# Run as a script from a checkout: make the `psm` package importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from psm.models import llama  # noqa: E402
from psm.training import replicas, throughput  # noqa: E402

MODELS = {
    # ~3.8M parameters (2.8M outside the embeddings): seconds per step on a CPU.
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_layers=4,
                  num_heads=8, num_kv_heads=2, tie_embeddings=True),
    "smollm2": llama.PRESETS["smollm2-135m"],
    "tinyllama": llama.PRESETS["tinyllama-1.1b"],
}


def model_config(name: str, seq: int, dtype: str, param_dtype: str, remat: str = "none",
                 attention: str = "auto") -> llama.LlamaConfig:
    if name not in MODELS:
        raise SystemExit(f"--model={name!r}: expected one of {list(MODELS)}")
    fields = dict(MODELS[name], max_seq_len=max(seq, MODELS[name].get("max_seq_len", 0)))
    return llama.LlamaConfig(dtype=dtype, param_dtype=param_dtype, remat=remat,
                             attention=attention, **fields)


def make_batch(cfg, k: int, batch: int, seq: int, seed: int = 0) -> dict:
    """A `[K, B, T]` decoder batch of random tokens, every target carrying loss."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (k, batch, seq + 1), dtype=np.int32)
    shape = (k, batch, seq)
    return {"tokens": tokens[..., :-1], "targets": tokens[..., 1:],
            "loss_mask": np.ones(shape, np.float32), "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), shape).copy()}


def _timed(step_once, steps: int) -> float:
    """Seconds per step over `steps` steps, after one untimed (compiling) step.
    `step_once()` returns arrays to wait for."""
    jax.block_until_ready(step_once())
    t0 = time.perf_counter()
    for _ in range(steps):
        out = step_once()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps


def bench_vmapped(graphdef, base, tx, batch, steps: int, loss_fn=replicas.mean_loss) -> float:
    k = batch["tokens"].shape[0]
    params = replicas.stack(base, k)
    state = {"p": params, "o": replicas.init_opt_state(tx, params)}
    step = replicas.make_train_step(graphdef, tx, loss_fn=loss_fn)
    batch = jax.device_put(batch)

    def once():
        state["p"], state["o"], metrics = step(state["p"], state["o"], batch)
        return metrics

    return _timed(once, steps)


def bench_sequential(graphdef, base, tx, batch, steps: int,
                     loss_fn=replicas.mean_loss) -> float:
    k = batch["tokens"].shape[0]
    step = jax.jit(replicas.make_replica_step(graphdef, tx, loss_fn), donate_argnums=(0, 1))
    copy = functools.partial(jax.tree.map, lambda x: x.copy())
    states = [[copy(base), tx.init(base)] for _ in range(k)]
    batches = [jax.device_put({key: v[i] for key, v in batch.items()}) for i in range(k)]

    def once():
        out = []
        for s, b in zip(states, batches):
            s[0], s[1], metrics = step(s[0], s[1], b)
            out.append(metrics)
        return out

    return _timed(once, steps)


def bench_torch(cfg, batch: int, seq: int, steps: int, threads: int = 0) -> float | None:
    """Seconds per step of the PyTorch reference (None without torch); `threads` > 0
    sets torch's intra-op threads."""
    try:
        import torch
    except ImportError:
        return None
    if threads > 0:
        torch.set_num_threads(threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _torch_llama import train_step_fn
    torch.manual_seed(0)
    _, step = train_step_fn(cfg)
    data = make_batch(cfg, 1, batch, seq)
    tokens = torch.from_numpy(data["tokens"][0]).long()
    targets = torch.from_numpy(data["targets"][0]).long()
    step(tokens, targets)  # warm-up (allocator, kernels)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(tokens, targets)
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small", help=f"one of {list(MODELS)}")
    ap.add_argument("--seq", type=int, default=128, help="tokens per row (T)")
    ap.add_argument("--batch", type=int, default=8, help="rows per replica (B)")
    ap.add_argument("--ks", default="1,2,4,8", help="comma-separated replica counts K")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    ap.add_argument("--dtype", default="float32", help="compute dtype (float32, bfloat16)")
    ap.add_argument("--param-dtype", default="float32", help="parameter dtype")
    ap.add_argument("--remat", default="none", help="config.model.remat: none, full, dots_saveable")
    ap.add_argument("--attention", default="auto", help="config.model.attention: auto, xla, cudnn")
    ap.add_argument("--loss-chunk", type=int, default=0,
                    help="config.train.loss_chunk: positions per loss chunk (0 = whole sequence)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch row")
    # OpenMP spin-waits badly when the cores are oversubscribed (a shared machine): there
    # one thread is much faster than torch's default of one per core.
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch intra-op threads (0 = torch's default)")
    args = ap.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    cfg = model_config(args.model, args.seq, args.dtype, args.param_dtype, args.remat,
                       args.attention)
    loss_fn = replicas.decoder_losses(args.loss_chunk)[0]
    graphdef, base = nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(0)))
    n_params = sum(x.size for x in jax.tree.leaves(base))
    tx, _ = replicas.make_optimizer(learning_rate=1e-4, total_steps=1000, warmup_steps=0,
                                    schedule="constant",
                                    master_weights=args.param_dtype != "float32")
    flops = throughput.llama_flops_per_token(cfg, args.seq)
    peak = throughput.peak_flops()
    kind = jax.devices()[0].device_kind

    def mfu(tok_s):
        return "-" if peak is None or tok_s is None else f"{tok_s * flops / peak:.1%}"

    def fmt(tok_s):
        return "-" if tok_s is None else f"{tok_s:,.0f}"

    print(f"model {args.model}: {n_params / 1e6:.1f}M parameters, {flops / 1e6:.1f} MFLOP "
          f"per token; B={args.batch} T={args.seq} per replica; dtype {args.dtype}, params "
          f"{args.param_dtype}; remat {args.remat}, attention {args.attention}, loss chunk "
          f"{args.loss_chunk or 'off'}; {args.steps} timed steps; device {kind} "
          f"(peak {'unknown' if peak is None else f'{peak:.3g} FLOP/s'})")
    header = ("| K | vmapped tok/s | vmapped MFU | sequential tok/s | sequential MFU | "
              "vmapped / sequential |")
    print(header)
    print("|---|---|---|---|---|---|")
    for k in ks:
        batch = make_batch(cfg, k, args.batch, args.seq)
        tokens = k * args.batch * args.seq
        row = {}
        for name, fn in (("vmapped", bench_vmapped), ("sequential", bench_sequential)):
            try:
                row[name] = tokens / fn(graphdef, base, tx, batch, args.steps, loss_fn)
            except Exception as e:  # e.g. out of device memory at large K: say so, go on
                row[name] = None
                print(f"  K={k} {name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        ratio = ("-" if None in (row["vmapped"], row["sequential"])
                 else f"{row['vmapped'] / row['sequential']:.2f}x")
        print(f"| {k} | {fmt(row['vmapped'])} | {mfu(row['vmapped'])} | "
              f"{fmt(row['sequential'])} | {mfu(row['sequential'])} | {ratio} |", flush=True)
    if not args.no_torch:
        seconds = bench_torch(cfg, args.batch, args.seq, args.steps, args.torch_threads)
        if seconds is not None:
            tok_s = args.batch * args.seq / seconds
            print(f"| 1 (PyTorch eager, AdamW fp32) | - | - | {fmt(tok_s)} | {mfu(tok_s)} | - |")


if __name__ == "__main__":
    main()
