"""HF safetensors and GGUF import/export of the Llama family, and bad inputs.

The `oracle` tests compare with `transformers` on tiny random checkpoints that
transformers itself writes; the GGUF tests write small GGUF files with the
`gguf` package, permuting q/k rows the way llama.cpp's converter does.
"""

import functools
import json
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file
from tokenizers import pre_tokenizers

from psm.models import llama
from psm.models.gguf_llama import load_gguf_llama, unpermute_qk
from psm.models.hf_llama import load_hf_llama, save_hf_llama
from psm.models.llama import Llama, LlamaConfig
from psm.models.registry import load_pretrained

TINY = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=4, num_kv_heads=2, rope_theta=500.0, rms_norm_eps=1e-5,
                   max_seq_len=64)


@functools.partial(jax.jit, static_argnums=0)
def _fwd(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def ours(config, params, tokens):
    return np.asarray(_fwd(llama.abstract_model(config)[0], params, jnp.asarray(tokens)))


def _tokens(vocab, b=2, t=12, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (b, t))


def _random_params(config, seed=0):
    """Random list-layout params with norm scales != 1 and O(1) logits."""
    model = Llama(config.replace(scan_layers=False), rngs=nnx.Rngs(seed))
    pure = nnx.to_pure_dict(nnx.split(model)[1])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(
        rng.uniform(0.5, 1.5, x.shape) if x.ndim == 1 else np.asarray(x) * 5.0, x.dtype), pure)


# ---------------------------------------------------------------------------
# transformers parity (oracle)


def _hf_llama(path, *, kv, tied, theta, shard=None):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv, rope_theta=theta,
        tie_word_embeddings=tied, max_position_embeddings=64, rms_norm_eps=1e-5,
        initializer_range=0.2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norm scales away from 1 so a mixed-up norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kw)
    return model


def _hf_logits(model, tokens):
    import torch
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()


@pytest.mark.oracle
@pytest.mark.parametrize("kv, tied, theta", [(4, False, 10_000.0), (2, True, 10_000.0),
                                             (1, False, 500.0), (2, True, 500.0)])
def test_hf_llama_import_matches_transformers(tmp_path, kv, tied, theta):
    hf = _hf_llama(tmp_path, kv=kv, tied=tied, theta=theta)
    config, params = load_hf_llama(str(tmp_path))
    assert (config.num_kv_heads, config.tie_embeddings, config.rope_theta) == (kv, tied, theta)
    tokens = _tokens(101)
    want = _hf_logits(hf, tokens)
    got = ours(config, params, tokens)
    assert np.abs(want).max() > 1.0  # O(1) logits, so 1e-4 is a real bound
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.oracle
def test_hf_llama_sharded_import_into_scan_layout(tmp_path):
    hf = _hf_llama(tmp_path, kv=2, tied=False, theta=10_000.0, shard="30KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    config, params = load_hf_llama(str(tmp_path), scan_layers=True)
    assert nnx.to_pure_dict(params)["layers"]["attn"]["q_proj"]["kernel"].shape == (2, 32, 32)
    tokens = _tokens(101)
    np.testing.assert_allclose(ours(config, params, tokens), _hf_logits(hf, tokens),
                               atol=1e-4, rtol=0)


@pytest.mark.oracle
@pytest.mark.parametrize("tied, scan, shard", [(False, False, None), (True, True, 20_000)])
def test_export_loads_in_transformers_with_same_logits(tmp_path, tied, scan, shard):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = TINY.replace(tie_embeddings=tied, scan_layers=scan)
    params = llama.state_from_canonical(config, _random_params(config))
    files = save_hf_llama(str(tmp_path), config, params, max_shard_bytes=shard or 2 ** 31)
    assert ("model.safetensors.index.json" in files) == bool(shard)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    tokens = _tokens(101)
    want = ours(config, params, tokens)
    np.testing.assert_allclose(_hf_logits(hf, tokens), want, atol=1e-4, rtol=0)
    # ... and our own loader reads it back exactly.
    config2, params2 = load_hf_llama(str(tmp_path))
    assert config2 == config.replace(scan_layers=False)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(params2),
                 llama.to_canonical(params, config))


# ---------------------------------------------------------------------------
# HF import/export without torch: bad inputs


@pytest.fixture
def exported(tmp_path):
    """A tiny HF Llama folder written by our exporter."""
    path = tmp_path / "ckpt"
    save_hf_llama(str(path), TINY, llama.state_from_canonical(TINY, _random_params(TINY)))
    return path


def test_unsupported_architecture_is_named(exported):
    cfg = json.loads((exported / "config.json").read_text())
    (exported / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"],
                                                      "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*supported: \['LlamaForCausalLM', "
                                         r"'BertModel', 'BertForSequenceClassification'\]"):
        load_pretrained({"kind": "hf", "path": str(exported)})


def test_missing_and_unexpected_tensors_are_named(exported):
    f = exported / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.1.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, str(f))
    with pytest.raises(ValueError) as e:
        load_hf_llama(str(exported))
    msg = str(e.value)
    assert "missing tensors ['model.layers.1.mlp.up_proj.weight']" in msg
    assert "unexpected tensors ['model.layers.1.mlp.extra.weight']" in msg


def test_shape_mismatch_is_named(exported):
    cfg = json.loads((exported / "config.json").read_text())
    (exported / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.down_proj.weight has shape "
                                         r"\(32, 64\), expected \(32, 48\) \(parameter "
                                         r"layers/0/mlp/down_proj/kernel\)"):
        load_hf_llama(str(exported))


def test_missing_shard_is_named(exported):
    (exported / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors listed"):
        load_hf_llama(str(exported))


def test_export_rejects_bad_params_without_writing(tmp_path):
    pure = _random_params(TINY)
    pure["layers"][0]["attn"]["q_proj"]["kernel"] = jnp.zeros((32, 31))
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="layers/0/attn/q_proj/kernel has shape"):
        save_hf_llama(str(out), TINY, pure)
    assert not out.exists()


def test_export_bfloat16_round_trip(tmp_path):
    params = _random_params(TINY)
    save_hf_llama(str(tmp_path), TINY, params, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    config, loaded = load_hf_llama(str(tmp_path), param_dtype="bfloat16")
    got = nnx.to_pure_dict(loaded)["layers"][1]["mlp"]["down_proj"]["kernel"]
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        got, params["layers"][1]["mlp"]["down_proj"]["kernel"].astype(jnp.bfloat16))


# ---------------------------------------------------------------------------
# GGUF


def llama_cpp_permute(w, n_head):
    """HF -> GGUF q/k row order, as in llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte-level symbols
MERGES = ["Ġ t", "h e", "Ġt he"]
CONTROL = ["<|endoftext|>", "<|im_start|>"]
GGUF_TOKENS = ALPHABET + ["Ġt", "he", "Ġthe"] + CONTROL  # 261 tokens
GGUF_CONFIG = TINY.replace(vocab_size=len(GGUF_TOKENS))


def write_gguf(path, config, pure, *, quant=None, tokens=GGUF_TOKENS, override=None):
    """A llama GGUF from list-layout params (HF row order for q/k, permuted here)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(config.num_layers)
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in CONTROL else 1 for t in tokens])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|endoftext|>"))
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}")

    def add(name, x, q=None):
        x = np.asarray(x, np.float32)
        q = (override or {}).get(name, q)
        if q is None:
            w.add_tensor(name, x)
        elif q == gguf.GGMLQuantizationType.Q8_1:  # no numpy (de)quantizer: raw bytes
            block, nbytes = gguf.GGML_QUANT_SIZES[q]
            raw = np.zeros((x.shape[0], x.shape[-1] // block * nbytes), np.uint8)
            w.add_tensor(name, raw, raw_dtype=q)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, q), raw_dtype=q)

    add("token_embd.weight", pure["embed"]["embedding"])
    for i in range(config.num_layers):
        lp, pre = pure["layers"][i], f"blk.{i}."
        add(pre + "attn_norm.weight", lp["attn_norm"]["scale"])
        add(pre + "ffn_norm.weight", lp["mlp_norm"]["scale"])
        add(pre + "attn_q.weight", llama_cpp_permute(
            np.asarray(lp["attn"]["q_proj"]["kernel"]).T, config.num_heads), quant)
        add(pre + "attn_k.weight", llama_cpp_permute(
            np.asarray(lp["attn"]["k_proj"]["kernel"]).T, config.num_kv_heads), quant)
        add(pre + "attn_v.weight", np.asarray(lp["attn"]["v_proj"]["kernel"]).T, quant)
        add(pre + "attn_output.weight", np.asarray(lp["attn"]["o_proj"]["kernel"]).T, quant)
        for p in ("gate", "up", "down"):
            add(pre + f"ffn_{p}.weight", np.asarray(lp["mlp"][f"{p}_proj"]["kernel"]).T, quant)
    add("output_norm.weight", pure["final_norm"]["scale"])
    if not config.tie_embeddings:
        add("output.weight", np.asarray(pure["lm_head"]["kernel"]).T)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(2 * 8 * 3).reshape(16, 3)
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, 2), 2), w)
    assert not np.array_equal(llama_cpp_permute(w, 2), w)


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_float_import_matches_source_model(tmp_path, tied):
    config = GGUF_CONFIG.replace(tie_embeddings=tied)
    pure = _random_params(config)
    path = write_gguf(tmp_path / "m.gguf", config, pure)
    got_cfg, params, tok = load_gguf_llama(str(path))
    assert got_cfg == config
    # Host arrays, contiguous: the trainer places them split over its mesh without any
    # device holding the whole model first (psm.training.replicas.place_base).
    assert all(isinstance(x, np.ndarray) and x.flags.c_contiguous
               for x in jax.tree.leaves(params))
    tokens = _tokens(config.vocab_size)
    want = ours(config, llama.state_from_canonical(config, pure), tokens)
    np.testing.assert_allclose(ours(config, params, tokens), want, atol=1e-5, rtol=0)
    # Skipping the un-permutation would give other logits (the test can fail).
    assert not np.allclose(llama_cpp_permute(np.asarray(
        pure["layers"][0]["attn"]["q_proj"]["kernel"]).T, 4).T,
        pure["layers"][0]["attn"]["q_proj"]["kernel"])


def test_gguf_q8_0_import_is_close_and_scan_layout_works(tmp_path):
    pure = _random_params(GGUF_CONFIG)
    path = write_gguf(tmp_path / "q.gguf", GGUF_CONFIG, pure, quant=gguf.GGMLQuantizationType.Q8_0)
    config, params, _ = load_gguf_llama(str(path), scan_layers=True)
    k = nnx.to_pure_dict(params)["layers"]["attn"]["k_proj"]["kernel"]
    assert k.shape == (2, 32, 16)
    ref = np.asarray(pure["layers"][1]["attn"]["k_proj"]["kernel"])
    err = np.abs(np.asarray(k[1]) - ref).max()
    assert 0 < err < 0.01 * np.abs(ref).max()  # 8-bit blocks: ~0.4% of the block max


def test_gguf_tokenizer(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", GGUF_CONFIG, _random_params(GGUF_CONFIG))
    _, _, tok = load_gguf_llama(str(path))
    ids = tok.encode("the theme<|im_start|>")
    assert [GGUF_TOKENS[i] for i in ids] == ["t", "he", "Ġthe", "m", "e", "<|im_start|>"]
    assert tok.decode(ids) == "the theme<|im_start|>"
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (260, 259, 261)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>hi"


def test_gguf_unreadable_quant_type_is_named(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", GGUF_CONFIG, _random_params(GGUF_CONFIG),
                      override={"blk.1.ffn_up.weight": gguf.GGMLQuantizationType.Q8_1})
    with pytest.raises(ValueError, match=r"blk.1.ffn_up.weight has quantization type Q8_1, "
                                         r"which this loader cannot dequantize"):
        load_gguf_llama(str(path))


def test_gguf_tokenizer_larger_than_embedding_is_rejected(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", GGUF_CONFIG, _random_params(GGUF_CONFIG),
                      tokens=GGUF_TOKENS + ["<extra>"])
    with pytest.raises(ValueError, match="tokenizer has 262 tokens but the model's embedding "
                                         "has 261 rows"):
        load_gguf_llama(str(path))
