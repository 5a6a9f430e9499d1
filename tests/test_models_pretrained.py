"""Real pretrained weights shipped in pip packages: SmolLM2-135M (GGUF) and all-MiniLM-L6-v2.

Each test skips with a reason where its package is not installed.
"""

import functools
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from psm.models import bert, llama
from psm.models.decode import generate_text
from psm.models.gguf_llama import read_metadata
from psm.models.registry import load_pretrained, minilm_path, smollm2_gguf_path
from psm.models.tokenizer import Tokenizer

# Plain English; a correct float forward pass of SmolLM2-135M-Instruct (Q4_1)
# scores about 1.77 nats/token here, the same model with interleaved instead
# of rotate-half q/k rows (the GGUF order, not undone) about 3.36.
PASSAGE = ("Once upon a time, there was a little girl named Lily. She loved to play outside in "
           "the park with her friends. One day, she found a small red ball under a big tree. "
           "She picked it up and ran to show her mom. Her mom smiled and said, \"What a nice "
           "ball!\"")
NLL_BOUND = 2.2


def _need(locate):
    try:
        return locate()
    except ValueError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2():
    _need(smollm2_gguf_path)
    config, params, tok = load_pretrained({"kind": "smollm2", "scan_layers": True})
    return config, params, tok


@functools.partial(jax.jit, static_argnums=0)
def _mean_nll(graphdef, params, ids):
    logits = nnx.merge(graphdef, params)(ids[None, :-1])[0]
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, ids[1:, None], axis=1).mean()


def test_smollm2_config_and_tokenizer(smollm2):
    config, _, tok = smollm2
    assert config == llama.LlamaConfig(**llama.PRESETS["smollm2-135m"], scan_layers=True)
    assert tok.vocab_size == 49152 and tok.eos_id == tok.encode("<|im_end|>")[0]
    assert tok.encode("<|im_start|>user") == [1, 4093]
    assert tok.decode(tok.encode(PASSAGE)) == PASSAGE
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                   add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_nll_on_plain_english(smollm2):
    config, params, tok = smollm2
    graphdef = llama.abstract_model(config)[0]
    ids = jnp.asarray(tok.encode(PASSAGE))
    assert 55 < ids.shape[0] < 70
    nll = float(_mean_nll(graphdef, params, ids))
    assert nll < NLL_BOUND, nll
    # The same weights with q/k rows left in llama.cpp's interleaved order
    # score far worse: the bound separates a correct from a wrong rotary order.
    pure = nnx.to_pure_dict(params)
    attn = pure["layers"]["attn"]

    def interleave(kernel, n):  # [L, D, n*hd] columns -> GGUF order
        L, d, _ = kernel.shape
        return kernel.reshape(L, d, n, 2, -1).swapaxes(3, 4).reshape(kernel.shape)

    attn["q_proj"]["kernel"] = interleave(attn["q_proj"]["kernel"], config.num_heads)
    attn["k_proj"]["kernel"] = interleave(attn["k_proj"]["kernel"], config.num_kv_heads)
    wrong = llama.state_from_canonical(config.replace(scan_layers=False),
                                       llama.unstack_layers(pure))
    bad = float(_mean_nll(llama.abstract_model(config.replace(scan_layers=False))[0], wrong,
                          ids))
    assert bad > NLL_BOUND + 0.5, (nll, bad)


def test_smollm2_greedy_paris(smollm2):
    config, params, tok = smollm2
    graphdef = llama.abstract_model(config)[0]
    out = generate_text(graphdef, params, tok, ["The capital of France is"], max_new_tokens=3)
    assert out[0].startswith(" Paris"), out


@pytest.mark.oracle
def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer():
    path = _need(smollm2_gguf_path)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                    gguf_file=os.path.basename(path))
    ours = Tokenizer.from_gguf_metadata(read_metadata(gguf.GGUFReader(path)))
    for text in [PASSAGE, "In 2024, 17 cats ate 3.5 kg!", "  spaces\tand\nlines  ",
                 "naïve café ünïcode 東京", "<|im_start|>user\nHi<|im_end|>"]:
        assert ours.encode(text) == hf(text)["input_ids"], text


# ---------------------------------------------------------------------------
# all-MiniLM-L6-v2

SENTENCES = ["A man is eating food.", "The new movie is awesome!",
             "Two dogs play in the snow near a frozen lake, chasing each other."]


@pytest.fixture(scope="module")
def minilm():
    path = _need(minilm_path)
    config, params, tok = load_pretrained({"kind": "minilm"})
    return path, config, params, tok


def _embed(config, params, tok, sentences):
    enc = [tok.encode(s) for s in sentences]
    t = max(map(len, enc))
    ids = np.array([e + [tok.pad_id] * (t - len(e)) for e in enc])
    mask = np.array([[1] * len(e) + [0] * (t - len(e)) for e in enc])
    graphdef = bert.abstract_model(config)[0]
    emb = jax.jit(lambda p, i, m: bert.sentence_embedding(nnx.merge(graphdef, p), i, m))(
        params, jnp.asarray(ids), jnp.asarray(mask))
    return ids, mask, np.asarray(emb)


def test_minilm_tokenizers_agree(minilm):
    path, config, _, tok = minilm
    vocab_only = Tokenizer.from_wordpiece_vocab(f"{path}/vocab.txt")
    assert config.vocab_size == tok.vocab_size == 30522
    for s in SENTENCES + ["Hello, WORLD! 3.14 naïve"]:
        assert vocab_only.encode(s) == tok.encode(s)
    ids, types = tok.encode_pair("first one", "second")
    assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 2 and types[-1] == 1


def test_minilm_embeddings_similarity(minilm):
    _, config, params, tok = minilm
    _, _, emb = _embed(config, params, tok, SENTENCES + ["A man is eating a meal."])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sims = emb @ emb.T
    assert sims[0, 3] > 0.7 > sims[0, 1]  # paraphrase close, unrelated far


@pytest.mark.oracle
def test_minilm_embeddings_match_transformers(minilm):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path, config, params, tok = minilm
    ids, mask, emb = _embed(config, params, tok, SENTENCES)
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    enc = hf_tok(SENTENCES, padding=True, return_tensors="pt")
    np.testing.assert_array_equal(enc["input_ids"].numpy(), ids)
    model = transformers.AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=1)
    np.testing.assert_allclose(emb, want.numpy(), atol=1e-4, rtol=0)
