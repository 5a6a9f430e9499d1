"""psm.compile: the training step and merge kernels compiled for a TPU slice on the CPU.

libtpu (the TPU compiler) is in requirements-test.txt; where it is absent the
compiling tests skip with that reason (in CI a skip is a failure).
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from configs import tiny
from psm import compile as psm_compile
from psm.models.llama import LlamaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -r "
                                         "requirements-tpu.txt)")
GIB = 1024 ** 3


def _tiny(**mesh):
    c = tiny.get_config("test")
    for key, value in mesh.items():
        c.mesh[key] = value
    return c


def test_unknown_topology_lists_the_known_ones():
    for name in ("v5x:2x2", "v5e:2x2x2", "v5p", "4x4", ""):
        with pytest.raises(ValueError, match=rf"unknown TPU topology {re.escape(repr(name))}; "
                                             r"known: v4:\{2x2x1,.*v5e:\{1x1,2x2,.*v5p:.*"
                                             r"4x4x4.*v6e:"):
            psm_compile.parse_topology(name)
    assert psm_compile.parse_topology("v5p:4x4x4") == ("v5p", (4, 4, 4))
    assert psm_compile.parse_topology("v6e:2x4") == ("v6e", (2, 4))


def test_model_flops_by_hand():
    cfg = LlamaConfig(vocab_size=10, hidden_size=4, intermediate_size=8, num_layers=2,
                      num_heads=2, num_kv_heads=1)
    # per layer: q 4x4 + k 4x2 + v 4x2 + o 4x4 = 48, MLP 3 x 4x8 = 96 -> 144; x2 layers
    # = 288, + logits 4x10 = 328 weights. Attention: 12 x 2 layers x T=5 x 4 = 480.
    assert psm_compile.model_flops(cfg, tokens=3, seq_len=5) == 3 * (6 * 328 + 480)


def _sizes(line: str) -> dict:
    """'arguments 1.2 MiB, ...' -> {'arguments': bytes, ...}."""
    unit = {"GiB": GIB, "MiB": 1024 ** 2}
    return {name: float(num) * unit[u] for name, num, u in
            re.findall(r"(arguments|outputs|temporaries|code|total) ([\d.e+-]+) (GiB|MiB)", line)}


@needs_libtpu
def test_tiny_config_compiles_for_v5e_and_reports_memory():
    r = psm_compile.compile_run(_tiny(replica=2, fsdp=2), "v5e:2x2")
    assert r["devices"] == 4 and r["hbm_gib"] == 16
    assert r["mesh"] == {"replica": 2, "fsdp": 2, "tensor": 1}
    train = r["train"]
    # The donated params and Adam state come back in place; they are most of the
    # arguments (the rest is the batch).
    assert 0 < train.aliased <= train.outputs and train.aliased <= train.arguments
    assert train.total < 16 * GIB and r["fits"]
    text = psm_compile.report(r)
    line = next(x for x in text.splitlines() if x.startswith("train step per device: "))
    sizes = _sizes(line)
    assert set(sizes) == {"arguments", "outputs", "temporaries", "code", "total"}
    assert sizes["total"] == pytest.approx(train.total, rel=1e-2)
    assert line.endswith("of 16 GiB HBM")
    assert re.search(r"^fits: yes \([\d.]+ [MG]iB of 16 GiB per device\)$", text, re.M), text
    assert r["merge"] is not None and "merge (average, select; largest leaf)" in text
    assert re.search(r"^model FLOPs per step: [\d.]+e\+\d+", text, re.M)


@needs_libtpu
def test_a_model_too_large_for_the_chips_does_not_fit():
    # 2 layers of D 8192, F 32768: about 1.8B weights x K = 4 replicas x 12 bytes
    # (float32 parameters and two Adam moments) over 4 v5e chips of 16 GiB.
    c = _tiny(replica=1, fsdp=4)
    c.model.hidden_size, c.model.intermediate_size, c.model.num_layers = 8192, 32768, 2
    c.model.num_heads, c.model.num_kv_heads = 64, 64
    r = psm_compile.compile_run(c, "v5e:2x2", merge=False)
    assert not r["fits"]
    text = psm_compile.report(r)
    # The TPU compiler refuses a program larger than HBM; its message is shown.
    assert re.search(r"^train step per device: does not compile within HBM: .*RESOURCE_EXHAUSTED"
                     r".*exceeds available HBM", text, re.M), text
    assert re.search(r"^fits: NO \(more than HBM, see above of 16 GiB per device\)$", text,
                     re.M), text


@needs_libtpu
def test_a_mesh_that_does_not_fit_the_slice_is_refused():
    with pytest.raises(ValueError, match=r"config\.mesh asks for 2 x 4 devices .* only 4"):
        psm_compile.compile_run(_tiny(replica=2, fsdp=4), "v5e:2x2")


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "psm.compile", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@needs_libtpu
def test_command_prints_memory_and_the_fits_line():
    out = _cli("--config=configs/tiny.py:test", "--topology=v5e:2x2",
               "--config.mesh.replica=2", "--config.mesh.fsdp=2", "--nomerge")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mesh: replica=2 fsdp=2 tensor=1 (4 of 4 devices)" in out.stdout
    assert re.search(r"^train step per device: arguments .* of 16 GiB HBM$", out.stdout, re.M)
    assert re.search(r"^fits: yes ", out.stdout, re.M), out.stdout


def test_command_refuses_an_unknown_topology():
    out = _cli("--config=configs/tiny.py:test", "--topology=v9:2x2")
    assert out.returncode == 2
    assert re.search(r"^error: unknown TPU topology 'v9:2x2'; known: v4:", out.stderr, re.M), \
        out.stderr[-2000:]


@needs_libtpu
def test_v4_is_one_device_per_chip_and_a_full_mesh_compiles():
    # A v4 chip is one (megacore) device of 32 GiB; listed as two TensorCores,
    # a mesh over every device of the slice was refused by jax.make_mesh.
    chip, devices, hbm = psm_compile.topology_devices("v4:2x2x1")
    assert (chip, len(devices), hbm) == ("v4", 4, 32)
    r = psm_compile.compile_run(_tiny(replica=2, fsdp=2), "v4:2x2x1", merge=False)
    assert r["mesh"] == {"replica": 2, "fsdp": 2, "tensor": 1} and r["devices"] == 4
    assert r["fits"]


@needs_libtpu
def test_a_mesh_axis_across_torus_axes_builds():
    # (2, 16, 2) on a 4x4x4 torus: 2 is no product of whole physical axes, which
    # jax.make_mesh refuses outside v5e; the mesh splits a physical axis instead.
    from psm.training import sharding
    _, devices, _ = psm_compile.topology_devices("v4:4x4x4")
    mesh = sharding.make_mesh(2, 16, replica=2, fsdp=16, tensor=2, devices=devices)
    assert dict(mesh.shape) == {"replica": 2, "fsdp": 16, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
