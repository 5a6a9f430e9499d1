"""psm/training/checkpoint.py on small trees: what is saved, kept, found and restored."""

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from psm.training import checkpoint


def _state(seed=0):
    rng = np.random.default_rng(seed)
    return {"params": {"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
                       "h": jnp.asarray(rng.standard_normal(5), jnp.bfloat16)},
            "opt_state": {"count": jnp.asarray(7, jnp.int32)}}


def _steps(directory):
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


@pytest.mark.parametrize("kwargs,match", [
    ({"interval": 0, "keep": 1}, r"config.checkpoint.every_steps must be >= 1, got 0"),
    ({"interval": 1, "keep": 0}, r"config.checkpoint.keep must be >= 1, got 0"),
])
def test_bad_interval_or_keep_names_the_config_key(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        checkpoint.Checkpointer(str(tmp_path / "c"), **kwargs)
    assert not (tmp_path / "c").exists()


def test_should_save_every_interval_steps(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), interval=3, keep=1)
    assert [s for s in range(1, 11) if ckpt.should_save(s)] == [3, 6, 9]
    ckpt.close()


def test_latest_step_restore_and_keep(tmp_path):
    directory = str(tmp_path / "c")
    ckpt = checkpoint.Checkpointer(directory, interval=1, keep=2)
    assert ckpt.latest_step() is None
    states = {s: _state(s) for s in (2, 4, 6)}
    for s, state in states.items():
        ckpt.save(s, state)
        assert ckpt.latest_step() == s
    assert _steps(directory) == [4, 6]  # keep = 2: the oldest is gone
    # An older kept step restores its own state, not the latest.
    older = ckpt.restore(4, _state(99))
    np.testing.assert_array_equal(np.asarray(older["params"]["w"]),
                                  np.asarray(states[4]["params"]["w"]))
    restored = ckpt.restore(6, _state(99))
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(states[6])):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # Saving an existing step again is a no-op (a resumed run re-reaching it).
    ckpt.save(6, _state(123))
    np.testing.assert_array_equal(np.asarray(ckpt.restore(6, _state(0))["params"]["w"]),
                                  np.asarray(states[6]["params"]["w"]))
    ckpt.close()
    # A new Checkpointer on the same folder (a rerun) finds the latest step.
    again = checkpoint.Checkpointer(directory, interval=1, keep=2)
    assert again.latest_step() == 6
    again.close()


def test_restored_arrays_can_be_donated(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), interval=1, keep=1)
    ckpt.save(1, _state())
    restored = ckpt.restore(1, _state())
    step = jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t), donate_argnums=0)
    out = step(restored)
    assert int(out["opt_state"]["count"]) == 8
    ckpt.close()


def test_restore_tree_reads_a_saved_tree_and_names_a_wrong_folder(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), interval=1, keep=1)
    state = _state(3)
    ckpt.save(5, state)
    ckpt.close()
    path = str(tmp_path / "c" / "5" / "default")
    tree = checkpoint.restore_tree(path, state)
    assert tree["params"]["h"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(tree["params"]["w"]),
                                  np.asarray(state["params"]["w"]))
    with pytest.raises(ValueError, match=r"nowhere: no such orbax checkpoint folder"):
        checkpoint.restore_tree(str(tmp_path / "nowhere"), state)
    (tmp_path / "plain").mkdir()
    for i in range(6):
        (tmp_path / "plain" / f"model-{i}.safetensors").write_text("x")
    with pytest.raises(ValueError, match=r"plain is not an orbax checkpoint: it has no "
                                         r"_METADATA file \(it holds \['model-0.safetensors', "
                                         r"('model-\d.safetensors', ){3}'model-4.safetensors'\]\)$"):
        checkpoint.restore_tree(str(tmp_path / "plain"), state)
    other = {"params": {"w": jnp.zeros((3, 5))}}
    with pytest.raises(ValueError) as info:
        checkpoint.restore_tree(path, other)
    # One line: orbax's own first line (which dumps both trees after it), then the advice.
    first = str(info.value.__cause__).strip().splitlines()[0][:300]
    assert first and str(info.value) == (f"{path}: its tree does not match the config's model "
                                         f"({first}); pass the config it was saved with")
