"""Command line: convert a Llama-family model to a HF safetensors folder.

  python -m psm.models.convert --kind smollm2 --out /tmp/smollm2-hf
  python -m psm.models.convert --kind gguf --path model.gguf --out out_dir --dtype bfloat16

The output loads with `transformers.LlamaForCausalLM.from_pretrained(out_dir)`
(tokenizer files included when the source has a tokenizer).
"""

from __future__ import annotations

import argparse

from psm.models.hf_llama import save_hf_llama
from psm.models.llama import LlamaConfig
from psm.models.registry import KINDS, load_pretrained


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kind", required=True, choices=KINDS)
    ap.add_argument("--path", default=None, help="source file or folder")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--max-shard-gb", type=float, default=2.0)
    args = ap.parse_args(argv)
    spec = {"kind": args.kind} | ({"path": args.path} if args.path else {})
    config, params, tokenizer = load_pretrained(spec)
    if not isinstance(config, LlamaConfig):
        raise SystemExit(f"export supports Llama-family models only, got {type(config).__name__}")
    files = save_hf_llama(args.out, config, params, tokenizer=tokenizer, dtype=args.dtype,
                          max_shard_bytes=int(args.max_shard_gb * 2 ** 30))
    print(f"wrote {args.out}: {', '.join(files)}")


if __name__ == "__main__":
    main()
