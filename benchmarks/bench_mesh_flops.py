"""Per-device FLOPs of the K-replica train step on several meshes (8 simulated CPU devices).

  python benchmarks/bench_mesh_flops.py
  python benchmarks/bench_mesh_flops.py --meshes=1x8x1,1x2x4,2x4x1,2x1x4 --k=2

Compiles `psm.training.replicas.make_train_step` for a random Llama (the preset
below: 4 layers, hidden 512, vocabulary 32,000, bfloat16 compute) on each
(replica x fsdp x tensor) mesh and prints XLA's cost analysis of the compiled
program: FLOPs per device, and that times the device count against one device's
program. Splitting the same step over 8 devices should leave that product
unchanged; a larger one means work done on several devices instead of split
over them. Nothing is run: compile only (about half a minute per mesh).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from psm.models.llama import Llama, LlamaConfig  # noqa: E402
from psm.training import replicas, sharding  # noqa: E402


def per_device_flops(cfg: LlamaConfig, k: int, b: int, t: int, mesh_shape) -> float:
    replica, fsdp, tensor = mesh_shape
    mesh = sharding.make_mesh(k, b, replica=replica, fsdp=fsdp, tensor=tensor)
    graphdef, base = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
    tx, _ = replicas.make_optimizer(learning_rate=1e-3, total_steps=10, warmup_steps=0)
    params, opt, param_sh, opt_sh = replicas.place_state(base, k, tx, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    step = replicas.make_train_step(graphdef, tx, param_sh, batch_sh, opt_sh)
    tokens = np.zeros((k, b, t), np.int32)
    batch = {"tokens": tokens, "targets": tokens, "loss_mask": np.ones((k, b, t), np.float32),
             "segment_ids": np.ones((k, b, t), np.int32),
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (k, b, t)).copy()}
    with jax.set_mesh(mesh):
        compiled = step.lower(params, opt, jax.device_put(batch, batch_sh)).compile()
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--meshes", default="1x1x1,1x8x1,1x4x2,1x2x4",
                   help="comma-separated replica x fsdp x tensor meshes")
    p.add_argument("--k", type=int, default=1, help="replicas")
    p.add_argument("--batch", type=int, default=16, help="rows per replica")
    p.add_argument("--seq", type=int, default=384)
    args = p.parse_args()
    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=4,
                      num_heads=8, num_kv_heads=8, max_seq_len=args.seq, dtype="bfloat16")
    meshes = [tuple(int(x) for x in m.split("x")) for m in args.meshes.split(",")]
    print(f"K = {args.k}, {args.batch} rows x {args.seq} tokens per replica; {cfg}\n")
    print("| mesh (replica x fsdp x tensor) | devices | FLOPs per device | x devices |")
    print("| --- | --- | --- | --- |")
    for m in meshes:
        flops = per_device_flops(cfg, args.k, args.batch, args.seq, m)
        n = int(np.prod(m))
        print(f"| {'x'.join(map(str, m))} | {n} | {flops:.4g} | {flops * n:.4g} |", flush=True)


if __name__ == "__main__":
    main()
