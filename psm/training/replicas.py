"""K data-order replicas trained in one compiled program.

The K models live as one pytree whose leaves carry a leading axis of size K.
The optimizer state is built with `jax.vmap(tx.init)` and updated inside the
vmapped step, so per-replica statistics (Adam moments, the global-norm clip)
never mix replicas. All replicas start from the same base parameters.

Batches are dicts of `[K, B, T]` arrays:
  tokens      int32   input token ids
  targets     int32   next-token ids
  loss_mask   float32 1 where the target carries loss (the response), else 0
  segment_ids int32   attention segments (0 = padding)
  positions   int32   rotary positions
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from psm import global_arrays
from psm.models.chunked_loss import chunked_token_nll
from psm.training import sharding

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def make_optimizer(*, learning_rate: float, total_steps: int, warmup_steps: int,
                   schedule: str = "linear", weight_decay: float = 0.0, b1: float = 0.9,
                   b2: float = 0.999, clip_norm: float | None = 1.0,
                   master_weights: bool = False
                   ) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
    """AdamW with linear warm-up then `schedule` ('linear', 'cosine' or 'constant') decay.

    Args:
      master_weights: keep a float32 copy of the parameters in the optimizer state
        (`with_master_weights`); for parameters narrower than float32.
    Returns:
      (transformation, learning-rate schedule as a function of the step).
    """
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "linear":
        decay = optax.linear_schedule(learning_rate, 0.0, decay_steps)
    elif schedule == "cosine":
        decay = optax.cosine_decay_schedule(learning_rate, decay_steps)
    elif schedule == "constant":
        decay = optax.constant_schedule(learning_rate)
    else:
        raise ValueError(f"config.optim.schedule must be 'linear', 'cosine' or 'constant', "
                         f"got {schedule!r}")
    lr = optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)), decay],
        [warmup_steps]) if warmup_steps > 0 else decay
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay))
    tx = optax.chain(*parts)
    return (with_master_weights(tx) if master_weights else tx), lr


class MasterWeightsState(NamedTuple):
    """`master`: float32 copy of the parameters; `inner`: the wrapped optimizer's state."""
    master: Any
    inner: Any


def with_master_weights(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` run on a float32 copy of low-precision (bfloat16) parameters.

    An AdamW step is often below half a bfloat16 ulp of the parameter it
    changes (lr 1e-5 on a weight of 0.1, whose bf16 ulp is 2^-11 ~ 5e-4);
    applied to bfloat16 parameters it rounds back to the same value and the
    model never moves. Here the update is accumulated in a float32 master copy
    and the parameters are the master rounded to their own dtype, so small
    updates add up over steps. The inner optimizer sees float32 gradients and
    parameters, so its moments are float32 too.

    Why the copy lives in the optimizer state rather than making the train
    state float32 and casting to bf16 for compute: everything else in a run
    (the model graph, evaluation, checkpoints of `params`, the merge, the HF
    export) keeps seeing parameters in the model's declared `param_dtype`, and
    nothing outside the optimizer has to know about mixed precision. The
    master is checkpointed with the optimizer state, so a resume is exact, and
    it carries the parameters' sharding metadata, so it is laid out like them.

    `params` must be passed to `update`. Float32 leaves are copied too (the
    wrapper is meant for runs whose parameters are narrower).
    """

    def init(params):
        master = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
        return MasterWeightsState(master, inner.init(master))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("with_master_weights needs the parameters in update()")
        grads32 = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads)
        updates32, inner_state = inner.update(grads32, state.inner, state.master)
        master = optax.apply_updates(state.master, updates32)
        # The returned update takes each parameter exactly to its master rounded to the
        # parameter's dtype (apply_updates adds in float32, then casts back).
        updates = jax.tree.map(
            lambda m, p: m.astype(p.dtype).astype(jnp.float32) - p.astype(jnp.float32),
            master, params)
        return updates, MasterWeightsState(master, inner_state)

    return optax.GradientTransformation(init, update)


def stack(tree: Any, k: int) -> Any:
    """Broadcasts every leaf to a new leading axis of size `k` (`[...]` -> `[K, ...]`)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (k,) + x.shape), tree)


def unstack(tree: Any, i: int) -> Any:
    """Replica `i` of a stacked tree.

    A leaf split by a `NamedSharding` `[K, ...]` comes out split like one replica
    (its spec without the leading `replica` axis), by a jitted copy that every
    process runs (global arrays of several processes included).
    """
    def one(x):
        sh = getattr(x, "sharding", None)
        if isinstance(sh, NamedSharding):
            return global_arrays.in_order(
                jax.jit(lambda a: a[i], out_shardings=sharding.unstacked(sh))(x))
        return x[i]

    return jax.tree.map(one, tree)


def token_nll(graphdef: nnx.GraphDef, params: Any, batch: dict,
              loss_chunk: int = 0) -> jax.Array:
    """Per-token negative log-likelihood of one replica. Returns `[B, T]` float32.

    `loss_chunk` > 0 (config.train.loss_chunk) computes it `loss_chunk`
    positions at a time (`psm.models.chunked_loss`), never holding the whole
    `[B, T, V]` logits; 0 projects the whole sequence at once.
    """
    model = nnx.merge(graphdef, params)
    if loss_chunk:
        h = model.features(batch["tokens"], positions=batch["positions"],
                           segment_ids=batch["segment_ids"])
        return chunked_token_nll(model.project, h, batch["targets"], loss_chunk)
    logits = model(batch["tokens"], positions=batch["positions"],
                   segment_ids=batch["segment_ids"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])


def mean_loss(graphdef, params, batch, loss_chunk: int = 0) -> jax.Array:
    """Token-weighted mean NLL over the tokens that carry loss (a scalar)."""
    nll = token_nll(graphdef, params, batch, loss_chunk)
    mask = batch["loss_mask"]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def per_sample_loss(graphdef, params, batch, loss_chunk: int = 0) -> jax.Array:
    """Mean NLL of each row over its loss tokens. Returns `[B]` (0 for rows without loss)."""
    nll = token_nll(graphdef, params, batch, loss_chunk)
    mask = batch["loss_mask"]
    return jnp.sum(nll * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def decoder_losses(loss_chunk: int = 0) -> tuple[Callable, Callable]:
    """`(mean_loss, per_sample_loss)` with `loss_chunk` bound (config.train.loss_chunk)."""
    if not loss_chunk:
        return mean_loss, per_sample_loss
    return (functools.partial(mean_loss, loss_chunk=loss_chunk),
            functools.partial(per_sample_loss, loss_chunk=loss_chunk))


def make_replica_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                      loss_fn: Callable = mean_loss):
    """One optimizer step of ONE replica (no K axis): (params, opt_state, batch) -> ...

    `loss_fn(graphdef, params, batch) -> scalar` is the training objective
    (default: the decoder's token-weighted NLL; `psm.training.encoder_task` passes its own).
    """

    def replica_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(functools.partial(loss_fn, graphdef))(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return replica_step


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    state_sharding=None, batch_sharding=None, opt_sharding=None,
                    loss_fn: Callable = mean_loss):
    """The jitted, vmapped step over all K replicas; the state is donated.

    Args:
      state_sharding: the parameters' shardings (a tree from
        `psm.training.sharding.state_shardings`, or one sharding for every leaf).
      batch_sharding: for the `[K, B, T]` batch (every batch array has a leading K axis).
      opt_sharding: the optimizer state's shardings; default `state_sharding`.
      loss_fn: as in `make_replica_step`.
    Returns:
      `train_step(params [K,...], opt_state [K,...], batch [K,B,T]) ->
      (params, opt_state, metrics {name: [K]})`; the metrics are split over
      `replica` only.
    """
    vmapped = jax.vmap(make_replica_step(graphdef, tx, loss_fn))
    if state_sharding is None:
        return jax.jit(vmapped, donate_argnums=(0, 1))
    opt_sharding = state_sharding if opt_sharding is None else opt_sharding
    metric_sharding = (sharding.replica_sharding(batch_sharding.mesh)
                       if isinstance(batch_sharding, NamedSharding) else state_sharding)
    return jax.jit(vmapped, donate_argnums=(0, 1),
                   in_shardings=(state_sharding, opt_sharding, batch_sharding),
                   out_shardings=(state_sharding, opt_sharding, metric_sharding))


def place_base(base: Any, k: int, mesh) -> Any:
    """`base` on the mesh, laid out like one of `k` stacked replicas (`sharding.unstacked`).

    From host arrays (what `psm.models.weights.load_params` returns) each device
    receives only its own part, so no device ever holds the whole model.
    """
    stacked = sharding.state_shardings(jax.eval_shape(functools.partial(stack, k=k), base),
                                       mesh)
    return jax.device_put(base, jax.tree.map(sharding.unstacked, stacked))


def place_state(base: Any, k: int, tx: optax.GradientTransformation, mesh):
    """K stacked copies of `base` and their optimizer state, created sharded.

    Each array is built by a jit whose `out_shardings` are the rules' layout
    (`psm.training.sharding.state_shardings`), so no device ever holds all K replicas.
    Raises before anything is compiled when the mesh does not divide a
    dimension it splits.

    Returns:
      (params `[K, ...]`, opt_state `[K, ...]`, params' shardings, opt_state's shardings).
    """
    stack_k = functools.partial(stack, k=k)
    init = functools.partial(init_opt_state, tx)
    abstract_params = jax.eval_shape(stack_k, base)
    param_sh = sharding.state_shardings(abstract_params, mesh)
    opt_sh = sharding.state_shardings(jax.eval_shape(init, abstract_params), mesh)
    params_k = jax.jit(stack_k, out_shardings=param_sh)(base)
    opt_k = jax.jit(init, out_shardings=opt_sh)(params_k)
    return params_k, opt_k, param_sh, opt_sh


def make_eval_step(graphdef: nnx.GraphDef, sample_loss: Callable = per_sample_loss):
    """Jitted per-sample losses of M stacked models: `(params [M,...], batch [B,T]) -> [M, B]`.

    The batch is shared by all models (every model is scored on the same samples).
    `sample_loss(graphdef, params, batch) -> [B]` (default: the decoder's).
    """
    return jax.jit(jax.vmap(functools.partial(sample_loss, graphdef), in_axes=(0, None)))


def init_opt_state(tx: optax.GradientTransformation, params_k: Any) -> Any:
    """Optimizer state with a leading K axis, one independent state per replica."""
    return jax.vmap(tx.init)(params_k)
