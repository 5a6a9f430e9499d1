"""The base model of the offline default: a short pre-training stage.

Real configs start from a published checkpoint. The tiny config instead makes
its own base by training a randomly initialised model on a synthetic corpus
(`psm.data.synthetic.make_corpus`), so every replica fine-tunes a model that
already knows the language. The result is cached in `workdir/base/` and reused
when the run is restarted; it is a pure function of the config.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import logging
from flax import nnx
from tqdm import tqdm

from psm.training import checkpoint, replicas
from psm.data import synthetic, tasks
from psm.models.llama import Llama, LlamaConfig

log = logging.getLogger(__name__)


def init_params(model_cfg: LlamaConfig, seed: int):
    """Random initial parameters. Returns (graphdef, params state)."""
    model = Llama(model_cfg, rngs=nnx.Rngs(params=seed))
    return nnx.split(model)


def pretrain_base(config, workdir: str, model_cfg: LlamaConfig, tokenizer):
    """Returns (graphdef, base params), pre-training and caching them if needed."""
    graphdef, params = init_params(model_cfg, config.seed)
    pc = config.pretrain
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "base"), interval=pc.steps, keep=1)
    try:
        if ckpt.latest_step() == pc.steps:
            log.info("Reusing the cached pre-trained base in %s", ckpt.directory)
            return graphdef, ckpt.restore(pc.steps, params)
        arrays = tasks.encode_lm(tokenizer, synthetic.make_corpus(pc.num_documents, config.seed,
                                                       pc.get("qa_fraction", 0.0)),
                                 config.task.max_len)
        n = len(arrays["tokens"])
        tx, _ = replicas.make_optimizer(
            learning_rate=pc.learning_rate, total_steps=pc.steps,
            warmup_steps=pc.warmup_steps, schedule="cosine", weight_decay=0.0,
            master_weights=model_cfg.param_dtype != "float32")
        params_1 = replicas.stack(params, 1)
        opt_1 = replicas.init_opt_state(tx, params_1)
        step_fn = replicas.make_train_step(graphdef, tx)
        rng = np.random.default_rng([config.seed, 3])
        losses = []
        for step in tqdm(range(pc.steps), desc="pre-train base", mininterval=2.0):
            idx = rng.integers(0, n, size=(1, pc.batch_size))
            batch = tasks.gather_batch(arrays, idx)
            params_1, opt_1, metrics = step_fn(params_1, opt_1, batch)
            losses.append(metrics["loss"])
        losses = np.asarray(jax.device_get(losses))[:, 0]
        if not np.all(np.isfinite(losses)):
            bad = int(np.argmin(np.isfinite(losses)))
            raise FloatingPointError(f"pre-training loss is not finite at step {bad}")
        log.info("pre-training loss: first %.3f, last-10 mean %.3f over %d rows",
                 losses[0], losses[-10:].mean(), n)
        base = replicas.unstack(params_1, 0)
        ckpt.save(pc.steps, base)
        return graphdef, base
    finally:
        ckpt.close()
