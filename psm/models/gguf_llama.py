"""Llama-family GGUF files (llama.cpp) -> `psm.models.llama` + tokenizer.

The config comes from the `llama.*` metadata keys, the tokenizer from the
`tokenizer.*` keys, and the weights are dequantized with the `gguf` package
(numpy only). GGUF tensor names and their HF counterparts:

  token_embd.weight              model.embed_tokens.weight
  blk.<i>.attn_norm.weight       model.layers.<i>.input_layernorm.weight
  blk.<i>.attn_{q,k,v}.weight    model.layers.<i>.self_attn.{q,k,v}_proj.weight
  blk.<i>.attn_output.weight     model.layers.<i>.self_attn.o_proj.weight
  blk.<i>.ffn_norm.weight        model.layers.<i>.post_attention_layernorm.weight
  blk.<i>.ffn_{gate,up,down}.weight  model.layers.<i>.mlp.{gate,up,down}_proj.weight
  output_norm.weight             model.norm.weight
  output.weight                  lm_head.weight (absent when tied)

llama.cpp applies RoPE to interleaved pairs (x0, x1), (x2, x3), ... while HF
and `llama.rotary` rotate halves (x_j, x_{j + hd/2}). HF's conversion script
therefore permutes the q and k rows of each head,
`w.reshape(n, 2, hd/2, D).swapaxes(1, 2)`; `unpermute_qk` inverts it.
"""

from __future__ import annotations

import errno
import functools
import os
import struct
from typing import Any

import gguf
import numpy as np
from flax import nnx

from psm.models.hf_llama import load_llama_tensors
from psm.models.llama import LlamaConfig
from psm.models.tokenizer import Tokenizer
from psm.models.weights import Path, Slot


@functools.cache
def readable_quant_types() -> frozenset[str]:
    """GGML tensor types that `gguf.quants.dequantize` can read (probed once)."""
    ok = set()
    for t in gguf.GGMLQuantizationType:
        try:
            block, nbytes = gguf.GGML_QUANT_SIZES[t]
            if t in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                raw = np.zeros((block,), np.float32 if t.name == "F32" else np.float16)
            else:
                raw = np.zeros((nbytes,), np.uint8)
            gguf.quants.dequantize(raw, t)
            ok.add(t.name)
        except (NotImplementedError, KeyError, ValueError, TypeError):
            pass
    return frozenset(ok)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverts llama.cpp's q/k row permutation: `[n*hd, D]` interleaved -> rotate-half rows."""
    rows = w.shape[0]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


class GGUFSource:
    """The tensors of a GGUF file, dequantized to float32 one at a time.

    Shapes are reported in HF order (`[out, in]`), the reverse of GGML's.
    """

    def __init__(self, reader: gguf.GGUFReader, where: str):
        self.where = where
        self._tensors = {t.name: t for t in reader.tensors}

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        t = self._tensors[name]
        if t.tensor_type.name not in readable_quant_types():
            raise ValueError(f"{self.where}: tensor {name} has quantization type "
                             f"{t.tensor_type.name}, which this loader cannot dequantize; "
                             f"readable types: {sorted(readable_quant_types())}")
        return tuple(int(d) for d in reversed(t.shape.tolist()))

    def get(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        x = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(x, np.float32).reshape(self.shape(name))


def open_reader(path: str) -> gguf.GGUFReader:
    """`gguf.GGUFReader(path)`, with a missing, non-GGUF or truncated file refused by name.

    The reader itself fails on such files with numpy view or unpacking errors
    that do not say which file or why.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "no such GGUF file", path)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not a GGUF file (for a Hugging Face folder use "
                         "kind 'hf')")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file: it starts with {magic!r}, not b'GGUF'")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, struct.error) as e:
        raise ValueError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: "
                         f"{e})") from e


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """GGUF key -> python value (strings, numbers, lists)."""
    return {k: f.contents() for k, f in reader.fields.items()}


def config_fields(meta: dict[str, Any], where: str, **overrides) -> dict[str, Any]:
    """LlamaConfig fields from `llama.*` keys. Raises ValueError naming an absent key."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{where}: general.architecture is {arch!r}; only 'llama' is supported")

    def need(key):
        if key not in meta:
            raise ValueError(f"{where}: GGUF metadata lacks {key!r}")
        return meta[key]

    heads = int(need("llama.attention.head_count"))
    hidden = int(need("llama.embedding_length"))
    head_dim = meta.get("llama.attention.key_length")
    if head_dim is not None and int(head_dim) == hidden // heads:
        head_dim = None
    if "llama.vocab_size" in meta:
        vocab = int(meta["llama.vocab_size"])
    else:
        vocab = len(need("tokenizer.ggml.tokens"))
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"{where}: llama.rope.scaling.type {scaling!r} is not supported")
    fields = dict(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=int(need("llama.feed_forward_length")),
        num_layers=int(need("llama.block_count")), num_heads=heads,
        num_kv_heads=int(meta.get("llama.attention.head_count_kv", heads)),
        head_dim=None if head_dim is None else int(head_dim),
        rope_theta=float(meta.get("llama.rope.freq_base", 10_000.0)),
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        max_seq_len=int(meta.get("llama.context_length", 2048)))
    # float32 metadata: 1e-5 is stored as 9.99999974738e-06; round to what was meant.
    fields["rms_norm_eps"] = float(np.format_float_positional(
        np.float32(fields["rms_norm_eps"]), unique=True))
    return fields | overrides


def gguf_slots(config: LlamaConfig) -> dict[Path, Slot]:
    """Canonical parameter path -> GGUF tensor (with the q/k row fix)."""
    q_fix = functools.partial(unpermute_qk, n_heads=config.num_heads)
    k_fix = functools.partial(unpermute_qk, n_heads=config.num_kv_heads)
    slots: dict[Path, Slot] = {("embed", "embedding"): Slot("token_embd.weight"),
                               ("final_norm", "scale"): Slot("output_norm.weight")}
    for i in range(config.num_layers):
        pre = f"blk.{i}."
        slots[("layers", i, "attn_norm", "scale")] = Slot(pre + "attn_norm.weight")
        slots[("layers", i, "mlp_norm", "scale")] = Slot(pre + "ffn_norm.weight")
        attn = {"q_proj": ("attn_q", q_fix), "k_proj": ("attn_k", k_fix),
                "v_proj": ("attn_v", None), "o_proj": ("attn_output", None)}
        for ours, (theirs, fix) in attn.items():
            slots[("layers", i, "attn", ours, "kernel")] = Slot(
                pre + theirs + ".weight", transpose=True, fix=fix)
        for p in ("gate", "up", "down"):
            slots[("layers", i, "mlp", f"{p}_proj", "kernel")] = Slot(
                pre + f"ffn_{p}.weight", transpose=True)
    if not config.tie_embeddings:
        slots[("lm_head", "kernel")] = Slot("output.weight", transpose=True)
    return slots


def load_gguf_llama(path: str, **overrides) -> tuple[LlamaConfig, nnx.State, Tokenizer]:
    """Loads a Llama-family GGUF file.

    Args:
      path: the `.gguf` file.
      **overrides: LlamaConfig fields (dtype, param_dtype, remat, scan_layers...).
    Returns:
      `(config, params, tokenizer)`.
    Raises:
      ValueError: not a llama GGUF, a tensor type that cannot be dequantized,
        missing/unexpected tensors, or a tokenizer larger than the embedding.
    """
    reader = open_reader(path)
    meta = read_metadata(reader)
    source = GGUFSource(reader, path)
    fields = config_fields(meta, path, **overrides)
    fields.setdefault("tie_embeddings", "output.weight" not in source.names())
    config = LlamaConfig(**fields)
    tokenizer = Tokenizer.from_gguf_metadata(meta, where=path)
    tokenizer.check_fits(config.vocab_size)
    params = load_llama_tensors(config, source, gguf_slots(config), ignore=())
    return config, params, tokenizer
