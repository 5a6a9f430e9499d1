"""BERT encoder: masking, pooling helpers, dropout, config checks, transformers parity."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from psm.models import bert
from psm.models.bert import Bert, BertConfig, l2_normalize, mean_pool
from psm.models.hf_bert import load_hf_bert
from psm.models.registry import load_pretrained

CFG = BertConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                 intermediate_size=64, max_position_embeddings=24)


@functools.partial(jax.jit, static_argnums=0)
def _fwd(graphdef, state, tokens, type_ids, mask, key=None):
    return nnx.merge(graphdef, state)(tokens, type_ids, mask, dropout_key=key)


def run(model, tokens, type_ids=None, mask=None, key=None):
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(tokens)
    type_ids = jnp.zeros_like(tokens) if type_ids is None else jnp.asarray(type_ids)
    mask = jnp.ones_like(tokens) if mask is None else jnp.asarray(mask)
    return _fwd(graphdef, state, tokens, type_ids, mask, key)


def test_padding_does_not_change_real_tokens():
    model = Bert(CFG, rngs=nnx.Rngs(0))
    tok = np.array([[2, 7, 9, 11, 3]])
    padded = np.array([[2, 7, 9, 11, 3, 0, 0, 0]])
    mask = np.array([[1] * 5 + [0] * 3])
    np.testing.assert_allclose(run(model, padded, mask=mask)[:, :5], run(model, tok), atol=1e-5)
    # The mask matters: attending to the pads changes the result.
    assert not np.allclose(run(model, padded)[:, :5], run(model, tok), atol=1e-3)


def test_mean_pool_and_normalize():
    h = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
    m = jnp.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(mean_pool(h, m), np.stack([np.asarray(h[0, :2]).mean(0),
                                                          np.asarray(h[1, 0])]))
    x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]])


def test_classifier_head_and_dropout():
    cfg = CFG.replace(num_labels=3)
    model = Bert(cfg, rngs=nnx.Rngs(0))
    tok = np.array([[2, 7, 9, 3], [2, 5, 3, 0]])
    mask = (tok > 0).astype(np.int32)
    logits = run(model, tok, mask=mask)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    np.testing.assert_array_equal(logits, run(model, tok, mask=mask))  # deterministic
    k = jax.random.key(1)
    drop = run(model, tok, mask=mask, key=k)
    assert not np.allclose(drop, logits)
    np.testing.assert_array_equal(drop, run(model, tok, mask=mask, key=k))


def test_config_checks():
    with pytest.raises(ValueError, match="num_labels == 1"):
        CFG.replace(num_labels=2, problem_type="regression")
    with pytest.raises(ValueError, match="hidden_act"):
        CFG.replace(hidden_act="swish")
    with pytest.raises(ValueError, match=r"BertConfig.param_dtype must be one of"):
        CFG.replace(param_dtype="float64")
    with pytest.raises(ValueError, match="position_embedding_type"):
        BertConfig.from_hf_config({"vocab_size": 5, "hidden_size": 4, "num_hidden_layers": 1,
                                   "num_attention_heads": 1, "intermediate_size": 8,
                                   "position_embedding_type": "relative_key"})


# ---------------------------------------------------------------------------
# transformers parity (oracle)


def _hf_bert(path, num_labels=3):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=24, initializer_range=0.2,
                                  num_labels=num_labels)
    model = transformers.BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model


def _batch():
    tok = np.array([[2, 7, 9, 11, 4, 3, 8, 3], [2, 5, 6, 3, 0, 0, 0, 0]])
    types = np.array([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]])
    return tok, types, (tok > 0).astype(np.int64)


@pytest.mark.oracle
@pytest.mark.parametrize("num_labels", [3, 1])
def test_classifier_matches_transformers(tmp_path, num_labels):
    import torch
    hf = _hf_bert(tmp_path, num_labels)
    config, params, tok = load_pretrained({"kind": "hf", "path": str(tmp_path)})
    assert tok is None and config.num_labels == num_labels
    assert config.problem_type == ("regression" if num_labels == 1
                                   else "single_label_classification")
    tokens, types, mask = _batch()
    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(tokens), token_type_ids=torch.as_tensor(types),
                 attention_mask=torch.as_tensor(mask), output_hidden_states=True)
    model = nnx.merge(bert.abstract_model(config)[0], params)
    got = run(model, tokens, types, mask)
    assert np.abs(out.logits.numpy()).max() > 0.1
    np.testing.assert_allclose(got, out.logits.numpy(), atol=1e-4, rtol=0)
    hidden = jax.jit(lambda s: nnx.merge(bert.abstract_model(config)[0], s).encode(
        jnp.asarray(tokens), jnp.asarray(types), jnp.asarray(mask)))(params)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[real],
                               out.hidden_states[-1].numpy()[real], atol=1e-4, rtol=0)


@pytest.mark.oracle
def test_encoder_checkpoint_gets_fresh_head_and_bad_tensors_are_named(tmp_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=24)
    transformers.BertModel(cfg).save_pretrained(tmp_path)
    config, params = load_hf_bert(str(tmp_path), num_labels=2, seed=3)
    assert config.num_labels == 2 and config.add_pooler
    assert nnx.to_pure_dict(params)["classifier"]["kernel"].shape == (32, 2)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "hidden_size": 16}))
    with pytest.raises(ValueError, match=r"embeddings.word_embeddings.weight has shape "
                                         r"\(50, 32\), expected \(50, 16\)"):
        load_hf_bert(str(tmp_path))
