"""Does a run fit a TPU slice? Compile its training step ahead of time, without the slice.

  python -m psm.compile --config=configs/gsm8k.py --topology=v5p:4x4x4 \\
      --config.model.kind=hf --config.model.path=<folder with config.json> \\
      --config.mesh.fsdp=-1

lowers and compiles the real K-replica training step (`psm.training.replicas`, with the
shardings of `psm.training.sharding` on the config's mesh) and the per-leaf merge
kernels (average, select) for a TPU topology, on a CPU-only machine: the TPU
compiler comes with `libtpu` (requirements-tpu.txt) and
`jax.experimental.topologies.get_topology_desc` describes the slice, as
MaxText's train_compile does. Nothing is allocated: the model comes from the
config alone (an HF folder may hold only `config.json`).

Printed: the mesh, per-device memory from `compiled.memory_analysis()`
(arguments, outputs, the donated part they share, temporaries) against the
chip's HBM, a `fits:` line, and the model FLOPs of one step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import sys

# GiB of HBM per chip (public TPU specifications).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# Slice shapes known to compile (chips along each axis); other shapes of the
# same rank may work where libtpu accepts them.
KNOWN_TOPOLOGIES = {
    "v4": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"),
    "v5e": ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
    "v5p": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"),
    "v6e": ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
}
# libtpu's chip configuration per chip: a v4 chip has two TensorCores that its
# default configuration lists as two devices, which jax.make_mesh refuses
# ("requires one device per chip"); "megacore" lists the chip as one device, as
# a v4 slice runs (and as MaxText's train_compile asks for it).
CHIP_CONFIG = {"v4": "megacore"}
GIB = 1024 ** 3


def known_topologies() -> str:
    return "; ".join(f"{chip}:{{{','.join(shapes)}}}" for chip, shapes in
                     KNOWN_TOPOLOGIES.items())


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """'v5p:4x4x4' -> ('v5p', (4, 4, 4)); a ValueError listing the known names otherwise."""
    m = re.fullmatch(r"(v\d+[a-z]?):(\d+(?:x\d+)*)", name or "")
    chip = m and m.group(1)
    if not m or chip not in KNOWN_TOPOLOGIES or \
            len(m.group(2).split("x")) != len(KNOWN_TOPOLOGIES[chip][0].split("x")):
        raise ValueError(f"unknown TPU topology {name!r}; known: {known_topologies()}")
    return chip, tuple(int(x) for x in m.group(2).split("x"))


def topology_devices(name: str):
    """(chip, the slice's devices, GiB of HBM per device) of a topology name.

    Raises:
      ValueError: unknown name (lists the known ones), or libtpu missing.
    """
    chip, dims = parse_topology(name)
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ValueError("psm.compile needs libtpu, the TPU compiler: "
                         "pip install -r requirements-tpu.txt") from None
    # Several processes may load libtpu for compiling only; no chip is opened.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    try:
        devices = topologies.get_topology_desc(
            topology_name=name, platform="tpu",
            chip_config_name=CHIP_CONFIG.get(chip, "default")).devices
    except Exception as e:  # noqa: BLE001 - libtpu's own message says why
        raise ValueError(f"libtpu refused topology {name!r} ({e}); known: "
                         f"{known_topologies()}") from None
    chips = math.prod(dims)
    return chip, devices, HBM_GIB[chip] * chips / len(devices)


def model_config(config):
    """The LlamaConfig a run of `config` trains, read without loading any weights."""
    from psm.training import base_model
    from psm.models import gguf_llama, llama, registry

    m = config.model
    overrides = {k: m[k] for k in ("dtype", "param_dtype", "remat", "scan_layers", "attention")
                 if k in m}
    if m.init == "pretrained":
        spec = base_model.model_spec(m)
        kind, path = spec["kind"], spec.get("path")
        if kind == "hf":
            file = os.path.join(path or "", "config.json")
            if not os.path.isfile(file):
                raise ValueError(f"config.model.path={path!r}: no config.json there")
            return llama.LlamaConfig.from_hf_config(registry.read_json(file), **overrides)
        if kind in ("smollm2", "gguf"):
            import gguf
            path = path or registry.smollm2_gguf_path()
            reader = gguf.GGUFReader(path)
            fields = gguf_llama.config_fields(gguf_llama.read_metadata(reader), path,
                                              **overrides)
            fields.setdefault("tie_embeddings", "output.weight" not in
                              {t.name for t in reader.tensors})
            return llama.LlamaConfig(**fields)
        raise ValueError(f"config.model.kind={kind!r} is not a Llama checkpoint psm.compile "
                         "can read a shape from")
    if m.init == "random":
        return base_model._arch(config, base_model.tokenizer_of(m).vocab_size)
    from psm.data import tasks
    return base_model._arch(config, tasks.get_task(config.task).tokenizer.vocab_size)


@dataclasses.dataclass
class Memory:
    """Per-device bytes of one compiled program (`compiled.memory_analysis()`)."""

    arguments: int
    outputs: int
    aliased: int  # outputs written into donated arguments
    temporaries: int
    code: int

    @classmethod
    def of(cls, compiled) -> "Memory":
        ma = compiled.memory_analysis()
        return cls(ma.argument_size_in_bytes, ma.output_size_in_bytes,
                   ma.alias_size_in_bytes, ma.temp_size_in_bytes,
                   ma.generated_code_size_in_bytes)

    @property
    def total(self) -> int:
        """Peak live bytes: arguments, outputs not written in place, temporaries, code."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    def line(self, hbm_gib: float) -> str:
        g = _size
        return (f"arguments {g(self.arguments)}, outputs {g(self.outputs)} ({g(self.aliased)} "
                f"of them in donated arguments), temporaries {g(self.temporaries)}, code "
                f"{g(self.code)}; total {g(self.total)} of {hbm_gib:.3g} GiB HBM")


def _size(n_bytes: float) -> str:
    """Bytes in GiB (MiB below one GiB), 3 significant digits."""
    return (f"{n_bytes / GIB:.3g} GiB" if n_bytes >= GIB else f"{n_bytes / 1024 ** 2:.3g} MiB")


def _count(n: float) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def model_flops(cfg, tokens: int, seq_len: int) -> float:
    """Training FLOPs of `tokens` tokens: 6 per matmul weight per token (forward and
    backward), plus the attention scores and weighted sums (12 L T H*hd per token,
    non-causal count, as MaxText's calculation does before its causal halving)."""
    hd = cfg.resolved_head_dim
    per_layer = (cfg.hidden_size * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
                 + 3 * cfg.hidden_size * cfg.intermediate_size)
    matmul = cfg.num_layers * per_layer + cfg.hidden_size * cfg.vocab_size  # + logits
    attention = 12 * cfg.num_layers * seq_len * cfg.num_heads * hd
    return float(tokens) * (6 * matmul + attention)


def _compile(lowered):
    """`lowered.compile()`, or the compiler's message (a str) when the program does
    not fit the chip's HBM (the TPU compiler refuses those: RESOURCE_EXHAUSTED)."""
    import jax
    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return str(e).strip().splitlines()[0]


def _memory(compiled):
    return compiled if isinstance(compiled, str) else Memory.of(compiled)


def _total(m) -> float:
    """Sort key: a program that did not compile for lack of HBM is the largest."""
    return float("inf") if isinstance(m, str) else m.total


def compile_run(config, topology: str, *, merge: bool = True) -> dict:
    """Compiles the training step (and the merge kernels) of `config` for `topology`.

    Returns:
      {"topology", "devices", "hbm_gib" (per device), "mesh", "params",
       "train": Memory, or the compiler's out-of-memory message (a str),
       "merge": the same for the largest leaf, or None with merge=False,
       "model_flops", "compiler_flops" (per device, or None), "fits"}.
    """
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from psm.merge import kernels
    from psm.training import replicas, sharding, trainer
    from psm.models import llama

    chip, devices, hbm = topology_devices(topology)
    cfg = model_config(config)
    k, b, t = config.num_replicas, config.train.batch_size, config.task.max_len
    mesh = sharding.mesh_from_config(config, b, devices=devices)
    graphdef, abstract = llama.abstract_model(cfg)
    tx, _ = trainer.make_optimizer(config, total_steps=1000)  # steps: the schedule only
    params_abs = jax.eval_shape(functools.partial(replicas.stack, k=k), abstract)
    opt_abs = jax.eval_shape(functools.partial(replicas.init_opt_state, tx), params_abs)
    param_sh = sharding.state_shardings(params_abs, mesh)
    opt_sh = sharding.state_shardings(opt_abs, mesh)
    batch_sh = sharding.batch_sharding(mesh)

    def placed(abstract_tree, shardings):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract_tree, shardings)

    params_in, opt_in = placed(params_abs, param_sh), placed(opt_abs, opt_sh)
    # With config.train.packing a run's batches have R <= B rows, R known only from the
    # data (psm.data.packed_batches): B rows bound its memory from above.
    batch_in = {key: jax.ShapeDtypeStruct((k, b, t), np.float32 if key == "loss_mask"
                                          else np.int32, sharding=batch_sh)
                for key in replicas.BATCH_KEYS}
    train_loss = replicas.decoder_losses(config.train.get("loss_chunk", 0))[0]
    step = replicas.make_train_step(graphdef, tx, param_sh, batch_sh, opt_sh,
                                    loss_fn=train_loss)
    with jax.set_mesh(mesh):
        compiled = _compile(step.lower(params_in, opt_in, batch_in))
    train_mem, compiler_flops = compiled, None
    if not isinstance(compiled, str):
        train_mem = Memory.of(compiled)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
        compiler_flops = float(cost["flops"]) if cost and "flops" in cost else None

    merge_mem = None
    if merge:  # psm.merge runs one jitted kernel per leaf: the largest program counts
        seen = {}
        for leaf in jax.tree.leaves(params_in):
            key = (leaf.shape, leaf.dtype, leaf.sharding.spec)
            if key in seen:
                continue
            out_sh = NamedSharding(mesh, P(*tuple(leaf.sharding.spec)[1:]))
            weights = np.full((k,), 1.0 / k, np.float32)
            thresholds = np.minimum(np.round(np.arange(1, k + 1) / k * 2.0 ** 32),
                                    2.0 ** 32 - 1).astype(np.uint32)
            with jax.set_mesh(mesh):
                avg = _compile(kernels.average_kernel.lower(
                    leaf, weights, stacked=True, out_sharding=out_sh))
                sel = _compile(kernels.select_kernel.lower(
                    leaf, np.zeros((1, 2), np.uint32), np.uint32(0), thresholds, stacked=True,
                    last=k - 1, out_sharding=out_sh, poison=True))
            seen[key] = max((_memory(avg), _memory(sel)), key=_total)
        merge_mem = max(seen.values(), key=_total)

    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
    fits = all(isinstance(m, Memory) and m.total <= hbm * GIB
               for m in (train_mem, merge_mem) if m is not None)
    return {"topology": topology, "chip": chip, "devices": len(devices),
            "device_kind": devices[0].device_kind, "hbm_gib": hbm,
            "mesh": dict(mesh.shape), "model": cfg, "params": n_params,
            "replicas": k, "batch": b, "seq_len": t, "train": train_mem,
            "merge": merge_mem, "model_flops": model_flops(cfg, k * b * t, t),
            "compiler_flops": compiler_flops, "fits": fits}


def _describe(m, hbm_gib: float) -> str:
    return m.line(hbm_gib) if isinstance(m, Memory) else f"does not compile within HBM: {m}"


def report(r: dict) -> str:
    """The printed summary of `compile_run`."""
    cfg = r["model"]
    lines = [
        f"topology {r['topology']}: {r['devices']} devices ({r['device_kind']}), "
        f"{r['hbm_gib']:.3g} GiB HBM per device",
        f"model: Llama, {_count(r['params'])} parameters per replica (hidden "
        f"{cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads, vocab "
        f"{cfg.vocab_size}, params {cfg.param_dtype}, compute {cfg.dtype}); K = "
        f"{r['replicas']} replicas x {r['batch']} rows x {r['seq_len']} tokens per step",
        "mesh: " + " ".join(f"{a}={n}" for a, n in r["mesh"].items())
        + f" ({math.prod(r['mesh'].values())} of {r['devices']} devices)",
        f"train step per device: {_describe(r['train'], r['hbm_gib'])}",
    ]
    if r["merge"] is not None:
        lines.append(f"merge (average, select; largest leaf) per device: "
                     f"{_describe(r['merge'], r['hbm_gib'])}")
    worst = max((m for m in (r["train"], r["merge"]) if m is not None), key=_total)
    need = (_size(worst.total) if isinstance(worst, Memory) else
            "more than HBM, see above")
    lines.append(f"fits: {'yes' if r['fits'] else 'NO'} ({need} of "
                 f"{r['hbm_gib']:.3g} GiB per device)")
    flops = f"model FLOPs per step: {r['model_flops']:.3e}"
    if r["compiler_flops"] is not None:
        flops += f"; XLA's cost analysis: {r['compiler_flops']:.3e} per device"
        if cfg.scan_layers:
            flops += " (the body of the scanned layers counted once)"
    lines.append(flops)
    return "\n".join(lines)


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax
    # Compiling for the TPU needs no local accelerator; the CPU backend alone
    # keeps libtpu free for the topology description.
    jax.config.update("jax_platforms", "cpu")
    try:
        r = compile_run(flags.FLAGS.config, flags.FLAGS.topology, merge=flags.FLAGS.merge)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(report(r))


def _define_flags():
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file(
        "config", None, "A config file, e.g. configs/gsm8k.py (add :variant to pick one).",
        lock_config=True)
    flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e:2x2 or v5p:4x4x4 "
                        f"(known: {known_topologies()})")
    flags.DEFINE_bool("merge", True, "Also compile the merge kernels (average, select).")
    flags.mark_flags_as_required(["config", "topology"])


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
