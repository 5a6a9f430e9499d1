"""The streaming merge (`psm.merge.streaming`, `python -m psm.merge`).

Every output is compared with `psm.merge` applied in memory to the whole
checkpoints, loaded by an independent reader (`safetensors.numpy.load_file`,
orbax's own restore), as flat dicts of tensor name -> array; equality is bit
for bit. Checkpoints are tiny Llamas (one tensor is above the size where TIES
switches from the exact host search to its sampled bracket search).
"""

import json
import os
import signal
import subprocess
import sys
import time
import weakref

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from psm import merge as M
from psm.merge import __main__ as merge_cli
from psm.merge import streaming as S
from psm.models.llama import LlamaConfig
from psm.models.safetensors_io import save_safetensors

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
K = 3
# vocab * hidden = 133120 > 2^17: the embedding takes TIES' sampled-bracket path.
CFG = LlamaConfig(vocab_size=4160, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_seq_len=64)


def _hf_tensors(cfg, rng):
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.resolved_head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,),
              "lm_head.weight": (cfg.vocab_size, d)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (cfg.num_heads * hd, d),
                       p + "self_attn.k_proj.weight": (cfg.num_kv_heads * hd, d),
                       p + "self_attn.v_proj.weight": (cfg.num_kv_heads * hd, d),
                       p + "self_attn.o_proj.weight": (d, cfg.num_heads * hd),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
    return {n: (0.05 * rng.standard_normal(s)).astype(np.float32) for n, s in shapes.items()}


def _finetune(base, rng, unchanged=0.3):
    out = {}
    for n, b in base.items():
        delta = (0.01 * rng.standard_normal(b.shape)).astype(np.float32)
        delta[rng.random(b.shape) < unchanged] = 0  # exactly unchanged entries (resampling)
        out[n] = b + delta
    return out


def _write_hf(path, tensors, cfg=CFG, extra=None, shard_bytes=None):
    os.makedirs(path)
    if shard_bytes:
        entries = [(n, x.nbytes, (lambda x=x: x)) for n, x in tensors.items()]
        save_safetensors(str(path), entries, max_shard_bytes=shard_bytes,
                         metadata={"format": "pt"})
    else:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    hf = cfg.to_hf_config(bos_token_id=1, eos_token_id=2, **(extra or {}))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    return str(path)


def _load(path):
    """Flat dict of every tensor in a HF folder (all shards), via safetensors itself."""
    out = {}
    for fname in sorted(os.listdir(path)):
        if fname.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, fname)))
    return out


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    rng = np.random.default_rng(0)
    base = _hf_tensors(CFG, rng)
    models = [_finetune(base, rng) for _ in range(K)]
    base_dir = _write_hf(root / "base", base)
    with open(os.path.join(base_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)
    with open(os.path.join(base_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 64}, f)
    dirs = [_write_hf(root / f"ft{i}", m) for i, m in enumerate(models)]
    return {"root": root, "base": base, "models": models, "base_dir": base_dir, "dirs": dirs}


def _in_memory(method, opts, seed, models, base):
    kw = S.method_kwargs(method, opts, seed)
    extra = {"base": base} if S.needs_base(method, kw) else {}
    return M.merge(method, models, **extra, **kw)


def _assert_same(got, want):
    assert set(got) == set(want)
    for name in want:
        w = np.asarray(want[name])
        assert got[name].dtype == w.dtype, name
        assert got[name].shape == w.shape, name
        assert np.array_equal(got[name].view(np.uint8), w.view(np.uint8)), name


def _no_tmp(out):
    parent, name = os.path.dirname(out), os.path.basename(out)
    return not [d for d in os.listdir(parent) if d.startswith(f".{name}.tmp-")]


CASES = [
    ("average", {}),
    ("linear", {"weights": [0.2, 0.3, 0.5]}),
    ("select", {"probs": [0.5, 0.25, 0.25]}),
    ("select", {"resample": 2}),
    ("task_arithmetic", {"scale": 0.7, "weights": [1.0, 0.5, -0.2]}),
    ("ties", {"density": 0.3, "weights": [1.0, 0.5, 0.8]}),
    ("dare", {"drop_rate": 0.6}),
    ("dare_linear", {"drop_rate": [0.2, 0.5, 0.7], "rescale": "l1"}),
    ("dare_ties", {"drop_rate": 0.5, "normalize": True}),
]


@pytest.mark.parametrize("method, opts", CASES, ids=[f"{m}-{i}" for i, (m, _) in
                                                    enumerate(CASES)])
def test_same_numbers_as_in_memory(hf, tmp_path, method, opts):
    out = str(tmp_path / "out")
    summary = S.merge_checkpoints(hf["dirs"], out, method=method, base=hf["base_dir"], seed=7,
                                  options=opts, progress=False, log=lambda s: None)
    got = _load(out)
    want = _in_memory(method, opts, 7, hf["models"], hf["base"])
    _assert_same(got, want)
    assert not np.array_equal(got["model.embed_tokens.weight"],
                              hf["models"][0]["model.embed_tokens.weight"])
    assert summary["tensors"] == len(hf["base"])
    with_base = S.needs_base(method, S.method_kwargs(method, opts, 7))
    read = sum(x.nbytes for x in hf["base"].values()) * (K + with_base)
    assert summary["bytes_read"] == read
    assert summary["bytes_written"] == sum(x.nbytes for x in hf["base"].values())
    assert summary["peak_rss_bytes"] > 0 and _no_tmp(out)


def test_seed_changes_random_methods(hf, tmp_path):
    outs = []
    for seed in (0, 1):
        out = str(tmp_path / f"s{seed}")
        S.merge_checkpoints(hf["dirs"], out, method="select", seed=seed, progress=False,
                            log=lambda s: None)
        outs.append(_load(out)["lm_head.weight"])
    assert not np.array_equal(*outs)


def test_at_most_a_few_tensors_per_input_live(hf, tmp_path, monkeypatch):
    """Inputs are read tensor by tensor and released: never more than 3 live per input."""
    live, peak = {}, {}
    orig = S.HFReader.read

    def tracked(self, name, replica=None):
        x = orig(self, name, replica)
        live[self.path] = live.get(self.path, 0) + 1
        peak[self.path] = max(peak.get(self.path, 0), live[self.path])
        weakref.finalize(x, lambda p=self.path: live.__setitem__(p, live[p] - 1))
        return x

    monkeypatch.setattr(S.HFReader, "read", tracked)
    S.merge_checkpoints(hf["dirs"], str(tmp_path / "o"), method="ties", base=hf["base_dir"],
                        options={"density": 0.5}, progress=False, log=lambda s: None)
    assert len(peak) == K + 1
    assert max(peak.values()) <= 3, peak
    n_tensors = len(hf["base"])
    assert n_tensors > 3 * 3  # so holding everything would have shown


def test_bfloat16_and_dtype_cast(hf, tmp_path):
    bf = ml_dtypes.bfloat16
    dirs = [_write_hf(tmp_path / f"bf{i}", {n: x.astype(bf) for n, x in m.items()})
            for i, m in enumerate(hf["models"][:2])]
    out = str(tmp_path / "out_bf")
    S.merge_checkpoints(dirs, out, method="average", progress=False, log=lambda s: None)
    want = M.average([{n: x.astype(bf) for n, x in m.items()} for m in hf["models"][:2]])
    _assert_same(_load(out), want)
    # float32 + bfloat16 inputs: refused, then accepted with a cast to bfloat16.
    mixed = [hf["dirs"][0], dirs[1]]
    with pytest.raises(ValueError, match=r"dtypes differ.*lm_head.weight.*bfloat16.*--dtype"):
        S.merge_checkpoints(mixed, str(tmp_path / "mixed"), method="average", progress=False)
    assert not os.path.exists(tmp_path / "mixed")
    out2 = str(tmp_path / "cast")
    S.merge_checkpoints(mixed, out2, method="select", dtype="bfloat16", progress=False,
                        log=lambda s: None)
    want2 = M.select([{n: x.astype(bf) for n, x in hf["models"][0].items()},
                      {n: x.astype(bf) for n, x in hf["models"][1].items()}],
                     key=jax.random.key(0))
    _assert_same(_load(out2), want2)
    assert json.load(open(os.path.join(out2, "config.json")))["torch_dtype"] == "bfloat16"


def test_sharded_input_and_output_loaded_by_transformers(hf, tmp_path):
    sharded = _write_hf(tmp_path / "ft0_sharded", hf["models"][0], shard_bytes=200_000)
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    out = str(tmp_path / "out")
    summary = S.merge_checkpoints([sharded] + hf["dirs"][1:], out, method="ties",
                                  base=hf["base_dir"], options={"density": 0.4},
                                  shard_size="300KB", progress=False, log=lambda s: None)
    shards = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    assert len(shards) >= 3
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"]) == set(hf["base"])
    for fname in shards:  # within the limit (+ header), or one tensor larger than it
        held = [n for n, f in index["weight_map"].items() if f == fname]
        size = os.path.getsize(os.path.join(out, fname))
        assert size <= 300_000 + 4096 or len(held) == 1, (fname, size, held)
    for fname in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert fname in summary["files"] and os.path.isfile(os.path.join(out, fname))
    want = M.ties(hf["models"], hf["base"], 0.4)
    _assert_same(_load(out), want)


@pytest.mark.oracle
def test_transformers_loads_sharded_output(hf, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = str(tmp_path / "out")
    S.merge_checkpoints(hf["dirs"], out, method="select", base=hf["base_dir"],
                        options={"resample": 1}, shard_size="300KB", progress=False,
                        log=lambda s: None)
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    got = _load(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    sd = model.state_dict()
    for name, x in got.items():
        np.testing.assert_array_equal(sd[name].detach().numpy(), x, err_msg=name)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, CFG.vocab_size) and torch.isfinite(logits).all()


def test_cli_subprocess_and_config_file(hf, tmp_path):
    out = str(tmp_path / "cli")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "psm.merge", "--models=" + ",".join(hf["dirs"]),
         f"--base={hf['base_dir']}", "--method=select", "--resample=2", "--seed=3",
         f"--out={out}", "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"merged {len(hf['base'])} tensors" in proc.stdout
    assert "peak memory" in proc.stdout and "GB/s" in proc.stdout
    _assert_same(_load(out), _in_memory("select", {"resample": 2}, 3, hf["models"], hf["base"]))

    cfg = tmp_path / "merge_cfg.py"
    cfg.write_text(
        "import ml_collections\n\n\ndef get_config():\n"
        "    c = ml_collections.ConfigDict()\n"
        f"    c.models = {','.join(hf['dirs'])!r}\n"
        f"    c.base = {hf['base_dir']!r}\n"
        "    c.method = 'ties'\n    c.density = 0.25\n    c.weights = '1,2,1'\n"
        "    c.progress = False\n    c.out = '/nonexistent/overridden'\n"
        "    return c\n")
    out2 = str(tmp_path / "from_cfg")
    merge_cli.run([f"--config={cfg}", f"--out={out2}"])  # the flag overrides the file's out
    _assert_same(_load(out2), M.ties(hf["models"], hf["base"], 0.25, [1.0, 2.0, 1.0]))
    # A refused input exits with status 2 and a message naming the problem.
    assert merge_cli.main([f"--models={hf['dirs'][0]}", "--method=ties", f"--out={out2}x",
                           "--density=0.5"]) == 2


def test_existing_destination_refused_then_overwritten(hf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        S.merge_checkpoints(hf["dirs"], str(out), method="average", progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    S.merge_checkpoints(hf["dirs"], str(out), method="average", overwrite=True, progress=False,
                        log=lambda s: None)
    assert not (out / "keep.txt").exists()
    _assert_same(_load(str(out)), M.average(hf["models"]))
    assert _no_tmp(str(out))


def test_killed_run_leaves_nothing_and_rerun_succeeds(tmp_path):
    """SIGKILL while shards are being written: no destination; a rerun cleans up."""
    rng = np.random.default_rng(1)
    # Many tensors make the run long enough to be caught mid-write.
    base = {f"t{i:04d}": rng.standard_normal((64, 64)).astype(np.float32) for i in range(1500)}
    models = [_finetune(base, rng) for _ in range(2)]
    dirs = []
    for i, m in enumerate(models):
        os.makedirs(tmp_path / f"m{i}")
        save_file(m, str(tmp_path / f"m{i}" / "model.safetensors"))
        dirs.append(str(tmp_path / f"m{i}"))
    out = str(tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "psm.merge", f"--models={dirs[0]},{dirs[1]}",
         "--method=select", f"--out={out}", "--shard-size=100KB", "--no-progress"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen, deadline = None, time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        tmps = [d for d in os.listdir(tmp_path) if d.startswith(".out.tmp-")]
        try:
            written = len(os.listdir(tmp_path / tmps[0])) if tmps else 0
        except FileNotFoundError:  # renamed into place meanwhile: the run finished
            written = 0
        if written >= 3:  # some shards written
            seen = tmps[0]
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=30)
    assert seen is not None, "the run ended before it could be killed mid-write"
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(out)
    assert os.path.isdir(tmp_path / seen)  # the killed run's partial output stays aside
    S.merge_checkpoints(dirs, out, method="select", shard_size="100KB", progress=False,
                        log=lambda s: None)
    assert not os.path.exists(tmp_path / seen) and _no_tmp(out)  # stale folder removed
    _assert_same(_load(out), M.select(models, key=jax.random.key(0)))


# ---- refused inputs -------------------------------------------------------------------------

def _refused(dirs, out, match, **kw):
    kw.setdefault("method", "average")
    with pytest.raises(ValueError, match=match):
        S.merge_checkpoints(dirs, str(out), progress=False, **kw)
    assert not os.path.exists(out) and _no_tmp(str(out))


def test_missing_files_refused(hf, tmp_path):
    _refused([hf["dirs"][0], str(tmp_path / "nope")], tmp_path / "o", r"nope: no such file")
    sharded = _write_hf(tmp_path / "sh", hf["models"][0], shard_bytes=200_000)
    victim = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(sharded, victim))
    _refused([sharded, hf["dirs"][1]], tmp_path / "o", rf"{victim}: file not found .*tensor")
    os.makedirs(tmp_path / "empty")
    _refused([hf["dirs"][0], str(tmp_path / "empty")], tmp_path / "o", "no orbax _METADATA")
    _refused(hf["dirs"], tmp_path / "o", r"needs --base", method="ties",
             options={"density": 0.5})


def test_corrupt_header_refused(hf, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    _refused([hf["dirs"][0], str(bad)], tmp_path / "o",
             r"bad/model.safetensors: corrupt safetensors header: header length")
    raw = open(os.path.join(hf["dirs"][1], "model.safetensors"), "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].replace(b'"data_offsets":[0,', b'"data_offsets":[4,', 1)
    (bad / "model.safetensors").write_bytes(raw[:8] + header + raw[8 + n:])
    _refused([hf["dirs"][0], str(bad)], tmp_path / "o", r"corrupt safetensors header: tensor '")
    (bad / "model.safetensors").write_bytes(raw[:8] + b"{" * n + raw[8 + n:])
    _refused([hf["dirs"][0], str(bad)], tmp_path / "o", r"not valid JSON")


def test_names_shapes_dtypes_and_architectures_must_agree(hf, tmp_path):
    m = dict(hf["models"][1])
    m["model.extra.weight"] = np.zeros(3, np.float32)
    del m["model.norm.weight"]
    odd = _write_hf(tmp_path / "names", m)
    _refused([hf["dirs"][0], odd], tmp_path / "o",
             r"names differ.*missing from the model: \[model.norm.weight\].*only in the model: "
             r"\[model.extra.weight\]")
    m = dict(hf["models"][1])
    m["model.norm.weight"] = np.zeros(31, np.float32)
    odd = _write_hf(tmp_path / "shapes", m)
    _refused([hf["dirs"][0], odd], tmp_path / "o",
             r"shapes differ.*model.norm.weight \(31,\) vs \(32,\).*shapes/model.safetensors")
    m = dict(hf["models"][1])
    m["lm_head.weight"] = m["lm_head.weight"].astype(np.float16)
    odd = _write_hf(tmp_path / "dtypes", m)
    _refused([hf["dirs"][0], odd], tmp_path / "o", r"dtypes differ.*lm_head.weight float16")
    odd = _write_hf(tmp_path / "arch", hf["models"][1], extra={"model_type": "mistral"})
    _refused([hf["dirs"][0], odd], tmp_path / "o",
             r"architectures differ: .*arch/config.json.*model_type: 'mistral' vs 'llama'")


def test_bad_options_refused_before_writing(hf, tmp_path):
    _refused(hf["dirs"], tmp_path / "o", r"weights has 2 entries but there are K = 3",
             options={"weights": [0.5, 0.5]})
    _refused(hf["dirs"], tmp_path / "o", r"does not take option\(s\) \['density'\]",
             options={"density": 0.5})
    _refused(hf["dirs"], tmp_path / "o", r"trim='tensor'", method="ties", base=hf["base_dir"],
             options={"density": 0.5, "trim": "model"})
    _refused(hf["dirs"], tmp_path / "o", r"unknown merge method", method="soup")


# ---- orbax and psm workdirs ------------------------------------------------------------------

def _orbax_restore(path):
    import orbax.checkpoint as ocp
    return ocp.StandardCheckpointer().restore(path)


def _flat(tree):
    """Leaf name -> array; a trailing "value" dict key (an NNX variable restored as a dict)
    is dropped as `leaf_name` drops the attribute."""
    pairs = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {S._canonical(M.leaf_name(p).split("/")): np.asarray(x) for p, x in pairs}


def test_orbax_round_trips(hf, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    # safetensors -> orbax: a flat tree keyed by tensor name.
    out = str(tmp_path / "st2ox")
    S.merge_checkpoints(hf["dirs"], out, method="dare", base=hf["base_dir"],
                        options={"drop_rate": 0.3}, fmt="orbax", seed=2, progress=False,
                        log=lambda s: None)
    want = _in_memory("dare", {"drop_rate": 0.3}, 2, hf["models"], hf["base"])
    _assert_same(_flat(_orbax_restore(out)), want)
    # orbax -> orbax and orbax -> safetensors: nested trees, leaf names "a/b".
    rng = np.random.default_rng(5)
    base = {"dense": {"kernel": rng.standard_normal((300, 40)).astype(np.float32),
                      "bias": rng.standard_normal(40).astype(np.float32)},
            "emb": {"embedding": rng.standard_normal((50, 8)).astype(ml_dtypes.bfloat16)},
            "step": np.arange(3, dtype=np.int32)}
    trees = []
    for i in range(K):
        t = jax.tree.map(lambda x: x, base)
        t["dense"] = {k: v + np.where(rng.random(v.shape) < 0.3, 0, 0.01).astype(v.dtype)
                      for k, v in base["dense"].items()}
        t["emb"] = {"embedding": (base["emb"]["embedding"].astype(np.float32)
                                  + 0.05 * rng.standard_normal((50, 8))).astype(
                                      ml_dtypes.bfloat16)}
        trees.append(t)
    ck = ocp.StandardCheckpointer()
    dirs = []
    for i, t in enumerate(trees):
        ck.save(str(tmp_path / f"ox{i}"), t)
        dirs.append(str(tmp_path / f"ox{i}"))
    ck.save(str(tmp_path / "oxbase"), base)
    ck.wait_until_finished()
    want = M.select(trees, key=jax.random.key(4), base=base, resample=1)
    out_ox = str(tmp_path / "ox2ox")
    S.merge_checkpoints(dirs, out_ox, method="select", base=str(tmp_path / "oxbase"), seed=4,
                        options={"resample": 1}, fmt="orbax", progress=False,
                        log=lambda s: None)
    restored = _orbax_restore(out_ox)
    assert set(restored) == {"dense", "emb", "step"}  # the input's tree structure
    _assert_same(_flat(restored), _flat(want))
    out_st = str(tmp_path / "ox2st")
    S.merge_checkpoints(dirs, out_st, method="select", base=str(tmp_path / "oxbase"), seed=4,
                        options={"resample": 1}, progress=False, log=lambda s: None)
    _assert_same(_load(out_st), _flat(want))  # tensor names are the leaf names


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A psm training workdir: K stacked replicas in checkpoints/<step>, the base in base/."""
    from psm.training import checkpoint, replicas
    from psm.training.pretrain import init_params
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_seq_len=32)
    root = tmp_path_factory.mktemp("workdir")
    _, base = init_params(cfg, 0)
    rng = np.random.default_rng(9)
    stacked = jax.tree.map(lambda x: x + 0.01 * rng.standard_normal(x.shape).astype(x.dtype)
                           * (rng.random(x.shape) < 0.7), replicas.stack(base, K))
    ck = checkpoint.Checkpointer(str(root / "checkpoints"), interval=1, keep=1)
    ck.save(4, {"params": stacked, "opt_state": {"mu": stacked}})
    ck.close()
    bk = checkpoint.Checkpointer(str(root / "base"), interval=1, keep=1)
    bk.save(10, base)
    bk.close()
    model = {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_layers",
                                          "num_heads", "num_kv_heads", "rope_theta",
                                          "tie_embeddings", "param_dtype", "dtype")}
    with open(root / "config.json", "w") as f:
        json.dump({"model": model, "task": {"max_len": 32}, "num_replicas": K}, f)
    return {"root": str(root), "cfg": cfg, "stacked": stacked, "base": base}


def test_workdir_to_hf_equals_trainer_merge(workdir, tmp_path):
    """A workdir's K replicas merge exactly as the trainer merges its stacked params."""
    from psm.models.hf_llama import load_hf_llama
    out = str(tmp_path / "hf")
    S.merge_checkpoints([workdir["root"]], out, method="select", seed=0,
                        options={"resample": 2}, progress=False, log=lambda s: None)
    want = M.select(workdir["stacked"], key=jax.random.key(0), base=workdir["base"], stacked=True,
                    resample=2)
    cfg, got = load_hf_llama(out)
    assert cfg.hidden_size == workdir["cfg"].hidden_size
    _assert_same(_flat(got), _flat(want))
    assert not np.array_equal(_flat(got)["embed/embedding"], _flat(workdir["base"])[
        "embed/embedding"])


@pytest.mark.oracle
def test_transformers_loads_workdir_output(workdir, tmp_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = str(tmp_path / "hf")
    S.merge_checkpoints([workdir["root"]], out, method="average", progress=False,
                        log=lambda s: None)
    want = _flat(M.average(workdir["stacked"], stacked=True))
    sd = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    np.testing.assert_array_equal(sd["model.layers.1.mlp.up_proj.weight"].numpy(),
                                  want["layers/1/mlp/up_proj/kernel"].T)
    np.testing.assert_array_equal(sd["model.embed_tokens.weight"].numpy(),
                                  want["embed/embedding"])


def test_workdir_to_orbax_and_hf_base(workdir, tmp_path):
    """Orbax output keeps the trainer's tree; a HF base serves psm-layout replicas."""
    from psm.models.hf_llama import save_hf_llama
    out = str(tmp_path / "ox")
    S.merge_checkpoints([workdir["root"]], out, method="task_arithmetic",
                        options={"scale": 0.5}, fmt="orbax", progress=False, log=lambda s: None)
    want = M.task_arithmetic(workdir["stacked"], workdir["base"], 0.5, stacked=True)
    restored = _orbax_restore(out)
    assert "value" in restored["embed"]["embedding"]  # the trainer's tree, NNX boxes included
    _assert_same(_flat(restored), _flat(want))
    hf_base = str(tmp_path / "hf_base")
    save_hf_llama(hf_base, workdir["cfg"], workdir["base"])
    out2 = str(tmp_path / "ties_hf_base")
    S.merge_checkpoints([workdir["root"]], out2, method="ties", base=hf_base, fmt="orbax",
                        options={"density": 0.5}, progress=False, log=lambda s: None)
    want2 = M.ties(workdir["stacked"], workdir["base"], 0.5, stacked=True)
    _assert_same(_flat(_orbax_restore(out2)), _flat(want2))


def test_replica_sharded_workdir_reads_one_replica_at_a_time(tmp_path):
    """Saved sharded over replicas, each replica is its own chunk: slices are read alone."""
    from jax.sharding import NamedSharding, PartitionSpec
    from psm.training import checkpoint
    mesh = jax.make_mesh((K,), ("replica",))
    rng = np.random.default_rng(3)
    params = {"dense": {"kernel": rng.standard_normal((K, 40, 24)).astype(np.float32)},
              "norm": {"scale": rng.standard_normal((K, 24)).astype(np.float32)}}
    sharded = jax.device_put(params, NamedSharding(mesh, PartitionSpec("replica")))
    root = tmp_path / "run"
    ck = checkpoint.Checkpointer(str(root / "checkpoints"), interval=1, keep=1)
    ck.save(2, {"params": sharded, "opt_state": {}})
    ck.close()
    (root / "config.json").write_text(json.dumps({"model": {}, "task": {}}))
    refs = S.open_input(str(root))
    assert len(refs) == K and set(refs[0].reader._chunk0.values()) == {1}
    out = str(tmp_path / "out")
    S.merge_checkpoints([str(root)], out, method="select", seed=5, progress=False,
                        log=lambda s: None)
    want = M.select(params, key=jax.random.key(5), stacked=True)  # the stacked tree, in memory
    _assert_same(_load(out), _flat(want))


def test_trainer_checkpoint_is_one_chunk_per_leaf(workdir):
    """The unsharded workdir stores each stacked leaf as one chunk: read once, sliced K times."""
    refs = S.open_input(workdir["root"])
    assert set(refs[0].reader._chunk0.values()) == {K}
    a = refs[0].read("layers/0/mlp/up_proj/kernel")
    b = refs[1].read("layers/0/mlp/up_proj/kernel")
    assert a.base is b.base is not None  # views of the one cached stacked leaf
    want = _flat(workdir["stacked"])["layers/0/mlp/up_proj/kernel"]
    np.testing.assert_array_equal(b, want[1])


def test_workdir_of_a_pretrained_hf_model(workdir, tmp_path):
    """A run fine-tuned from a HF folder: its config.json and tokenizer files are reused."""
    import shutil
    from psm.models.hf_llama import load_hf_llama, save_hf_llama
    hf_dir = str(tmp_path / "pretrained")
    save_hf_llama(hf_dir, workdir["cfg"], workdir["base"])
    (tmp_path / "pretrained" / "tokenizer_config.json").write_text('{"model_max_length": 32}')
    run = tmp_path / "run"
    shutil.copytree(os.path.join(workdir["root"], "checkpoints"), run / "checkpoints")
    (run / "config.json").write_text(json.dumps(
        {"model": {"init": "pretrained", "kind": "hf", "path": hf_dir}, "task": {}}))
    out = str(tmp_path / "out")
    summary = S.merge_checkpoints([str(run)], out, method="average", progress=False,
                                  log=lambda s: None)
    assert {"config.json", "tokenizer_config.json"} <= set(summary["files"])
    _, got = load_hf_llama(out)
    _assert_same(_flat(got), _flat(M.average(workdir["stacked"], stacked=True)))


def test_scan_layout_workdir(tmp_path):
    """Replicas trained with stacked layers ([K, L, ...] leaves): the HF output has one
    tensor per layer, and a HF base is stacked into the scan layout to serve them."""
    from psm.training import checkpoint, replicas
    from psm.models import llama
    from psm.models.hf_llama import load_hf_llama, save_hf_llama
    from psm.training.pretrain import init_params
    cfg = LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_layers=3,
                      num_heads=4, num_kv_heads=2, max_seq_len=32, scan_layers=True)
    _, base = init_params(cfg, 1)
    rng = np.random.default_rng(2)
    stacked = jax.tree.map(lambda x: x + 0.01 * rng.standard_normal(x.shape).astype(x.dtype)
                           * (rng.random(x.shape) < 0.7), replicas.stack(base, K))
    run = tmp_path / "run"
    ck = checkpoint.Checkpointer(str(run / "checkpoints"), interval=1, keep=1)
    ck.save(3, {"params": stacked, "opt_state": {}})
    ck.close()
    model = {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_layers",
                                          "num_heads", "num_kv_heads", "scan_layers")}
    (run / "config.json").write_text(json.dumps({"model": model, "task": {"max_len": 32}}))
    out = str(tmp_path / "hf")
    S.merge_checkpoints([str(run)], out, method="select", seed=1, progress=False,
                        log=lambda s: None)
    want = M.select(stacked, key=jax.random.key(1), stacked=True)
    _, got = load_hf_llama(out)  # list layout
    _assert_same(_flat(got), _flat(llama.to_canonical(want, cfg)))
    assert "model.layers.2.mlp.up_proj.weight" in _load(out)
    hf_base = str(tmp_path / "hf_base")
    save_hf_llama(hf_base, cfg, base)
    out2 = str(tmp_path / "ties")
    S.merge_checkpoints([str(run)], out2, method="ties", base=hf_base, fmt="orbax",
                        options={"density": 0.4}, progress=False, log=lambda s: None)
    _assert_same(_flat(_orbax_restore(out2)), _flat(M.ties(stacked, base, 0.4, stacked=True)))



# ---- persistent compilation cache of the command -------------------------------------------

@pytest.fixture(autouse=True)
def _compile_cache_in_tmp(tmp_path_factory, monkeypatch):
    """The command's default compilation cache goes to a temporary folder in
    every test of this module, never to ~/.cache."""
    monkeypatch.setenv("PSM_COMPILE_CACHE", str(tmp_path_factory.mktemp("jax_cache")))


def _compile_events(fn) -> dict:
    """Counts while fn runs: `compiles` (executables built or loaded), `hits`
    (loaded from the persistent cache), `written` (new cache entries)."""
    import jax.monitoring as mon
    counts = {"compiles": 0, "hits": 0, "written": 0}

    def on_duration(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            counts["compiles"] += 1

    def on_event(event, **kw):
        if event == "/jax/compilation_cache/cache_hits":
            counts["hits"] += 1
        elif event == "/jax/compilation_cache/cache_misses":  # recorded when an entry is written
            counts["written"] += 1

    mon.register_event_duration_secs_listener(on_duration)
    mon.register_event_listener(on_event)
    try:
        fn()
    finally:
        mon.unregister_event_duration_listener(on_duration)
        mon.unregister_event_listener(on_event)
    return counts


def test_compile_cache_rerun_compiles_nothing_and_opt_out_writes_nothing(
        hf, tmp_path, monkeypatch):
    """The command caches every executable it compiles (by default in
    $PSM_COMPILE_CACHE); a rerun in a fresh state (in-memory caches cleared, as
    in a new process) loads all of them from disk and compiles none;
    `--no-compile-cache` neither reads nor writes the folder. Outputs agree."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PSM_COMPILE_CACHE", str(cache))
    settings = (jax.config.jax_compilation_cache_dir,
                jax.config.jax_persistent_cache_min_compile_time_secs)
    args = ["--models=" + ",".join(hf["dirs"]), f"--base={hf['base_dir']}", "--method=ties",
            "--density=0.3", "--no-progress"]
    jax.clear_caches()
    first = _compile_events(lambda: merge_cli.run(args + [f"--out={tmp_path / 'a'}"]))
    entries = sorted(os.listdir(cache))
    assert first["compiles"] > 0 and first["hits"] == 0, first
    assert len(entries) == first["written"] == first["compiles"], (first, entries)
    jax.clear_caches()
    second = _compile_events(lambda: merge_cli.run(
        args + [f"--out={tmp_path / 'b'}", f"--compile_cache={cache}"]))
    assert second == {"compiles": first["compiles"], "hits": first["compiles"], "written": 0}
    assert sorted(os.listdir(cache)) == entries
    _assert_same(_load(str(tmp_path / "b")), _load(str(tmp_path / "a")))

    off = tmp_path / "off"
    monkeypatch.setenv("PSM_COMPILE_CACHE", str(off))
    jax.clear_caches()
    third = _compile_events(lambda: merge_cli.run(
        args + [f"--out={tmp_path / 'c'}", "--no-compile-cache"]))
    assert third["compiles"] == first["compiles"] and third["hits"] == third["written"] == 0
    assert not off.exists() or not os.listdir(off)
    _assert_same(_load(str(tmp_path / "c")), _load(str(tmp_path / "a")))
    # The settings of the process are restored after each run.
    assert (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs) == settings


def test_compile_cache_that_is_a_file_is_refused(hf, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    assert merge_cli.main(["--models=" + ",".join(hf["dirs"]), "--method=average",
                           f"--out={tmp_path / 'o'}", "--no-progress",
                           f"--compile-cache={blocker}"]) == 2
    assert not (tmp_path / "o").exists()
