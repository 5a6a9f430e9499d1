"""`train_and_evaluate(config, workdir)`: K data-order replicas, merged and evaluated.

Phases (each a banner below): checks, task and data, base model, replicas and
mesh, restore, train loop, merge, evaluate, report. Everything random flows
from config seeds; rerunning a config on a workdir resumes from its latest
checkpoint and ends with bit-identical parameters.

Several processes (`psm.training.distributed`) run this same function on
global arrays: each process builds its own batch shards, every process saves
and restores the checkpoints, and the merges, diagnostics and evaluations are
computations on the sharded replicas that every process runs alike (only small
results, such as losses and generated tokens, are read back to the hosts); only
process 0 writes the run's files.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import logging
from flax import nnx
from tqdm import tqdm

from psm import global_arrays, imbalance, merge
from psm.data import orders, packed_batches, paper_tasks, tasks
from psm.evaluation import lm, runner
from psm.models import hf_llama, registry, speed
from psm.models._fields import DTYPES
from psm.training import (base_model, checkpoint, diagnostics, distributed, encoder_task,
                          replicas, report, sharding, throughput)
from psm.training import workdir as wd
from psm.training.metrics import MetricWriter, read_metrics

log = logging.getLogger(__name__)

MERGE_METHODS = report.MERGE_METHODS
REFERENCE_METHODS = report.REFERENCE_ROWS
"""Reference rows beyond the paper (METHOD.md section 5): `best_single` and
`greedy_soup` need the replicas' validation losses; `ensemble` is K models
(it has no single parameter tree, so it cannot be exported)."""
METHODS = MERGE_METHODS + REFERENCE_METHODS


def validate_config(config) -> None:
    """Rejects bad values before any work, naming the config key.

    Everything a run reads is checked here, so that a bad value fails before
    the workdir is written or the base is pre-trained (a rerun with the
    corrected value is then never refused as a different config).
    """
    opt, train, task = config.optim, config.train, config.task
    checks = [
        (config.num_replicas >= 1, "config.num_replicas (K) must be >= 1"),
        (config.merge.resample >= 0, "config.merge.resample must be >= 0"),
        (train.epochs >= 1, "config.train.epochs must be >= 1"),
        (train.batch_size >= 1, "config.train.batch_size must be >= 1"),
        (train.log_every >= 1, "config.train.log_every must be >= 1"),
        (train.eval_every >= 0, "config.train.eval_every must be >= 0 (0 = never)"),
        (isinstance(train.get("packing", False), bool),
         f"config.train.packing must be True or False, got {train.get('packing')!r}"),
        (task.max_len >= 2, "config.task.max_len must be >= 2"),
        (task.num_train >= 0, "config.task.num_train must be >= 0 (0 = all)"),
        (task.num_validation >= 0, "config.task.num_validation must be >= 0"),
        (task.num_test >= 0, "config.task.num_test must be >= 0 (0 = all)"),
        (task.prompt_len >= 1, "config.task.prompt_len must be >= 1"),
        (task.max_new_tokens >= 1, "config.task.max_new_tokens must be >= 1"),
        # A negative learning rate trains by gradient ascent and still exits 0.
        (_positive(opt.learning_rate),
         f"config.optim.learning_rate must be a finite number > 0, got {opt.learning_rate!r}"),
        (opt.warmup_steps >= 0, f"config.optim.warmup_steps must be >= 0, got "
                                f"{opt.warmup_steps!r}"),
        (opt.schedule in SCHEDULES, f"config.optim.schedule must be one of {list(SCHEDULES)}, "
                                    f"got {opt.schedule!r}"),
        (opt.weight_decay >= 0, f"config.optim.weight_decay must be >= 0, got "
                                f"{opt.weight_decay!r}"),
        (0 <= opt.b1 < 1, f"config.optim.b1 must lie in [0, 1), got {opt.b1!r}"),
        (0 <= opt.b2 < 1, f"config.optim.b2 must lie in [0, 1), got {opt.b2!r}"),
        (opt.clip_norm is None or opt.clip_norm >= 0,
         f"config.optim.clip_norm must be >= 0 (0 = off), got {opt.clip_norm!r}"),
        (config.checkpoint.every_steps >= 1, f"config.checkpoint.every_steps must be >= 1, "
                                             f"got {config.checkpoint.every_steps!r}"),
        (config.checkpoint.keep >= 1, f"config.checkpoint.keep must be >= 1, got "
                                      f"{config.checkpoint.keep!r}"),
        (config.eval.batch_size >= 1, f"config.eval.batch_size must be >= 1, got "
                                      f"{config.eval.batch_size!r}"),
        (config.eval.num_bins >= 1, f"config.eval.num_bins must be >= 1, got "
                                    f"{config.eval.num_bins!r}"),
        (not config.export.dtype or config.export.dtype in DTYPES,
         f"config.export.dtype must be '' (the model's) or one of {sorted(DTYPES)}, got "
         f"{config.export.dtype!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    known = sorted(tasks.TASKS) + sorted(paper_tasks.PAPER_TASKS)
    if config.task.name not in known:
        raise ValueError(f"unknown config.task.name {config.task.name!r}; known tasks: {known}")
    unknown = [m for m in config.merge.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"config.merge.methods has unknown methods {unknown}; "
                         f"known: {list(METHODS)}")
    repeated = sorted({m for m in config.merge.methods if config.merge.methods.count(m) > 1})
    if repeated:
        raise ValueError(f"config.merge.methods names {repeated} more than once")
    not_merged = [m for m in config.export.hf if m not in config.merge.methods]
    if not_merged:
        raise ValueError(f"config.export.hf names {not_merged}, which config.merge.methods "
                         f"{tuple(config.merge.methods)} does not produce")
    if "ensemble" in config.export.hf:
        raise ValueError("config.export.hf names 'ensemble': the ensemble is K models, "
                         "not one parameter tree, and cannot be exported")
    _check_merge_options(config)
    if config.eval.barrier:
        try:
            diagnostics.check_grid(config.eval.barrier_grid)
        except ValueError as e:
            raise ValueError(f"config.eval.barrier_grid: {e}") from None
    if config.eval.barrier_models_per_pass < 0:
        raise ValueError("config.eval.barrier_models_per_pass must be >= 0 (0 = K + 1)")
    if config.model.init not in base_model.INITS:
        raise ValueError(f"config.model.init={config.model.init!r}; expected one of "
                         f"{list(base_model.INITS)}")
    if (config.task.name in paper_tasks.PAPER_TASKS) == (config.model.init == "pretrain"):
        raise ValueError(f"config.task.name={config.task.name!r} with config.model.init="
                         f"{config.model.init!r}: the synthetic task pre-trains its own base "
                         "('pretrain'); the paper's tasks need a tokenizer from a real model "
                         "('pretrained' or 'random')")
    if encoder_task.is_encoder(config):  # config.task.head: a BERT encoder with a head
        encoder_task.validate_config(config)
    elif config.model.kind == "minilm":
        raise ValueError("config.model.kind='minilm' is a BERT encoder, not a decoder: use "
                         "configs/glue_bert.py (config.task.head 'classification' or "
                         "'regression')")
    else:
        _validate_model(config)
        if config.task.get("pad_to_multiple", 0):
            raise ValueError(f"config.task.pad_to_multiple={config.task.pad_to_multiple} cuts "
                             "the padding of BERT batches (config.task.head 'classification' "
                             "or 'regression'); decoder rows save padding with "
                             "config.train.packing: set config.task.pad_to_multiple=0")
    # The mesh is built from the visible devices; building it here costs nothing
    # and fails (naming config.mesh.*) before the base is pre-trained.
    sharding.mesh_from_config(config, train.batch_size)


SCHEDULES = ("linear", "cosine", "constant")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) and x > 0


def _validate_model(config) -> None:
    """config.model (and config.pretrain for 'pretrain'): dtypes, kind, head counts,
    and the speed options (with config.train.loss_chunk)."""
    m = config.model
    for key in ("param_dtype", "dtype"):
        if key in m and m[key] not in DTYPES:
            raise ValueError(f"config.model.{key} must be one of {sorted(DTYPES)}, got "
                             f"{m[key]!r}")
    _validate_speed_options(config)
    if m.init in ("pretrained", "random") and m.kind not in registry.KINDS:
        raise ValueError(f"config.model.kind must be one of {list(registry.KINDS)} for "
                         f"config.model.init={m.init!r}, got {m.kind!r}")
    if m.init in ("pretrained", "random") and m.kind in ("gguf", "hf") and not m.get("path"):
        raise ValueError(f"config.model.kind={m.kind!r} needs config.model.path (a "
                         f"{'GGUF file' if m.kind == 'gguf' else 'Hugging Face folder'})")
    if m.init == "pretrained":
        return  # the architecture comes from the checkpoint
    for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
        if key not in m:
            raise ValueError(f"config.model.{key} is required for config.model.init="
                             f"{m.init!r}")
        if m[key] < 1:
            raise ValueError(f"config.model.{key} must be >= 1, got {m[key]!r}")
    if m.num_heads % m.num_kv_heads:
        raise ValueError(f"config.model.num_heads ({m.num_heads}) must be a multiple of "
                         f"config.model.num_kv_heads ({m.num_kv_heads})")
    if not m.get("head_dim") and m.hidden_size % m.num_heads:
        raise ValueError(f"config.model.hidden_size ({m.hidden_size}) must be divisible by "
                         f"config.model.num_heads ({m.num_heads})")
    try:  # whatever else the model's own config refuses
        base_model._arch(config, vocab_size=2)  # noqa: SLF001 - the one place it is built
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.model: {e}") from None
    if m.init == "pretrain":
        pre = config.pretrain
        for key, ok in (("steps", pre.steps >= 1), ("batch_size", pre.batch_size >= 1),
                        ("num_documents", pre.num_documents >= 1),
                        ("warmup_steps", pre.warmup_steps >= 0),
                        ("learning_rate", _positive(pre.learning_rate))):
            if not ok:
                want = "a finite number > 0" if key == "learning_rate" else (
                    ">= 0" if key == "warmup_steps" else ">= 1")
                raise ValueError(f"config.pretrain.{key} must be {want}, got {pre[key]!r}")
        qa = pre.get("qa_fraction", 0.0)
        if isinstance(qa, bool) or not (isinstance(qa, (int, float)) and 0.0 <= qa <= 1.0):
            raise ValueError(f"config.pretrain.qa_fraction must be a number in [0, 1], "
                             f"got {qa!r}")


def _validate_speed_options(config) -> None:
    """config.model.remat / attention and config.train.loss_chunk (psm.models.speed)."""
    m = config.model
    speed.remat_name(m.get("remat", "none"), "config.model.remat")
    attention = m.get("attention", "auto")
    if attention not in speed.ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"config.model.attention must be one of "
                         f"{list(speed.ATTENTION_IMPLEMENTATIONS)}, got {attention!r}")
    if attention == "cudnn":
        if not speed.cuda_backend():
            raise ValueError(f"config.model.attention='cudnn' needs a CUDA GPU; the backend "
                             f"here is {jax.default_backend()!r} (use 'auto' or 'xla')")
        if m.get("dtype") not in speed.CUDNN_DTYPES:
            raise ValueError(f"config.model.attention='cudnn' needs config.model.dtype in "
                             f"{list(speed.CUDNN_DTYPES)}, got {m.get('dtype')!r}")
    chunk = config.train.get("loss_chunk", 0)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"config.train.loss_chunk must be an int >= 0 (positions per loss "
                         f"chunk; 0 = off), got {chunk!r}")


def _check_merge_options(config) -> None:
    """config.merge.storage_dtype and the TIES / DARE options, named when wrong."""
    m = config.merge
    if m.storage_dtype is not None:
        try:
            dtype = jnp.dtype(m.storage_dtype)
        except TypeError:
            dtype = None
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"config.merge.storage_dtype={m.storage_dtype!r} is not a "
                             "floating dtype name (e.g. 'bfloat16', 'float16', 'float32'; "
                             "None = the training dtype)")
    if "ties" in m.methods:
        if not 0.0 <= m.ties_density <= 1.0:
            raise ValueError(f"config.merge.ties_density={m.ties_density} must be in [0, 1]")
        if m.ties_trim not in ("tensor", "model"):
            raise ValueError(f"config.merge.ties_trim={m.ties_trim!r}; expected 'tensor' "
                             "or 'model'")
    if "dare" in m.methods:
        if not 0.0 <= m.dare_drop_rate < 1.0:
            raise ValueError(f"config.merge.dare_drop_rate={m.dare_drop_rate} must be in "
                             "[0, 1)")
        if m.dare_rescale not in ("inverse", "l1", "none"):
            raise ValueError(f"config.merge.dare_rescale={m.dare_rescale!r}; expected "
                             "'inverse', 'l1' or 'none'")
        if m.dare_combine not in ("linear", "ties"):
            raise ValueError(f"config.merge.dare_combine={m.dare_combine!r}; expected "
                             "'linear' or 'ties'")


def _encode_split(task, split: str, max_len: int):
    arrays, stats = tasks.encode_split(task, split, max_len)
    if stats["truncated"]:
        log.warning("%s: %d of %d examples truncated to %d tokens (%s)", split,
                    stats["truncated"], stats["examples"], max_len, stats)
    return arrays, stats


def _encode_encoder_split(task, tokenizer, split: str, max_len: int):
    arrays, stats = encoder_task.encode_split(task.splits[split], tokenizer, task.name, max_len)
    if stats["truncated"]:
        log.warning("%s: %d of %d examples truncated to %d tokens (%s)", split,
                    stats["truncated"], stats["examples"], max_len, stats)
    return arrays, stats


def make_optimizer(config, total_steps: int):
    """The run's optimizer from config.optim: (transformation, learning-rate schedule).

    Parameters narrower than float32 (config.model.param_dtype 'bfloat16' or
    'float16') are updated through a float32 master copy
    (`replicas.with_master_weights`), so updates below half an ulp still add up.
    """
    return replicas.make_optimizer(
        learning_rate=config.optim.learning_rate, total_steps=total_steps,
        warmup_steps=config.optim.warmup_steps, schedule=config.optim.schedule,
        weight_decay=config.optim.weight_decay, b1=config.optim.b1, b2=config.optim.b2,
        clip_norm=config.optim.clip_norm,
        master_weights=config.model.get("param_dtype", "float32") != "float32")


def row_name(config, method: str) -> str:
    """The results row of a merge method: select_resample is `select_resample<n>`."""
    return f"select_resample{config.merge.resample}" if method == "select_resample" else method


def stored(config, tree):
    """`tree` as a released checkpoint would hold it: floating leaves rounded to
    config.merge.storage_dtype (None: returned unchanged, no copy)."""
    if config.merge.storage_dtype is None:
        return tree
    dtype = jnp.dtype(config.merge.storage_dtype)
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def merge_models(config, params_k, base, methods=None, *, val_loss=None, record=None) -> dict:
    """Merges stacked replicas `[K, ...]` with each method (default config.merge.methods).

    Every call into `psm.merge` for a run is made here. The replicas and the base
    are first rounded to config.merge.storage_dtype (`stored`), as the merge of
    released checkpoints would see them.

    Args:
      config: the run config (config.merge: seed, resample, ties_*, dare_*).
      params_k: replicas, leaves `[K, ...]`.
      base: the base model, leaves `[...]`.
      methods: names from METHODS; 'ensemble' is skipped (it is not one parameter
        tree: see `psm.evaluation.lm.logit_ensemble`).
      val_loss: stacked `[M, ...]` trees (the dtypes of `base`) -> `[M]`
        validation losses; needed by best_single and greedy_soup.
      record: optional dict, filled with what the reference rows chose:
        {"best_single": {"replica"}, "greedy_soup": {"order", "kept", "steps"}}.
    Returns:
      name (`row_name`) -> merged tree, merged in the storage dtype and returned
      in the dtypes of `base` (exact when the storage dtype is the narrower one),
      so that every caller scores and exports what a merge of stored
      checkpoints gives.
    """
    like = base
    params_k, base = stored(config, params_k), stored(config, base)
    if config.merge.storage_dtype is not None:
        back = lambda tree: _cast_like(tree, like)
        val_loss = val_loss and (lambda tree, fn=val_loss: fn(back(tree)))
    else:
        back = lambda tree: tree
    m = config.merge
    key = jax.random.key(m.seed)
    record = {} if record is None else record
    replica_loss = None
    out = {}
    for method in methods or m.methods:
        if method == "average":
            out["average"] = merge.average(params_k, stacked=True)
        elif method == "select":
            out["select"] = merge.select(params_k, key=key, stacked=True)
        elif method == "select_resample":
            out[row_name(config, method)] = merge.select(params_k, key=key, base=base,
                                                         resample=m.resample, stacked=True)
        elif method == "ties":
            # weights 1 + normalize: the disjoint mean of the agreeing trimmed task vectors.
            out["ties"] = merge.ties(params_k, base, m.ties_density, trim=m.ties_trim,
                                     stacked=True)
        elif method == "dare":
            # normalize: the mean of the K rescaled sparse task vectors (an average in
            # expectation). Its own key: select's draws (stream 0) stay independent.
            out["dare"] = merge.dare(params_k, base, m.dare_drop_rate,
                                     key=jax.random.fold_in(key, 1), rescale=m.dare_rescale,
                                     combine=m.dare_combine, normalize=True, stacked=True)
        elif method in ("best_single", "greedy_soup"):
            if val_loss is None:
                raise ValueError(f"merge method {method!r} needs the replicas' validation "
                                 "losses (val_loss=...)")
            if replica_loss is None:
                replica_loss = np.asarray(val_loss(params_k), np.float64)
            if method == "best_single":
                best = int(np.argmin(replica_loss))
                record["best_single"] = {"replica": best}
                out["best_single"] = replicas.unstack(params_k, best)
            else:
                out["greedy_soup"], record["greedy_soup"] = _greedy_soup(
                    params_k, replica_loss, val_loss)
    return {name: back(tree) for name, tree in out.items()}


def _greedy_soup(params_k, replica_loss: np.ndarray, val_loss):
    """Greedy soup (Wortsman et al. 2022) of stacked replicas.

    Replicas in order of validation loss (best first, ties by index); the soup
    starts as the best one; each next replica joins when the uniform average of
    the soup plus it has a strictly lower validation loss than the soup.

    Returns:
      (soup tree, {"replica_val_loss": [K] (as used), "order": [K], "kept": [replica
      ids], "steps": [{"replica", "val_loss" (of the candidate), "kept"}], "val_loss"}).
    """
    k = len(replica_loss)
    order = [int(i) for i in np.argsort(replica_loss, kind="stable")]
    kept = [order[0]]
    soup, soup_loss = replicas.unstack(params_k, order[0]), float(replica_loss[order[0]])
    steps = []
    for i in order[1:]:
        weights = np.zeros(k)
        weights[kept + [i]] = 1.0 / (len(kept) + 1)
        candidate = merge.average(params_k, weights=weights, stacked=True)
        loss = float(np.asarray(val_loss(jax.tree.map(lambda x: x[None], candidate)))[0])
        joins = loss < soup_loss
        steps.append({"replica": i, "val_loss": loss, "kept": joins})
        if joins:
            kept.append(i)
            soup, soup_loss = candidate, loss
    return soup, {"replica_val_loss": [float(x) for x in replica_loss], "order": order,
                  "kept": kept, "steps": steps, "val_loss": soup_loss}


def train_and_evaluate(config, workdir: str) -> dict:
    """Runs (or resumes) the whole job and returns the results dict (also in results.json)."""
    t_start = time.time()
    # ------------------------------------------------------------------ checks
    # Several processes: all stop here, with the same message, on different configs.
    distributed.check_same_config(wd.config_to_dict(config))
    validate_config(config)
    primary = distributed.is_primary()  # the one process that writes the run's files
    resuming = wd.prepare(workdir, config, write=primary)
    k = config.num_replicas
    writer = MetricWriter(workdir, enabled=primary)
    if resuming and primary:  # a corrupt metrics.jsonl is refused now, not after the base
        read_metrics(workdir, torn_tail="drop")  # model is built

    # (replica, fsdp, tensor): each replica's parameters and Adam state are split
    # by psm.training.sharding.LOGICAL_RULES inside its replica group. Made before the
    # base, so that a pre-trained base is checked against it before it is pre-trained.
    batch_size = config.train.batch_size
    mesh = sharding.mesh_from_config(config, batch_size)

    # ------------------------------------------------- base model, task, data
    encoder = encoder_task.is_encoder(config)
    if encoder:
        graphdef, base, tokenizer, model_cfg = encoder_task.load_base(config)
        task = paper_tasks.paper_task(config.task, tokenizer)  # splits only; no prompts
        encoded = {split: _encode_encoder_split(task, tokenizer, split, config.task.max_len)
                   for split in ("train", "validation", "test")}
    else:
        if config.model.init == "pretrain":
            task = tasks.get_task(config.task)
            graphdef, base, tokenizer, model_cfg = base_model.load_base(
                config, workdir, task.tokenizer, mesh=mesh)
        else:
            graphdef, base, tokenizer, model_cfg = base_model.load_base(config, workdir)
            task = paper_tasks.paper_task(config.task, tokenizer)
        encoded = {split: _encode_split(task, split, config.task.max_len)
                   for split in ("train", "validation")}
    (train_arrays, train_stats), (val_arrays, val_stats) = encoded["train"], encoded["validation"]
    gather_batch = encoder_task.gather_batch if encoder else tasks.gather_batch
    # Encoders: each batch cut to the columns its longest example needs, rounded up to
    # config.task.pad_to_multiple (0: all max_len columns); decoders pack instead.
    pad_multiple = encoder_task.padding_multiple(config) if encoder else 0
    eval_loss = (functools.partial(encoder_task.validation_loss, pad_to_multiple=pad_multiple)
                 if encoder else runner.validation_loss)
    n_train = train_stats["examples"]
    steps_per_epoch = orders.steps_per_epoch(n_train, batch_size)
    total_steps = steps_per_epoch * config.train.epochs
    order_kw = dict(data_seed=config.data_seed, num_replicas=k, num_samples=n_train,
                    batch_size=batch_size, fixed_intra_batch=config.train.fixed_intra_batch)
    log.info("task %s: %d train / %d val / %d test; %d steps per epoch, %d in all",
             task.name, n_train, val_stats["examples"], len(task.splits["test"]),
             steps_per_epoch, total_steps)

    # ----------------------------------------------------- replicas on the mesh
    batch_sh = sharding.batch_sharding(mesh)
    tx, lr_schedule = make_optimizer(config, total_steps)
    # The base goes to the devices split like one replica (split inside every replica
    # group, as the merged models are; the merges and diagnostics read it so), each
    # device receiving only its part of the host arrays a checkpoint loads into, and
    # the K replicas are stacked from it there. A base pinned to one device (a cached
    # base is restored so) is first copied to the host. Several processes each made
    # `base` on their own: a loaded checkpoint (or a seeded random init) must agree
    # bit for bit, which is checked by hashes; a base pre-trained here is taken from
    # process 0 (a broadcast that holds it whole on every device: small models only).
    if distributed.is_multiprocess() and config.model.init == "pretrain":
        base = distributed.from_primary(base)
    else:
        distributed.check_same_values(base, "the base model")
        if any(getattr(x, "committed", False) for x in jax.tree.leaves(base)):
            base = jax.device_get(base)
    base = replicas.place_base(base, k, mesh)
    params_k, opt_k, state_sh, opt_sh = replicas.place_state(base, k, tx, mesh)
    if encoder:
        train_step = encoder_task.make_train_step(graphdef, tx, state_sh, batch_sh, opt_sh)
        eval_step = encoder_task.make_eval_step(graphdef)
    else:
        train_loss, sample_loss = replicas.decoder_losses(config.train.get("loss_chunk", 0))
        train_step = replicas.make_train_step(graphdef, tx, state_sh, batch_sh, opt_sh,
                                              loss_fn=train_loss)
        eval_step = replicas.make_eval_step(graphdef, sample_loss)
    log.info("mesh %s; %d parameters per replica", dict(mesh.shape),
             sum(x.size for x in jax.tree.leaves(base)))
    # Packing (decoders): each replica's batch of B examples in R rows, R fixed for the
    # run; pack is None when every example has its own row.
    train_gather, train_rows, pack = (gather_batch, None, None) if encoder else \
        train_batches(config, train_arrays, order_kw, mesh, task.tokenizer.pad_id)

    # ----------------------------------------------------------------- restore
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   interval=config.checkpoint.every_steps,
                                   keep=config.checkpoint.keep)
    start = ckpt.latest_step() or 0
    if start:
        restored = ckpt.restore(start, {"params": params_k, "opt_state": opt_k})
        params_k, opt_k = restored["params"], restored["opt_state"]
        log.info("resumed from the checkpoint at step %d of %d", start, total_steps)
        if primary:
            _truncate_metrics(writer.path, start)
    elif resuming and primary:
        _truncate_metrics(writer.path, 0)

    # -------------------------------------------------------------- train loop
    pending: list[tuple[int, dict]] = []  # device metrics not yet checked / logged

    # Speed: the clock starts once the first (compiling) step of this invocation has
    # finished; each log row reports the window since the previous one, measured at
    # the log boundary after block_until_ready on the state, minus the time spent in
    # evaluation and checkpointing (psm.training.throughput.StepTimer).
    count_tokens = throughput.BatchTokenCounter(gather_batch, train_arrays, rows=train_rows)
    timer = throughput.StepTimer(throughput.flops_per_token(model_cfg, config.task.max_len),
                                 throughput.peak_flops(), devices=mesh.size)

    def flush(upto: int, speed: dict | None = None) -> None:
        """Checks and logs pending metrics (the last log row gets `speed`); raises on a
        non-finite loss."""
        if not pending:
            return
        steps = [step for step, _ in pending]
        host = global_arrays.tree_to_numpy([m for _, m in pending])  # [K] per metric, all replicas
        pending.clear()
        for step, m in zip(steps, host):
            loss = np.asarray(m["loss"])
            if not np.all(np.isfinite(loss)):
                bad = [int(i) for i in np.nonzero(~np.isfinite(loss))[0]]
                raise FloatingPointError(
                    f"non-finite training loss for replica(s) {bad} at step {step}; the last "
                    f"good checkpoint (step {ckpt.latest_step()}) is kept in {ckpt.directory}")
            if (step + 1) % config.train.log_every == 0 or step + 1 == upto:
                writer.write(step + 1, **{"train/loss": loss,
                                          "train/grad_norm": np.asarray(m["grad_norm"]),
                                          "train/lr": float(lr_schedule(step)),
                                          "epoch": (step + 1) / steps_per_epoch,
                                          **(speed or {})})

    t_train = time.time()
    bar = tqdm(range(start, total_steps), desc="train K replicas", initial=start,
               total=total_steps, mininterval=2.0, disable=not primary)
    lengths_seen: set = set()  # batch lengths the step was compiled for (cut batches)
    with jax.set_mesh(mesh):
        for step in bar:
            idx = orders.batch_indices(step, **order_kw)
            # Each process gathers only the rows of its own shards (packed: those of its
            # own replicas, whose examples it packs). Cut batches: every shard keeps the
            # columns the whole step needs.
            gather, length = train_gather, None
            if pad_multiple:
                length = encoder_task.batch_length(train_arrays, idx, pad_multiple)
                gather = functools.partial(train_gather, length=length)
            batch = distributed.global_batch(gather, train_arrays, idx, batch_sh,
                                             rows=train_rows)
            if length in lengths_seen:
                params_k, opt_k, metrics = train_step(params_k, opt_k, batch)
            else:  # a new batch length compiles the step: not timed
                with timer.excluded():
                    params_k, opt_k, metrics = train_step(params_k, opt_k, batch)
                    lengths_seen.add(length)
            pending.append((step, metrics))
            done = step + 1
            if timer.running:
                timer.add(*count_tokens(idx, length=length))
            else:  # the compiling step: not timed
                jax.block_until_ready((params_k, opt_k))
                timer.start()
            log_now = done % config.train.log_every == 0 or done == total_steps
            speed = None
            if log_now:
                jax.block_until_ready((params_k, opt_k))
                speed = timer.lap()
                if speed:
                    bar.set_postfix_str(f"{speed['perf/tokens_per_s']:,.0f} tok/s",
                                        refresh=False)
            if log_now or ckpt.should_save(done):
                flush(total_steps, speed)
            if config.train.eval_every and done % config.train.eval_every == 0:
                with timer.excluded():
                    _eval_during_training(writer, done, eval_loss, eval_step, params_k,
                                          val_arrays, config)
            if ckpt.should_save(done) or done == total_steps:
                with timer.excluded():
                    ckpt.save(done, {"params": params_k, "opt_state": opt_k})
    bar.close()
    ckpt.close()
    del opt_k  # saved; its device memory is free for the merges and evaluations
    train_seconds = time.time() - t_train
    # From here on every process works on the same global arrays: the merges
    # (jitted per leaf, each merged leaf split like one replica), the diagnostics
    # and the evaluations run on the devices of the whole mesh, and only small
    # results (losses, counts, generated tokens) are gathered to the hosts.
    # Several processes: every process continues with all K replicas on its own
    # devices (the merges and evaluations below read host values throughout).

    # ------------------------------------------------------------------ merge
    # Every row is scored from the replicas as stored (config.merge.storage_dtype),
    # cast back to the training dtype for evaluation.
    t_merge = time.time()
    stored_k, stored_base = stored(config, params_k), stored(config, base)
    eval_k = _cast_like(stored_k, base)

    def val_loss_fn(tree_m):
        return eval_loss(eval_step, _cast_like(tree_m, base), val_arrays,
                         config.eval.batch_size)

    chosen: dict = {}
    merged = merge_models(config, params_k, base, val_loss=val_loss_fn, record=chosen)
    merged = jax.block_until_ready(merged)
    merge_seconds = time.time() - t_merge
    exported = _export_hf(config, workdir, model_cfg, merged, tokenizer, write=primary)

    # --------------------------------------------------------------- evaluate
    names = [f"replica {i}" for i in range(k)] + [row_name(config, m)
                                                  for m in config.merge.methods]
    if encoder:
        scored = encoder_task.score_models(
            config, graphdef, eval_step, eval_k,
            {n: _cast_like(t, base) for n, t in merged.items()}, task,
            {split: arrays for split, (arrays, _) in encoded.items()})
    else:
        scored = _score_models(config, graphdef, eval_step, eval_k, merged, base, task,
                               val_arrays, train_arrays)
    val_loss = np.array([scored[n]["val_loss"] for n in names])
    accuracy = np.array([scored[n]["test_accuracy"] for n in names])
    train_losses = np.stack([scored[n]["train_losses"] for n in names])
    test = task.splits["test"]
    positions = orders.first_epoch_positions(**order_kw)
    unchanged = diagnostics.fraction_unchanged(params_k, base)
    unchanged_storage = diagnostics.fraction_unchanged(stored_k, stored_base)
    t_barrier = time.time()
    barrier = _barrier_report(config, val_loss_fn, stored_k, stored_base, merged, base) \
        if config.eval.barrier else None
    barrier_seconds = time.time() - t_barrier

    # ----------------------------------------------------------------- report
    merged_names = names[k:]
    ids = [e["id"] for e in task.splits["train"]]
    if primary:
        report.write_per_sample(workdir, ids, positions, train_losses[:k],
                                dict(zip(merged_names, train_losses[k:])))
        (encoder_task if encoder else report).write_test_predictions(
            workdir, {n: scored[n]["per_example"] for n in names})
    stats = imbalance.imbalance_report(positions, train_losses[:k], config.eval.num_bins)
    merged_trend = {name: imbalance.trend(positions[0], train_losses[k + j], config.eval.num_bins)
                    for j, name in enumerate(merged_names)}
    plots = imbalance.redraw(workdir, config.eval.num_bins) if primary else []
    models = {name: {"val_loss": float(val_loss[m]), "test_accuracy": float(accuracy[m]),
                     "train_loss": float(train_losses[m].mean())}
              for m, name in enumerate(names)}
    if encoder:  # the task's GLUE metrics (accuracy, F1, Matthews, Pearson/Spearman)
        for name in names:
            models[name]["test_metrics"] = scored[name]["test_metrics"]
    for name, choice in chosen.items():
        models[name].update(choice)  # best_single: its replica; greedy_soup: what it kept
    if "ensemble" in models:
        models["ensemble"]["members"] = k
    results = {
        "models": models,
        "singles": {"val_loss_mean": float(val_loss[:k].mean()),
                    "val_loss_std": float(val_loss[:k].std()),
                    "test_accuracy_mean": float(accuracy[:k].mean()),
                    "test_accuracy_std": float(accuracy[:k].std())},
        "imbalance": {"replicas": stats, "merged_vs_replica0_positions": merged_trend},
        "storage_dtype": str(jnp.dtype(config.merge.storage_dtype or
                                       jax.tree.leaves(base)[0].dtype)),
        "fraction_unchanged_from_base": unchanged,
        "fraction_unchanged_from_base_storage": unchanged_storage,
        "barrier": barrier,
        "data": {"train": train_stats, "validation": val_stats, "test": len(test)},
        # Training rows per replica batch and the padding packing saved; None: unpacked.
        "packing": pack,
        "steps": total_steps,
        # Where this invocation started training (0: from the base; total_steps:
        # nothing left to train), so a resume can be checked from the outside.
        "resumed_from_step": start,
        # merge: includes greedy soup's validation passes; barrier: the diagnostics.
        # Mean training speed over the timed steps (psm.training.throughput): tokens/s
        # of all tokens and of loss tokens, summed over the K replicas; mfu None when
        # the device's peak is unknown (CPU).
        "speed": timer.summary(),
        "seconds": {"train": train_seconds, "merge": merge_seconds,
                    "barrier": barrier_seconds, "total": time.time() - t_start},
        "plots": [os.path.relpath(p, workdir) for p in plots],
        "exported": exported,
    }
    if not primary:
        return results
    wd.write_json(workdir, "results.json", results)
    print(report.format_table(results, k))
    if barrier is not None:
        print(report.format_barrier(barrier))
    return results


def train_batches(config, train_arrays: dict, order_kw: dict, mesh, pad_id: int):
    """How the decoder's train loop builds a step's batch from its indices `[K, B]`.

    config.train.packing off: `tasks.gather_batch`, one example per row `[K, B, T]`.
    On: `packed_batches.gather_packed` into `[K, R, T]`, R from
    `packed_batches.rows_for_run` over every batch of the run, rounded up to a
    multiple of the mesh's fsdp axis (which splits the rows); logged with the
    padding it saves.

    Returns:
      (gather `(arrays, indices) -> batch`, R or None, the packing plan dict or None).
    """
    if not config.train.get("packing", False):
        return tasks.gather_batch, None, None
    t0 = time.time()
    plan = packed_batches.rows_for_run(
        packed_batches.example_lengths(train_arrays), config.task.max_len,
        epochs=config.train.epochs, multiple_of=mesh.shape["fsdp"], **order_kw)
    log.info("packing: each replica's batch of %d examples in %d rows of %d tokens "
             "(%.1f%% fewer token slots; padding %.1f%% -> %.1f%%; the fullest of %d batches "
             "needs %d rows, the mean %.1f; planned in %.1fs)",
             plan["batch_size"], plan["rows"], plan["seq_len"], 100 * plan["slots_saved"],
             100 * plan["padding_unpacked"], 100 * plan["padding_packed"], plan["batches"],
             plan["rows_needed"], plan["rows_mean"], time.time() - t0)
    gather = functools.partial(packed_batches.gather_packed, num_rows=plan["rows"],
                               pad_id=pad_id)
    return gather, plan["rows"], plan


def _cast_like(tree, like):
    """`tree`'s leaves (stacked or not) cast to the dtypes of `like`'s leaves."""
    return jax.tree.map(lambda x, ref: x.astype(ref.dtype), tree, like)


def _score_models(config, graphdef, eval_step, eval_k, merged: dict, base, task, val_arrays,
                  train_arrays) -> dict:
    """Validation loss, test generations and per-sample train losses of every row.

    The replicas and the merged trees are scored in one stacked evaluation; the
    output ensemble (config.merge.methods has 'ensemble') is one more model with
    its own graph (K members inside it).

    Returns:
      name -> {"val_loss", "test_accuracy", "per_example", "train_losses": [N_train]}.
    """
    k = jax.tree.leaves(eval_k)[0].shape[0]
    names = [f"replica {i}" for i in range(k)] + list(merged)
    models_m = lm.stack_models([replicas.unstack(eval_k, i) for i in range(k)]
                               + [_cast_like(t, base) for t in merged.values()])
    runs = [(graphdef, eval_step, models_m, names)]
    if "ensemble" in config.merge.methods:
        ens_graphdef, ens_state = lm.logit_ensemble(graphdef, eval_k)
        runs.append((ens_graphdef, replicas.make_eval_step(ens_graphdef),
                     lm.stack_models([ens_state]), ["ensemble"]))
    out = {}
    for gdef, step, params_m, run_names in runs:
        evaluated = runner.evaluate_models(gdef, params_m, run_names, task, val_arrays, config,
                                           step)
        train = lm.per_sample_losses(step, params_m, train_arrays, config.eval.batch_size,
                                     desc="per-sample train loss")
        for m, name in enumerate(run_names):
            out[name] = {"val_loss": evaluated["val_loss"][m],
                         "test_accuracy": evaluated["test_accuracy"][m],
                         "per_example": evaluated["per_example"][name],
                         "train_losses": train[m]}
    return out


def _barrier_report(config, val_loss_fn, stored_k, stored_base, merged: dict, base) -> dict:
    """Merge-readiness diagnostics (`psm.training.diagnostics`) of the stored replicas.

    The straight lines run between the stored replicas (and their stored
    average) cast to the training dtype of `base`, so that interpolated models
    are not rounded again.
    """
    average = merged.get("average")
    if average is None:
        average = merge_models(config, stored_k, stored_base, methods=("average",))["average"]
    out = diagnostics.loss_barriers(val_loss_fn, _cast_like(stored_k, base),
                                    _cast_like(average, base), config.eval.barrier_grid,
                                    config.eval.barrier_models_per_pass)
    out["task_vectors"] = diagnostics.task_vector_geometry(stored_k, stored_base)
    return out


def _export_hf(config, workdir: str, model_cfg, merged: dict, tokenizer, *,
               write: bool = True) -> dict:
    """Writes the merged models named in config.export.hf as HF folders under export/.

    Called by every process: each merged model is copied to the host leaf by leaf
    (`_host_tree`; with several processes every one of them takes part in each
    leaf's gather), and only the writing process (`write`, process 0) keeps the
    copies and writes the files.

    Returns:
      merged-model name -> folder (relative to the workdir); {} where not `write`.
    """
    out = {}
    for method in config.export.hf:
        name = row_name(config, method)
        host = _host_tree(merged[name], keep=write)
        if not write:
            continue
        folder = os.path.join(workdir, "export", name)
        hf_llama.save_hf_llama(folder, model_cfg, host, tokenizer=tokenizer,
                               dtype=config.export.dtype or None)
        del host
        out[name] = os.path.relpath(folder, workdir)
        log.info("exported merged model %s to %s", name, folder)
    return out


def _host_tree(tree, *, keep: bool):
    """A numpy copy of a (sharded) tree, gathered one leaf at a time; None unless
    `keep` (the other processes of a multi-process run only take part in the
    gathers)."""
    leaves, treedef = jax.tree.flatten(tree)
    host = []
    for x in leaves:
        value = global_arrays.to_numpy(x)
        if keep:
            host.append(value)
    return jax.tree.unflatten(treedef, host) if keep else None


def _eval_during_training(writer, step, eval_loss, eval_step, params_k, val_arrays, config):
    """Validation loss of each replica and of their uniform average (paper Fig. 4).

    `eval_loss`: `runner.validation_loss` (decoders) or `encoder_task.validation_loss`.
    Runs on the sharded replicas as they are (several processes: on the global arrays).
    """
    avg = merge.average(params_k, stacked=True)
    models = jax.tree.map(
        lambda s, a: global_arrays.in_order(jnp.concatenate([s, a[None]])), params_k, avg)
    losses = eval_loss(eval_step, models, val_arrays, config.eval.batch_size)
    writer.write(step, **{"val/loss": losses[:-1], "val/loss_average_merge": float(losses[-1])})


def _truncate_metrics(path: str, step: int) -> None:
    """Drops metric lines written after `step` by an interrupted run (they are redone),
    and a last line cut off mid-write by the kill (appending after it would glue the
    next record onto it). A corrupt line elsewhere is an error naming file and line."""
    if not os.path.exists(path):
        return
    keep = [r for r in read_metrics(os.path.dirname(path), os.path.basename(path),
                                    torn_tail="drop")
            if r["step"] <= step]
    import json
    with open(path + ".tmp", "w") as f:
        for r in keep:
            f.write(json.dumps(r) + "\n")
    os.replace(path + ".tmp", path)
