"""psm.merge against mergekit 0.1.5 on tiny Llama checkpoints written by transformers.

One module-scoped fixture writes a base and three fine-tuned checkpoints
(safetensors). mergekit runs in memory (`merge_state_dicts`) for most cases and
once through the `mergekit-yaml` CLI, offline. Our trees are flat dicts keyed
by tensor name, so psm's leaf names equal the checkpoint's tensor names.
"""

import os
import shutil
import subprocess

import jax
import numpy as np
import pytest
from scipy import stats

from psm import merge as M

pytestmark = pytest.mark.oracle

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("mergekit")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from mergekit.merge_methods.api import merge_state_dicts  # noqa: E402

N_FT = 3
ATOL = 1e-6


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Paths and numpy state dicts of a base and N_FT fine-tuned tiny Llamas."""
    root = tmp_path_factory.mktemp("llamas")
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(root / "base", safe_serialization=True)
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i in range(N_FT):
        gen = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                b = base_sd[name]
                delta = 0.02 * torch.randn(b.shape, generator=gen)
                keep = torch.rand(b.shape, generator=gen) < 0.7  # 30% stay at the base value
                p.copy_(b + delta * keep)
        model.save_pretrained(root / f"ft{i}", safe_serialization=True)
    load = lambda d: safetensors_numpy.load_file(str(root / d / "model.safetensors"))  # noqa: E731
    return {"root": root, "base": load("base"), "models": [load(f"ft{i}") for i in range(N_FT)]}


def _mergekit(ckpt, method, parameters, with_base=True):
    inputs = {f"m{i}": {k: torch.from_numpy(v) for k, v in sd.items()}
              for i, sd in enumerate(ckpt["models"])}
    per_model = {k: v for k, v in parameters.items() if isinstance(v, list)}
    params = {k: v for k, v in parameters.items() if not isinstance(v, list)}
    params.update({k: {f"m{i}": x for i, x in enumerate(v)} for k, v in per_model.items()})
    if with_base:
        inputs["base"] = {k: torch.from_numpy(v) for k, v in ckpt["base"].items()}
    out = merge_state_dicts(inputs, method, parameters=params,
                            base="base" if with_base else None,
                            dtype=torch.float32, out_dtype=torch.float32)
    return {k: v.numpy() for k, v in out.items()}


def _close(ours, theirs):
    assert set(ours) == set(theirs)
    worst = 0.0
    for name in theirs:
        assert ours[name].dtype == np.float32
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=ATOL, err_msg=name)
        worst = max(worst, float(np.max(np.abs(ours[name] - theirs[name]))))
    return worst


@pytest.mark.parametrize("weights", [None, [0.2, 0.3, 0.5]])
def test_average_matches_linear(ckpt, weights):
    theirs = _mergekit(ckpt, "linear", {"weight": weights or [1.0] * N_FT}, with_base=False)
    _close(M.average(ckpt["models"], weights), theirs)


@pytest.mark.parametrize("weights, lam", [([1.0, 1.0, 1.0], 1.0), ([0.5, 1.0, -0.3], 0.7)])
def test_task_arithmetic(ckpt, weights, lam):
    theirs = _mergekit(ckpt, "task_arithmetic", {"weight": weights, "lambda": lam})
    _close(M.task_arithmetic(ckpt["models"], ckpt["base"], lam, weights), theirs)


@pytest.mark.parametrize("density, weights, lam", [
    (0.5, [1.0, 1.0, 1.0], 1.0), ([0.3, 0.6, 0.9], [0.2, 1.0, 0.7], 0.8)])
def test_ties(ckpt, density, weights, lam):
    dens = density if isinstance(density, list) else [density] * N_FT
    theirs = _mergekit(ckpt, "ties", {"weight": weights, "density": dens, "lambda": lam})
    ours = M.ties(ckpt["models"], ckpt["base"], density, weights, scale=lam)
    _close(ours, theirs)
    # The trim really ran: density 1 gives a different model.
    untrimmed = M.ties(ckpt["models"], ckpt["base"], 1.0, weights, scale=lam)
    name = "model.layers.0.mlp.up_proj.weight"
    assert np.max(np.abs(untrimmed[name] - theirs[name])) > 1e-3


def test_ties_normalize_off(ckpt):
    w = [0.5, 1.0, 0.25]
    theirs = _mergekit(ckpt, "ties", {"weight": w, "density": [0.4] * N_FT,
                                      "normalize": False})
    _close(M.ties(ckpt["models"], ckpt["base"], 0.4, w, normalize=False), theirs)


@pytest.mark.parametrize("combine", ["linear", "ties"])
@pytest.mark.parametrize("weights, lam", [([1.0, 1.0, 1.0], 1.0), ([0.5, 1.0, -0.3], 0.7)])
def test_dare_without_drop(ckpt, combine, weights, lam):
    theirs = _mergekit(ckpt, f"dare_{combine}", {"weight": weights, "density": [1.0] * N_FT,
                                                   "lambda": lam})
    for rescale in ("inverse", "l1"):
        ours = M.dare(ckpt["models"], ckpt["base"], 0.0, key=jax.random.key(0),
                      weights=weights, scale=lam, rescale=rescale, combine=combine)
        _close(ours, theirs)


def test_dare_dropping_statistically(ckpt):
    """density 0.6 on one model: same keep rate, same L1-preserving rescale."""
    torch.manual_seed(123)
    theirs = _mergekit({**ckpt, "models": ckpt["models"][:1]}, "dare_linear",
                       {"weight": [1.0], "density": [0.6]})
    ours = M.dare(ckpt["models"][:1], ckpt["base"], 0.4, key=jax.random.key(1), rescale="l1")
    kept = {"ours": [0, 0], "theirs": [0, 0]}
    for name, b in ckpt["base"].items():
        tau = ckpt["models"][0][name] - b
        nz = tau != 0
        for who, out in (("ours", ours[name]), ("theirs", theirs[name])):
            d = out - b
            k = (d != 0) & nz
            kept[who][0] += int(k.sum())
            kept[who][1] += int((~k & nz).sum())
            # L1 norm of the task vector preserved per tensor; survivors are
            # tau times one per-tensor factor (checked where base + tau * f does
            # not round tau away).
            np.testing.assert_allclose(np.abs(d).sum(), np.abs(tau).sum(), rtol=1e-4)
            sel = k & (np.abs(tau) > 1e-2 * np.abs(b))
            ratio = d[sel] / tau[sel]
            np.testing.assert_allclose(ratio, np.median(ratio), rtol=1e-3)
            assert 1.2 < np.median(ratio) < 2.2  # about 1 / 0.6
    total = sum(kept["ours"])
    for who in kept:
        rate = kept[who][0] / total
        assert abs(rate - 0.6) < 5 * np.sqrt(0.24 / total), (who, rate)
    assert stats.chi2_contingency(np.array([kept["ours"], kept["theirs"]]))[1] > 1e-4


def test_mergekit_yaml_cli_ties(ckpt, tmp_path):
    exe = shutil.which("mergekit-yaml") or os.path.join(
        os.path.dirname(os.path.abspath(os.sys.executable)), "mergekit-yaml")
    if not os.path.exists(exe):
        pytest.skip("mergekit-yaml not on PATH")
    root = ckpt["root"]
    weights, dens = [0.3, 1.0, 0.6], [0.25, 0.5, 0.75]
    lines = ["models:"]
    for i in range(N_FT):
        lines += [f"  - model: {root / f'ft{i}'}",
                  f"    parameters: {{weight: {weights[i]}, density: {dens[i]}}}"]
    lines += [f"base_model: {root / 'base'}", "merge_method: ties",
              "parameters: {normalize: true, lambda: 0.9}", "dtype: float32",
              "out_dtype: float32"]
    cfg = tmp_path / "ties.yml"
    cfg.write_text("\n".join(lines) + "\n")
    out_dir = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([exe, str(cfg), str(out_dir), "--device", "cpu", "--no-copy-tokenizer",
                    "--quiet"], check=True, env=env, capture_output=True, timeout=300)
    theirs = safetensors_numpy.load_file(str(out_dir / "model.safetensors"))
    _close(M.ties(ckpt["models"], ckpt["base"], dens, weights, scale=0.9), theirs)
