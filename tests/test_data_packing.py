"""Tokenization with a response-only loss mask, padding and packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from psm.data import packing, prompts
from psm.data.tokenize import (ByteTokenizer, TokenizedExample, Tokenizer, tokenize_pair,
                               tokenize_records)

TOK = ByteTokenizer()


def _ids(text):
    return [b + 3 for b in text.encode()]


def test_byte_tokenizer_is_a_tokenizer():
    assert isinstance(TOK, Tokenizer)
    assert TOK.decode(TOK.encode("héllo")) == "héllo"


def test_mask_covers_response_and_eos_only():
    ex, n = tokenize_pair(TOK, "Q:", " ab", max_len=32, example_id=7)
    assert ex.id == 7 and n == 1 + 2 + 3 + 1
    assert ex.tokens.tolist() == [1] + _ids("Q:") + _ids(" ab") + [2]
    assert ex.loss_mask.tolist() == [False] * 3 + [True] * 4
    assert not ex.truncated


def test_truncation_prompt_left_and_response_right():
    # 1 BOS + 6 prompt + 4 response + 1 EOS = 12 tokens, max_len 9: 3 too many.
    ex, n = tokenize_pair(TOK, "abcdef", "wxyz", max_len=9)
    assert n == 12 and len(ex) == 9
    assert ex.tokens.tolist() == [1] + _ids("def") + _ids("wxyz") + [2]
    assert (ex.prompt_dropped, ex.response_dropped) == (3, 0)
    assert ex.loss_mask.sum() == 5
    ex, _ = tokenize_pair(TOK, "abcdef", "wxyz", max_len=9, truncation="response_right")
    assert ex.tokens.tolist() == [1] + _ids("abcdef") + _ids("wx")
    assert (ex.prompt_dropped, ex.response_dropped) == (0, 3)  # EOS went first
    # The response alone is too long: the prompt goes, then the response's tail.
    ex, _ = tokenize_pair(TOK, "ab", "uvwxyz", max_len=5)
    assert ex.tokens.tolist() == [1] + _ids("uvwx")
    assert (ex.prompt_dropped, ex.response_dropped) == (2, 3)
    # The prompt alone is too long under response_right: no loss tokens left.
    ex, _ = tokenize_pair(TOK, "abcdefgh", "xy", max_len=5, truncation="response_right")
    assert ex.tokens.tolist() == [1] + _ids("efgh") and not ex.loss_mask.any()
    with pytest.raises(ValueError, match="example id 3: 12 tokens.*max_len=9"):
        tokenize_pair(TOK, "abcdef", "wxyz", max_len=9, truncation="error", example_id=3)
    with pytest.raises(ValueError, match="truncation='middle'"):
        tokenize_pair(TOK, "a", "b", max_len=9, truncation="middle")


def test_stats_count_every_truncation():
    recs = [{"id": 0, "question": "short", "answer": "#### 1"},
            {"id": 1, "question": "q" * 40, "answer": "#### 2"},
            {"id": 2, "question": "x", "answer": "y" * 60}]
    exs, stats = tokenize_records(TOK, recs, prompts.gsm8k, max_len=48)
    full = [1 + len(_ids(p)) + len(_ids(r)) + 1 for p, r in map(prompts.gsm8k, recs)]
    assert [e.id for e in exs] == [0, 1, 2]
    assert all(len(e) == min(n, 48) for e, n in zip(exs, full))
    assert stats.examples == 3 and stats.truncated == 2
    assert stats.prompt_truncated == 2 and stats.response_truncated == 1
    dropped = stats.prompt_tokens_dropped + stats.response_tokens_dropped
    assert dropped == sum(n - 48 for n in full if n > 48)
    assert stats.max_len_seen == max(full) and stats.no_loss_tokens == 0


def _example(i, n_prompt, n_resp, rng):
    toks = rng.integers(3, 259, size=1 + n_prompt + n_resp).astype(np.int32)
    toks[0] = 1
    mask = np.zeros(toks.shape, bool)
    mask[1 + n_prompt:] = True
    return TokenizedExample(i, toks, mask)


def test_pad_examples_layout():
    rng = np.random.default_rng(0)
    exs = [_example(10, 3, 2, rng), _example(11, 1, 4, rng)]
    b = packing.pad_examples(exs, 8)
    assert {k: v.shape for k, v in b.items()} == {
        "tokens": (2, 8), "targets": (2, 8), "loss_mask": (2, 8), "segment_ids": (2, 8),
        "positions": (2, 8), "example_ids": (2, 1)}
    t = exs[0].tokens
    assert b["tokens"][0].tolist() == t.tolist() + [0, 0]
    assert b["targets"][0].tolist() == t[1:].tolist() + [0, 0, 0]
    assert b["loss_mask"][0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]  # predicts the 2 response
    assert b["segment_ids"][0].tolist() == [1] * 6 + [0, 0]
    assert b["positions"][0].tolist()[:6] == list(range(6))
    assert b["example_ids"][:, 0].tolist() == [10, 11]
    with pytest.raises(ValueError, match="example id 10 has 6 tokens > seq_len=5"):
        packing.pad_examples(exs, 5)


def test_pack_keeps_order_and_segments():
    rng = np.random.default_rng(1)
    exs = [_example(i, p, r, rng) for i, (p, r) in enumerate([(2, 2), (1, 1), (3, 3), (1, 2)])]
    # lengths 5, 3, 7, 4; rows of 9 -> [5, 3], [7], [4]
    b = packing.pack_examples(exs, 9)
    assert b["example_ids"].tolist() == [[0, 1], [2, -1], [3, -1]]
    assert b["segment_ids"][0].tolist() == [1] * 5 + [2] * 3 + [0]
    assert b["positions"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0]
    # The last token of example 0 predicts nothing (not example 1's BOS).
    assert b["targets"][0, 4] == 0 and b["loss_mask"][0, 4] == 0
    assert b["targets"][0, 5:7].tolist() == exs[1].tokens[1:].tolist()
    b2 = packing.pack_examples(exs, 9, max_segments=1)
    assert b2["example_ids"].tolist() == [[0], [1], [2], [3]]
    padded = packing.pad_rows(b, 5)
    assert padded["tokens"].shape == (5, 9) and padded["example_ids"][3:].tolist() == [[-1, -1]] * 2
    assert padded["segment_ids"][3:].sum() == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=12),
       st.integers(14, 20), st.sampled_from([None, 2, 3]))
def test_pack_round_trip(sizes, seq_len, max_segments):
    rng = np.random.default_rng(len(sizes))
    exs = [_example(100 + i, p, r, rng) for i, (p, r) in enumerate(sizes)]
    b = packing.pack_examples(exs, seq_len, max_segments=max_segments)
    seen = []
    for n in range(b["tokens"].shape[0]):
        for s, eid in enumerate(b["example_ids"][n], start=1):
            if eid < 0:
                continue
            sel = b["segment_ids"][n] == s
            ex = exs[eid - 100]
            assert b["tokens"][n, sel].tolist() == ex.tokens.tolist()
            assert b["positions"][n, sel].tolist() == list(range(len(ex)))
            assert b["loss_mask"][n, sel].tolist() == ex.loss_mask[1:].tolist() + [0.0]
            seen.append(int(eid))
    assert seen == [e.id for e in exs]  # every example once, in order
    assert b["loss_mask"].sum() == sum(e.loss_mask[1:].sum() for e in exs)
    assert (b["loss_mask"][b["segment_ids"] == 0] == 0).all()


def test_attention_mask_rule():
    seg = np.array([[1, 1, 2, 2, 2, 0]])
    m = np.asarray(packing.attention_mask(seg))[0]
    for q in range(6):
        for k in range(6):
            assert m[q, k] == (k <= q and seg[0, q] == seg[0, k] != 0)


def _token_loss(logits, targets):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def test_packed_loss_equals_unpacked_with_llama():
    from flax import nnx

    from psm.models import llama
    cfg = llama.LlamaConfig(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64,
                            num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64)
    model = llama.Llama(cfg, rngs=nnx.Rngs(0))
    pairs = [("Question: 2+2?\nAnswer:", " 4"), ("Hi", " there, friend"),
             ("abc", " d"), ("Say yes.", " yes"), ("x" * 10, " y" * 4)]
    exs = [tokenize_pair(TOK, p, r, max_len=40, example_id=i)[0] for i, (p, r) in
           enumerate(pairs)]
    forward = nnx.jit(lambda m, t, p, s: m(t, positions=p, segment_ids=s))
    packed = packing.pack_examples(exs, 40, max_segments=4)
    assert packed["tokens"].shape[0] < len(exs)  # really packed
    losses = {}
    # Both batches get 5 rows and 4 id slots, so the forward pass compiles once.
    padded = packing.pad_examples(exs, 40)
    padded["example_ids"] = np.pad(padded["example_ids"], ((0, 0), (0, 3)), constant_values=-1)
    for name, b in (("padded", padded), ("packed", packing.pad_rows(packed, len(exs)))):
        logits = forward(model, jnp.asarray(b["tokens"]), jnp.asarray(b["positions"]),
                         jnp.asarray(b["segment_ids"]))
        tl = _token_loss(logits, jnp.asarray(b["targets"]))
        mean, count = packing.per_example_loss(tl, b["loss_mask"], b["segment_ids"],
                                               b["example_ids"].shape[1])
        losses[name] = packing.losses_by_id(mean, count, b["example_ids"])
    assert sorted(losses["packed"]) == list(range(len(exs)))
    for i in range(len(exs)):
        assert losses["packed"][i] == pytest.approx(losses["padded"][i], rel=1e-5, abs=1e-5)


def test_per_example_loss_matches_numpy():
    rng = np.random.default_rng(3)
    seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    mask = np.array([[0, 1, 0, 1, 0, 0], [1, 1, 1, 0, 0, 0]], np.float32)
    tl = rng.normal(size=seg.shape).astype(np.float32)
    mean, count = jax.jit(packing.per_example_loss, static_argnums=3)(tl, mask, seg, 3)
    assert np.asarray(count).tolist() == [[1, 1, 0], [3, 0, 0]]
    assert float(mean[0, 0]) == pytest.approx(tl[0, 1])
    assert float(mean[0, 1]) == pytest.approx(tl[0, 3])
    assert float(mean[1, 0]) == pytest.approx(tl[1, :3].mean(), rel=1e-6)
    assert float(mean[0, 2]) == 0.0
