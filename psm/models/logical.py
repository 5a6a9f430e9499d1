"""Logical axis names -> mesh axes: the one rule table, and activation constraints.

Parameters name their axes in Flax metadata (`psm.models._fields.axes`) and
`psm.training.sharding` places them by `LOGICAL_RULES`; the models name their
main activations with the same table through `constrain`, as MaxText's
`nn.with_logical_constraint` does. The table lives here, below both, so that
the models need nothing from the trainer.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import PartitionSpec as P

# Logical axis name -> mesh axis (None: not split). Every name a model uses must
# be listed, so that a new name cannot silently end up replicated.
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "fsdp"),  # B: rows of a batch (activations only)
    ("length", None),  # T: sequence positions (activations only; no sequence split)
    ("embed", "fsdp"),  # D: hidden size (rows of most kernels)
    ("vocab", "tensor"),  # V: embedding rows, lm_head columns, logits
    ("heads", "tensor"),  # H*hd: query / attention-output features
    ("kv_heads", "tensor"),  # KV*hd: key / value features
    ("mlp", "tensor"),  # F: MLP hidden size
    ("norm", None),  # norm scales and biases: small, replicated
    ("layers", None),  # the scan axis of stacked blocks
    ("positions", None),  # BERT position embedding rows
    ("types", None),  # BERT token-type embedding rows
    ("pooled", None),  # BERT pooler output
    ("classes", None),  # classifier outputs
)


def logical_to_mesh(names: Sequence[str | None], rules=LOGICAL_RULES) -> tuple:
    """Mesh axes of logical axis names, e.g. `("embed", "mlp") -> ("fsdp", "tensor")`.

    A mesh axis is used at most once per array: a later dimension whose rule
    names an axis already taken stays unsplit (as MaxText resolves it), so an
    activation `("batch", "length", "embed")` is `("fsdp", None, None)`.

    Raises:
      ValueError: a name that is not in `rules` (lists the known names).
    """
    table = dict(rules)
    out, used = [], set()
    for name in names:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis name {name!r} has no rule in "
                             f"psm.models.logical.LOGICAL_RULES; known: {sorted(table)}")
        axis = table[name]
        out.append(axis if axis not in used else None)
        used.add(axis)
    return tuple(out)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """`x` with a sharding constraint from its axes' logical names, under a mesh.

    Outside a mesh (`jax.set_mesh`) this is `x` itself, so single-device code
    is unchanged. Under one, each named dimension is split over its rule's mesh
    axis; a dimension whose axis is not in the mesh or does not divide its size
    (an odd evaluation batch, a decode step) is left to XLA's propagation
    (`P.UNCONSTRAINED`) rather than forced whole. Inside `jax.vmap` over the
    replicas, the mapped axis is unconstrained too (JAX's batching rule), and
    follows the `replica` split of the parameters.

    Args:
      x: `[...]` an activation with `len(names)` dimensions.
      names: a logical name per dimension, e.g. `("batch", "length", "embed")`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} logical names {names} for an array of "
                         f"shape {x.shape}")
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    spec = [axis if axis is None or (axis in sizes and size % sizes[axis] == 0)
            else P.UNCONSTRAINED
            for size, axis in zip(x.shape, logical_to_mesh(names))]
    return jax.lax.with_sharding_constraint(x, P(*spec))
