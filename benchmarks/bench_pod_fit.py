"""Does Llama-2-7b x K fit a TPU pod slice? One table of ahead-of-time compiles.

For each topology and K it compiles psm's real K-replica training step
(`psm.compile.compile_run`, the same code `python -m psm.compile` runs) for
Llama-2-7b (its HF config.json only, written to a temporary folder: no
weights), sequence length 512, 16 rows per replica, float32 parameters and
Adam state, bfloat16 compute, scanned layers, and prints per row: the mesh,
per-device memory of the compiled step (arguments / temporaries / total peak),
whether it fits the device's HBM, and the model FLOPs of one step.

Mesh: replica = K; fsdp = the largest divisor of the per-replica batch that
also divides the devices of one replica group (psm splits the batch rows over
fsdp, so fsdp cannot exceed 16 here); tensor = the devices left. Give
`--fsdp` / `--tensor` to fix them instead.

    nice -n 10 python benchmarks/bench_pod_fit.py                 # the whole table
    nice -n 10 python benchmarks/bench_pod_fit.py --only=v5p-64:4  # one row
    nice -n 10 python benchmarks/bench_pod_fit.py --ks=4 --topologies=v5p-64,v4-128

Each row is one compile of a 7B step: minutes on a small CPU. Rows print as
they finish, so an interrupted run still leaves the rows it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Pod names (v5p-N and v4-N count TensorCores, 2 per chip; v5e-N counts chips)
# -> the topology strings psm.compile accepts.
TOPOLOGIES = {"v5p-64": "v5p:2x4x4", "v4-128": "v4:4x4x4", "v5e-256": "v5e:16x16"}
LLAMA_2_7B = {  # the published config.json values (meta-llama/Llama-2-7b-hf)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
    "hidden_act": "silu",
}


def choose_mesh(devices: int, k: int, batch: int) -> tuple[int, int, int]:
    """(replica, fsdp, tensor) for `devices`: replica = K, fsdp the largest divisor
    of `batch` dividing devices / K, tensor the rest."""
    if devices % k:
        raise ValueError(f"K = {k} does not divide the {devices} devices")
    group = devices // k
    fsdp = max(d for d in range(1, batch + 1) if batch % d == 0 and group % d == 0)
    return k, fsdp, group // fsdp


def run_config(model_dir: str, k: int, mesh: tuple[int, int, int], *, seq_len: int,
               batch: int, remat: bool):
    """The gsm8k config with Llama-2-7b from `model_dir` and the given sizes."""
    from configs import gsm8k
    c = gsm8k.get_config()
    c.num_replicas = k
    c.task.max_len, c.train.batch_size = seq_len, batch
    c.model.kind, c.model.path = "hf", model_dir
    # config.model.remat is a policy name; this benchmark's flag is on ('full') or off.
    c.model.remat, c.model.scan_layers = ("full" if remat else "none"), True
    c.mesh.replica, c.mesh.fsdp, c.mesh.tensor = mesh
    return c


def _gib(n: float) -> str:
    return f"{n / 1024 ** 3:.1f}"


HEADER = ("| pod (topology) | devices x HBM | K | mesh replica x fsdp x tensor | "
          "arguments GiB | temporaries GiB | total GiB | fits | model FLOPs/step | "
          "compile s |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def row(pod: str, r: dict, seconds: float) -> str:
    """One table row from `compile_run`'s result."""
    from psm.compile import Memory
    mesh = " x ".join(str(n) for n in r["mesh"].values())
    train = r["train"]
    if isinstance(train, Memory):
        mem = [_gib(train.arguments), _gib(train.temporaries), _gib(train.total)]
    else:  # the TPU compiler refused it: RESOURCE_EXHAUSTED
        mem = ["-", "-", "over HBM (RESOURCE_EXHAUSTED)"]
    return (f"| {pod} ({r['topology']}) | {r['devices']} x {r['hbm_gib']:.3g} GiB | "
            f"{r['replicas']} | {mesh} | " + " | ".join(mem) +
            f" | {'yes' if r['fits'] else 'NO'} | {r['model_flops']:.3g} | {seconds:.0f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--topologies", default=",".join(TOPOLOGIES),
                   help=f"comma-separated pods, of {list(TOPOLOGIES)}")
    p.add_argument("--ks", default="4,2,1", help="comma-separated K values")
    p.add_argument("--only", default=None,
                   help="comma-separated pod:K rows (e.g. v5p-64:4), instead of the grid")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=16, help="rows per replica")
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute each layer's activations in the backward pass "
                        "(config.model.remat)")
    p.add_argument("--fsdp", type=int, default=None)
    p.add_argument("--tensor", type=int, default=None)
    p.add_argument("--merge", action="store_true",
                   help="also compile the merge kernels (slower; the train step dominates)")
    a = p.parse_args(argv)

    if a.only:
        rows = []
        for item in a.only.split(","):
            pod, _, k = item.partition(":")
            if pod not in TOPOLOGIES or not k.isdigit():
                p.error(f"--only item {item!r}: expected pod:K with pod in {list(TOPOLOGIES)}")
            rows.append((pod, int(k)))
    else:
        pods = a.topologies.split(",")
        for pod in pods:
            if pod not in TOPOLOGIES:
                p.error(f"--topologies: unknown pod {pod!r}; known: {list(TOPOLOGIES)}")
        rows = [(pod, int(k)) for pod in pods for k in a.ks.split(",")]

    import jax
    jax.config.update("jax_platforms", "cpu")  # compile for the TPU; run nothing
    from psm import compile as psm_compile

    model_dir = tempfile.mkdtemp(prefix="llama-2-7b-config-")
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(LLAMA_2_7B, f)
    print(f"Llama-2-7b, sequence {a.seq_len}, {a.batch} rows per replica, remat "
          f"{'on' if a.remat else 'off'}, scanned layers, float32 params + Adam, "
          f"bfloat16 compute; train step only{' (+ merge)' if a.merge else ''}", flush=True)
    print(HEADER, flush=True)
    for pod, k in rows:
        topology = TOPOLOGIES[pod]
        _, devices, _ = psm_compile.topology_devices(topology)
        mesh = list(choose_mesh(len(devices), k, a.batch))
        if a.fsdp or a.tensor:  # fixed by hand; psm's mesh checks refuse a bad pair
            group = len(devices) // k
            mesh[1] = a.fsdp or max(1, group // a.tensor)
            mesh[2] = a.tensor or max(1, group // mesh[1])
        config = run_config(model_dir, k, tuple(mesh), seq_len=a.seq_len, batch=a.batch,
                            remat=a.remat)
        start = time.perf_counter()
        r = psm_compile.compile_run(config, topology, merge=a.merge)
        print(row(pod, r, time.perf_counter() - start), flush=True)


if __name__ == "__main__":
    main()
