"""HF transformers `LlamaForCausalLM` checkpoints <-> `psm.models.llama`.

HF tensor names (`[out, in]` linear weights, transposed into `[in, out]`
kernels here):

  model.embed_tokens.weight                        -> embed/embedding
  model.layers.<i>.input_layernorm.weight          -> layers/<i>/attn_norm/scale
  model.layers.<i>.self_attn.{q,k,v,o}_proj.weight -> layers/<i>/attn/{q,k,v,o}_proj/kernel
  model.layers.<i>.post_attention_layernorm.weight -> layers/<i>/mlp_norm/scale
  model.layers.<i>.mlp.{gate,up,down}_proj.weight  -> layers/<i>/mlp/{gate,up,down}_proj/kernel
  model.norm.weight                                -> final_norm/scale
  lm_head.weight                                   -> lm_head/kernel (untied only)

HF's q/k rows are already in rotate-half order, the convention of
`llama.rotary`, so no permutation is needed (unlike GGUF).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from flax import nnx

from psm.models import llama
from psm.models._fields import DTYPES
from psm.models.llama import LlamaConfig
from psm.models.safetensors_io import (SafetensorsCheckpoint, read_json, save_safetensors,
                                       write_json)
from psm.models.weights import Path, Slot, TensorSource, load_params

ARCHITECTURE = "LlamaForCausalLM"

# Present in some checkpoints, never parameters of ours.
IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


def hf_slots(config: LlamaConfig) -> dict[Path, Slot]:
    """Canonical parameter path -> HF tensor for `config` (list layout)."""
    slots: dict[Path, Slot] = {("embed", "embedding"): Slot("model.embed_tokens.weight"),
                               ("final_norm", "scale"): Slot("model.norm.weight")}
    for i in range(config.num_layers):
        pre = f"model.layers.{i}."
        slots[("layers", i, "attn_norm", "scale")] = Slot(pre + "input_layernorm.weight")
        slots[("layers", i, "mlp_norm", "scale")] = Slot(pre + "post_attention_layernorm.weight")
        for p in ("q", "k", "v", "o"):
            slots[("layers", i, "attn", f"{p}_proj", "kernel")] = Slot(
                pre + f"self_attn.{p}_proj.weight", transpose=True)
        for p in ("gate", "up", "down"):
            slots[("layers", i, "mlp", f"{p}_proj", "kernel")] = Slot(
                pre + f"mlp.{p}_proj.weight", transpose=True)
    if not config.tie_embeddings:
        slots[("lm_head", "kernel")] = Slot("lm_head.weight", transpose=True)
    return slots


def load_llama_tensors(config: LlamaConfig, source: TensorSource,
                       slots: dict[Path, Slot] | None = None,
                       ignore: tuple[str, ...] = IGNORED) -> nnx.State:
    """Streams a tensor source into an `nnx.State` for `Llama(config)` (either layout)."""
    _, abstract = llama.abstract_model(config)
    return load_params(abstract, slots or hf_slots(config), source,
                       stacked_prefix="layers" if config.scan_layers else None,
                       ignore=ignore, what=f"Llama model {config}")


def load_hf_llama(path: str, **overrides) -> tuple[LlamaConfig, nnx.State]:
    """Loads a HF `LlamaForCausalLM` folder (config.json + safetensors).

    Args:
      path: folder with `config.json` and `model.safetensors` or shards.
      **overrides: LlamaConfig fields (dtype, param_dtype, remat, scan_layers...).
    Returns:
      `(config, params)`; params in the layout and dtype `config` asks for.
    """
    hf = read_json(os.path.join(path, "config.json"))
    archs = hf.get("architectures") or [ARCHITECTURE]
    if ARCHITECTURE not in archs:
        raise ValueError(f"{path}/config.json architectures {archs} is not {ARCHITECTURE}")
    config = LlamaConfig.from_hf_config(hf, **overrides)
    ignore = IGNORED
    if config.tie_embeddings:
        # Some tied checkpoints also store the (identical) output matrix.
        ignore = IGNORED + (r"lm_head\.weight",)
    return config, load_llama_tensors(config, SafetensorsCheckpoint(path), ignore=ignore)


def save_hf_llama(out_dir: str, config: LlamaConfig, params, *, tokenizer=None,
                  max_shard_bytes: int = 2 ** 31, dtype: str | None = None,
                  extra_config: dict[str, Any] | None = None) -> list[str]:
    """Writes a folder that `transformers.LlamaForCausalLM.from_pretrained` loads.

    Args:
      out_dir: created if absent.
      params: `nnx.State` or nested dict for `Llama(config)`, either layout.
      tokenizer: optional `psm.models.tokenizer.Tokenizer`; its files and
        special token ids are written too.
      dtype: tensor dtype on disk ("float32", "bfloat16", "float16");
        default the config's param dtype.
    Returns:
      The file names written.
    Raises:
      ValueError: params do not fit `config` (checked before anything is written).
    """
    dtype = dtype or config.param_dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    np_dtype = np.dtype(DTYPES[dtype])
    if tokenizer is not None:
        tokenizer.check_fits(config.vocab_size)
    # Validates names and shapes before writing (raises naming the leaf).
    canonical = llama.state_from_canonical(config.replace(scan_layers=False),
                                           llama.to_canonical(params, config))
    pure = nnx.to_pure_dict(canonical)
    entries = []
    for path, slot in hf_slots(config).items():
        leaf = pure
        for k in path:
            leaf = leaf[k]

        def make(leaf=leaf, slot=slot):
            x = np.asarray(leaf).astype(np_dtype)
            return x.T if slot.transpose else x

        entries.append((slot.name, int(np.prod(leaf.shape)) * np_dtype.itemsize, make))
    entries.sort(key=lambda e: _hf_order(e[0]))
    files = save_safetensors(out_dir, entries, max_shard_bytes=max_shard_bytes,
                             metadata={"format": "pt"})
    ids = {}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
               "pad_token_id": tokenizer.pad_id}
    write_json(os.path.join(out_dir, "config.json"),
               config.to_hf_config(**{**ids, "torch_dtype": dtype, "dtype": dtype,
                                      **(extra_config or {})}))
    files.append("config.json")
    if tokenizer is not None:
        write_json(os.path.join(out_dir, "generation_config.json"),
                   {k: v for k, v in ids.items() if v is not None})
        files.append("generation_config.json")
        files += tokenizer.save(out_dir, model_max_length=config.max_seq_len)
    return files


def _hf_order(name: str):
    """Sorts tensors embeddings, layers in numeric order, then the head."""
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers":
        return (1, int(parts[2]), name)
    return (0 if "embed" in name else 2, 0, name)
