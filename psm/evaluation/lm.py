"""Scoring M models at once: per-sample losses and greedy generation.

Models are passed as one parameter tree stacked on a leading axis `[M, ...]`
(K replicas, or several merged models), so each evaluation is one compiled,
vmapped program over all of them.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

log = logging.getLogger(__name__)

from psm import global_arrays
from psm.data import tasks
from psm.models import decode, llama


def per_sample_losses(eval_step, params_m, arrays: dict[str, np.ndarray], batch_size: int,
                      desc: str | None = None) -> np.ndarray:
    """Mean response NLL of every sample under every model.

    Args:
      eval_step: from `replicas.make_eval_step(graphdef)`.
      params_m: stacked `[M, ...]` parameters.
      arrays: encoded samples, `[N, T]` each.
      desc: progress-bar label; None shows no bar.
    Returns:
      `[M, N]` float64.
    """
    n = len(arrays["tokens"])
    out = []
    for start in tqdm(range(0, n, batch_size), desc=desc, mininterval=2.0, leave=False,
                      disable=desc is None):
        idx = np.arange(start, start + batch_size)
        idx = np.where(idx < n, idx, -1)  # pad the last batch to the static shape
        losses = eval_step(params_m, tasks.gather_batch(arrays, idx))
        out.append(global_arrays.to_numpy(losses)[:, idx >= 0])
    return np.concatenate(out, axis=1).astype(np.float64)


def generate_texts(graphdef, params_m, tokenizer, prompts: list[str], *, batch_size: int,
                   prompt_len: int, max_new_tokens: int, desc: str | None = "generate"
                   ) -> list[list[str]]:
    """Greedy continuations of `prompts` under each of M stacked models.

    `desc` labels the progress bar; None shows none.

    Returns:
      `texts[m][i]`: model m's decoded continuation of prompt i.
    """
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    ids = [bos + tokenizer.encode(p) for p in prompts]
    too_long = sum(len(i) > prompt_len for i in ids)
    if too_long:
        # Keep each prompt's end (the question and the answer cue), and say so.
        log.warning("%s: %d of %d prompts exceed the prompt length %d and lose their start; "
                    "raise config.task.prompt_len to keep them whole", desc, too_long,
                    len(ids), prompt_len)
        ids = [i[-prompt_len:] for i in ids]
    gen = jax.vmap(
        lambda st, t, s: decode.generate_tokens(
            graphdef, st, t, s, jax.random.key(0), max_new_tokens=max_new_tokens,
            eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id),
        in_axes=(0, None, None))
    m = jax.tree.leaves(params_m)[0].shape[0]
    texts: list[list[str]] = [[] for _ in range(m)]
    for start in tqdm(range(0, len(ids), batch_size), desc=desc, mininterval=2.0, leave=False,
                      disable=desc is None):
        chunk = ids[start:start + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # static batch shape
        toks, segs = decode.left_pad(chunk, prompt_len, tokenizer.pad_id)
        out = global_arrays.to_numpy(gen(params_m, jnp.asarray(toks), jnp.asarray(segs)))
        for j in range(m):
            for row in out[j][:min(batch_size, len(ids) - start)]:
                texts[j].append(tokenizer.decode(row))
    return texts


def stack_models(trees: list) -> object:
    """Stacks M trees of identical structure into one `[M', ...]` tree, M' >= M.

    A leaf split by a `NamedSharding` (the models of a sharded run, of several
    processes included) is stacked by one jitted copy onto the same split, each
    model staying split as before. Where that mesh has R > 1 replica groups and
    M >= R, the M axis is split over `replica` as the K replicas are in
    training: M is padded to M' (a multiple of R) by repeating the last model,
    and each group holds M'/R models instead of all M. Rows from M on are those
    repeats: callers read the first M rows of what they score (they do, by
    model name). Otherwise (no mesh, R = 1, or fewer models than groups) M' = M
    and the M axis is not split.
    """
    m = len(trees)
    sh = getattr(jax.tree.leaves(trees[0])[0], "sharding", None)
    groups = (sh.mesh.shape.get("replica", 1) if isinstance(sh, NamedSharding) else 1)
    split = groups > 1 and m >= groups
    if split:
        trees = list(trees) + [trees[-1]] * (-m % groups)

    def stack(*xs):
        sh = getattr(xs[0], "sharding", None)
        if isinstance(sh, NamedSharding):
            out = NamedSharding(sh.mesh, PartitionSpec("replica" if split else None, *sh.spec))
            return global_arrays.in_order(
                jax.jit(lambda *a: jnp.stack(a), out_shardings=out)(*xs))
        return jnp.stack(xs)

    return jax.tree.map(stack, *trees)


class LogitEnsemble(nnx.Module):
    """K models behind one model's interface: the output is log of the mean of
    the K models' next-token probabilities.

    Used as an ordinary model (`nnx.split` gives a graphdef and a state whose
    leaves are the members' `[K, ...]` parameters), so the existing eval step
    scores it (cross-entropy of log-mean-probabilities = -log mean_k p_k(target))
    and the existing decoder generates from it (greedy = argmax of the mean
    probability). Each call runs the K members in one `jax.vmap`: K forward passes.

    Its `config` is the members' with `num_layers` multiplied by K, only so that
    `KVCache.create(model.config, ...)` allocates one cache for all members:
    `[K * L, B, S, KV, hd]`, member k owning layers `k*L .. k*L + L - 1`.
    """

    def __init__(self, member: nnx.Module, k: int):
        self.member = member  # one model object whose parameters are stacked [K, ...]
        self.k = k
        self.config = dataclasses.replace(member.config,
                                          num_layers=k * member.config.num_layers)

    def _vmapped(self, fn, *args):
        graphdef, state = nnx.split(self.member)
        return jax.vmap(lambda s, *a: fn(nnx.merge(graphdef, s), *a))(state, *args)

    @staticmethod
    def _mix(logits):
        """`[K, ..., V]` member logits -> `[..., V]` log of the mean probability (float32)."""
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return jax.nn.logsumexp(logp, axis=0) - jnp.log(logits.shape[0])

    def __call__(self, tokens, *, positions=None, segment_ids=None):
        return self._mix(self._vmapped(
            lambda m: m(tokens, positions=positions, segment_ids=segment_ids)))

    def decode(self, tokens, positions, segment_ids, cache: llama.KVCache):
        layers = self.member.config.num_layers
        per_member = lambda a: a.reshape((self.k, layers) + a.shape[1:])

        def one(model, k_all, v_all):
            logits, c = model.decode(tokens, positions, segment_ids, llama.KVCache(
                k=k_all, v=v_all, segment_ids=cache.segment_ids, length=cache.length))
            return logits, c.k, c.v, c.segment_ids, c.length

        logits, k_all, v_all, seg, length = self._vmapped(
            one, per_member(cache.k), per_member(cache.v))
        joined = lambda a: a.reshape((self.k * layers,) + a.shape[2:])
        # Segment ids and length are the same for every member (same tokens).
        return self._mix(logits), llama.KVCache(k=joined(k_all), v=joined(v_all),
                                                segment_ids=seg[0], length=length[0])


def logit_ensemble(graphdef, params_k):
    """The ensemble of K stacked models (log of their mean probability) as one model.

    Args:
      graphdef: the members' graph definition.
      params_k: the members' parameters, leaves `[K, ...]`.
    Returns:
      (graphdef, state) of a `LogitEnsemble`; its state leaves are `params_k`'s.
    """
    k = jax.tree.leaves(params_k)[0].shape[0]
    return nnx.split(LogitEnsemble(nnx.merge(graphdef, params_k), k))
