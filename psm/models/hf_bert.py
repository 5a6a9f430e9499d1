"""HF transformers BERT checkpoints (`BertModel`, `BertForSequenceClassification`) -> `bert.Bert`.

HF tensor names (prefixed `bert.` inside `BertForSequenceClassification`):

  embeddings.{word,position,token_type}_embeddings.weight -> embed/{...}/embedding
  embeddings.LayerNorm.{weight,bias}                    -> embed/norm/{scale,bias}
  encoder.layer.<i>.attention.self.{query,key,value}.*  -> layers/<i>/attn/{...}/*
  encoder.layer.<i>.attention.output.dense.*            -> layers/<i>/attn/out/*
  encoder.layer.<i>.attention.output.LayerNorm.*        -> layers/<i>/attn_norm/*
  encoder.layer.<i>.intermediate.dense.*                -> layers/<i>/ffn_in/*
  encoder.layer.<i>.output.dense.*                      -> layers/<i>/ffn_out/*
  encoder.layer.<i>.output.LayerNorm.*                  -> layers/<i>/ffn_norm/*
  pooler.dense.*                                        -> pooler/*
  classifier.*                                          -> classifier/*
"""

from __future__ import annotations

import os

from flax import nnx

from psm.models import bert
from psm.models.bert import BertConfig
from psm.models.safetensors_io import SafetensorsCheckpoint, read_json
from psm.models.weights import Path, Slot, load_params

ARCHITECTURES = ("BertModel", "BertForSequenceClassification")
# Buffers and pre-training heads that carry no parameter of ours.
IGNORED = (r"(bert\.)?embeddings\.position_ids", r"cls\..*")


def hf_slots(config: BertConfig, prefix: str = "") -> dict[Path, Slot]:
    """Canonical parameter path -> HF tensor; `prefix` is "bert." for classifiers."""
    p = prefix

    def dense(path, name):
        return {path + ("kernel",): Slot(p + name + ".weight", transpose=True),
                path + ("bias",): Slot(p + name + ".bias")}

    def norm(path, name):
        return {path + ("scale",): Slot(p + name + ".weight"),
                path + ("bias",): Slot(p + name + ".bias")}

    slots: dict[Path, Slot] = {
        ("embed", "word", "embedding"): Slot(p + "embeddings.word_embeddings.weight"),
        ("embed", "position", "embedding"): Slot(p + "embeddings.position_embeddings.weight"),
        ("embed", "token_type", "embedding"): Slot(
            p + "embeddings.token_type_embeddings.weight"),
        **norm(("embed", "norm"), "embeddings.LayerNorm"),
    }
    for i in range(config.num_layers):
        pre = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            slots |= dense(("layers", i, "attn", name), pre + f"attention.self.{name}")
        slots |= dense(("layers", i, "attn", "out"), pre + "attention.output.dense")
        slots |= norm(("layers", i, "attn_norm"), pre + "attention.output.LayerNorm")
        slots |= dense(("layers", i, "ffn_in"), pre + "intermediate.dense")
        slots |= dense(("layers", i, "ffn_out"), pre + "output.dense")
        slots |= norm(("layers", i, "ffn_norm"), pre + "output.LayerNorm")
    if config.add_pooler:
        slots |= dense(("pooler",), "pooler.dense")
    if config.num_labels:
        slots[("classifier", "kernel")] = Slot("classifier.weight", transpose=True)
        slots[("classifier", "bias")] = Slot("classifier.bias")
    return slots


def load_hf_bert(path: str, *, num_labels: int | None = None, problem_type: str | None = None,
                 seed: int = 0, **overrides) -> tuple[BertConfig, nnx.State]:
    """Loads a HF BERT folder (config.json + safetensors).

    Args:
      path: checkpoint folder.
      num_labels, problem_type: ask for a fresh head on a checkpoint that has
        none (fine-tuning a `BertModel` on GLUE); the head is initialised
        from `seed`. A checkpoint's own head must match `num_labels`.
      **overrides: other BertConfig fields (dropout, dtypes).
    Returns:
      `(config, params)`.
    """
    hf = read_json(os.path.join(path, "config.json"))
    archs = hf.get("architectures") or ["BertModel"]
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"{path}/config.json architectures {archs} are not supported here; "
                         f"supported: {list(ARCHITECTURES)}")
    source = SafetensorsCheckpoint(path)
    names = source.names()
    prefix = "bert." if any(n.startswith("bert.") for n in names) else ""
    config = BertConfig.from_hf_config(
        hf, add_pooler=(prefix + "pooler.dense.weight") in names, **overrides)
    has_head = config.num_labels > 0
    if num_labels is not None:
        if has_head and num_labels != config.num_labels:
            raise ValueError(f"{path} has a {config.num_labels}-label head; num_labels="
                             f"{num_labels} was asked for")
        problem = problem_type or ("regression" if num_labels == 1
                                   else "single_label_classification")
        config = config.replace(num_labels=num_labels, problem_type=problem)
    elif problem_type is not None:
        config = config.replace(problem_type=problem_type)
    slots = hf_slots(config, prefix)
    _, abstract = bert.abstract_model(config)
    if config.num_labels and not has_head:
        # A fresh head: load the encoder into a head-less state, then add the head.
        enc_cfg = config.replace(num_labels=0, problem_type="single_label_classification")
        _, enc_abstract = bert.abstract_model(enc_cfg)
        enc = load_params(enc_abstract, hf_slots(enc_cfg, prefix), source, ignore=IGNORED,
                          what=f"BERT model {enc_cfg}")
        head = bert._dense(config.hidden_size, config.num_labels, config, nnx.Rngs(seed))
        pure = nnx.to_pure_dict(enc) | {"classifier": nnx.to_pure_dict(nnx.state(head))}
        nnx.replace_by_pure_dict(abstract, pure)
        return config, abstract
    ignore = IGNORED if config.add_pooler else IGNORED + (r"(bert\.)?pooler\..*",)
    return config, load_params(abstract, slots, source, ignore=ignore,
                               what=f"BERT model {config}")
