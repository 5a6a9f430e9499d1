"""Decoding throughput: KV cache vs recomputing the prefix, and SmolLM2 on GSM8K.

  python benchmarks/bench_decode.py                  # CPU table, small random model
  python benchmarks/bench_decode.py --gpu-gsm8k \\
      --gsm8k ../shared/data/gsm8k/test.jsonl        # SmolLM2-135M, 256 new tokens

The default mode times `generate_tokens` (KV cache, one token per step)
against `generate_tokens_recompute` (full forward pass over the fixed
`[B, prompt + new]` buffer at every step) at batch 16 and 128 new tokens.
Both are compiled before timing; the figure is new tokens per second.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Run as a script from a checkout: make the `psm` package importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from psm.models import llama  # noqa: E402
from psm.models.decode import (generate_tokens, generate_tokens_recompute,  # noqa: E402
                               left_pad)

SMALL = llama.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688,
                          num_layers=4, num_heads=8, num_kv_heads=2, rope_theta=10_000.0)


def _time(fn, repeats):
    """Best wall time of `repeats` runs after a compile/warm-up run, and the output."""
    out = jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best, np.asarray(out)


def cache_vs_recompute(batch: int, prompt_len: int, new_tokens: int, repeats: int) -> None:
    cfg = SMALL
    graphdef, state = nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, rng.integers(prompt_len // 2, prompt_len + 1))
               .tolist() for _ in range(batch)]
    tokens, segs = left_pad(prompts, prompt_len, pad_id=0)
    args = (graphdef, state, jnp.asarray(tokens), jnp.asarray(segs), jax.random.key(0))
    kw = dict(max_new_tokens=new_tokens, eos_id=-1, pad_id=0)
    rows, outs = [], []
    # The recomputing baseline is slow; one timed run of it is enough.
    for name, fn, reps in (("kv cache", generate_tokens, repeats),
                           ("recompute prefix", generate_tokens_recompute, 1)):
        secs, out = _time(lambda: fn(*args, **kw), reps)
        rows.append((name, secs, batch * new_tokens / secs))
        outs.append(out)
    same = bool((outs[0] == outs[1]).all())
    print(f"model: {llama.count_params(state) / 1e6:.1f}M params "
          f"(d={cfg.hidden_size}, L={cfg.num_layers}, H={cfg.num_heads}, KV={cfg.num_kv_heads}, "
          f"V={cfg.vocab_size}), float32, device: {jax.devices()[0].platform}")
    print(f"batch {batch}, prompt {prompt_len} (left-padded), {new_tokens} new tokens, greedy; "
          f"best of {repeats} runs (cache), 1 run (recompute)")
    print(f"{'method':<18} {'seconds':>9} {'tokens/s':>10} {'speed-up':>9}")
    for name, secs, tps in rows:
        print(f"{name:<18} {secs:>9.3f} {tps:>10.1f} {rows[1][1] / secs:>8.1f}x")
    print(f"identical greedy tokens: {same}")


def _gsm8k_answer(text: str) -> str | None:
    nums = re.findall(r"-?\d[\d,]*\.?\d*", text)
    return nums[-1].replace(",", "").rstrip(".") if nums else None


def gpu_gsm8k(path: str, limit: int | None, batch: int, new_tokens: int, dtype: str) -> None:
    from psm.models.registry import load_pretrained

    t0 = time.perf_counter()
    cfg, params, tok = load_pretrained({"kind": "smollm2", "scan_layers": True,
                                        "dtype": dtype, "param_dtype": dtype})
    graphdef = llama.abstract_model(cfg)[0]
    print(f"loaded SmolLM2-135M ({dtype}) in {time.perf_counter() - t0:.1f}s on "
          f"{jax.devices()[0].device_kind}")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = rows[:limit] if limit else rows
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": r["question"]}],
                                                  add_generation_prompt=True)) for r in rows]
    plen = -(-max(map(len, prompts)) // 64) * 64
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    kw = dict(max_new_tokens=new_tokens, eos_id=tok.eos_id, pad_id=pad)
    outs, gen_secs, compile_secs = [], 0.0, 0.0
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        chunk = chunk + [chunk[-1]] * (batch - len(chunk))  # keep one compiled shape
        tokens, segs = left_pad(chunk, plen, pad)
        t0 = time.perf_counter()
        out = np.asarray(jax.block_until_ready(generate_tokens(
            graphdef, params, jnp.asarray(tokens), jnp.asarray(segs), jax.random.key(i), **kw)))
        if i == 0:  # first batch includes compilation; time a second run of it
            compile_secs = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = np.asarray(jax.block_until_ready(generate_tokens(
                graphdef, params, jnp.asarray(tokens), jnp.asarray(segs), jax.random.key(i),
                **kw)))
        gen_secs += time.perf_counter() - t0
        outs.extend(out[:min(batch, len(prompts) - i)])
    useful = sum(int((row != pad).sum()) for row in outs)
    correct = 0
    for r, row in zip(rows, outs):
        ids = row.tolist()
        ids = ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids
        gold = r["answer"].split("####")[-1].strip().replace(",", "")
        correct += _gsm8k_answer(tok.decode(ids, skip_special_tokens=True)) == gold
    slots = len(outs) * new_tokens
    print(f"{len(rows)} questions, batch {batch}, prompt {plen}, {new_tokens} new tokens")
    print(f"compile + first batch: {compile_secs:.1f}s; generation: {gen_secs:.2f}s")
    print(f"throughput: {slots / gen_secs:.0f} token slots/s, {useful / gen_secs:.0f} "
          f"tokens/s before EOS")
    print(f"exact-match accuracy (last number): {correct}/{len(rows)}")
    print("sample:", repr(tok.decode([t for t in outs[0].tolist() if t != pad])[:300]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=None,
                    help="default 128 (cache vs recompute), 256 (--gpu-gsm8k)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpu-gsm8k", action="store_true")
    ap.add_argument("--gsm8k", default="../shared/data/gsm8k/test.jsonl")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--gsm8k-batch", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    args = ap.parse_args()
    if args.gpu_gsm8k:
        gpu_gsm8k(args.gsm8k, args.limit, args.gsm8k_batch, args.new_tokens or 256, args.dtype)
    else:
        cache_vs_recompute(args.batch, args.prompt_len, args.new_tokens or 128, args.repeats)


if __name__ == "__main__":
    main()
