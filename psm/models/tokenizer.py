"""Tokenizers: HF `tokenizer.json`, GGUF-embedded BPE, BERT WordPiece vocab files.

`Tokenizer` wraps a `tokenizers.Tokenizer` with the few facts the rest of the
code needs: special token ids, the chat template, whether a BOS is added,
and a check that every id fits the model's embedding rows.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from psm.models.safetensors_io import read_json, write_json

# GGUF token types (llama.cpp `llama_token_type`).
_GGUF_NORMAL, _GGUF_UNKNOWN, _GGUF_CONTROL, _GGUF_USER_DEFINED = 1, 2, 3, 4

# GGUF `tokenizer.ggml.pre` values this module can rebuild, and the HF
# pre-tokenizer each stands for (llama.cpp's regexes for these types).
_GGUF_PRE = {
    # GPT-2 byte-level split.
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    # SmolLM / StarCoder: every digit on its own, then the GPT-2 split.
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
}


def _token_str(tok: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or AddedToken dicts."""
    if tok is None or isinstance(tok, str):
        return tok
    if isinstance(tok, Mapping):
        return tok.get("content")
    raise ValueError(f"cannot read special token {tok!r}")


class Tokenizer:
    """Text <-> token ids, plus special ids and an optional chat template.

    Args:
      tok: the `tokenizers.Tokenizer` (its post-processor adds BOS/CLS/SEP
        where the model expects them).
      bos, eos, pad: special token strings (or None).
      chat_template: a jinja2 template string, or None.
    """

    def __init__(self, tok: tokenizers.Tokenizer, *, bos: str | None, eos: str | None,
                 pad: str | None, chat_template: str | None = None, unk: str | None = None):
        self.tok = tok
        self.bos, self.eos, self.pad, self.unk = bos, eos, pad, unk
        self.chat_template = chat_template
        for name in ("bos", "eos", "pad", "unk"):
            s = getattr(self, name)
            if s is not None and tok.token_to_id(s) is None:
                raise ValueError(f"{name} token {s!r} is not in the vocabulary")

    # -- ids ------------------------------------------------------------------

    def _id(self, s):
        return None if s is None else self.tok.token_to_id(s)

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos)

    @property
    def eos_id(self) -> int | None:
        return self._id(self.eos)

    @property
    def pad_id(self) -> int | None:
        return self._id(self.pad)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the highest id + 1)."""
        return self.tok.get_vocab_size(with_added_tokens=True)

    def check_fits(self, embedding_rows: int) -> None:
        """Raises ValueError when some token id would index past the embedding table."""
        if self.vocab_size > embedding_rows:
            raise ValueError(f"tokenizer has {self.vocab_size} tokens but the model's embedding "
                             f"has {embedding_rows} rows; ids >= {embedding_rows} would index "
                             "past it (wrong tokenizer for this model?)")

    # -- text -----------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_pair(self, a: str, b: str | None = None, *, max_len: int | None = None
                    ) -> tuple[list[int], list[int]]:
        """BERT-style input: `(ids, token_type_ids)` of `[CLS] a [SEP] b [SEP]`.

        With `max_len`, the longer of the two texts is truncated first.
        """
        if max_len is not None:
            self.tok.enable_truncation(max_len, strategy="longest_first")
        try:
            enc = self.tok.encode(a, b) if b is not None else self.tok.encode(a)
        finally:
            if max_len is not None:
                self.tok.no_truncation()
        return enc.ids, enc.type_ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], *,
                            add_generation_prompt: bool = False) -> str:
        """Renders chat messages (`[{"role", "content"}]`) with the model's template.

        Raises:
          ValueError: the tokenizer has no chat template, or jinja2 is missing.
        """
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (none in tokenizer_config.json "
                             "or the GGUF metadata)")
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ValueError("apply_chat_template needs the jinja2 package "
                             "(pip install jinja2)") from None

        def raise_exception(msg):
            raise ValueError(f"chat template: {msg}")

        # The settings HF transformers renders chat templates with.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self.bos or "", eos_token=self.eos or "")

    # -- construction -----------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        """From a HF folder: `tokenizer.json` (+ `tokenizer_config.json`), or a BERT `vocab.txt`.

        Raises:
          ValueError: neither file is present.
        """
        cfg_path = os.path.join(path, "tokenizer_config.json")
        tcfg = read_json(cfg_path) if os.path.isfile(cfg_path) else {}
        smap_path = os.path.join(path, "special_tokens_map.json")
        smap = read_json(smap_path) if os.path.isfile(smap_path) else {}

        def special(key):
            return _token_str(tcfg.get(key)) or _token_str(smap.get(key))

        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            tok = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
            # Some files pin padding/truncation (MiniLM: pad to 128); batching
            # code pads and truncates explicitly, so encode() returns raw ids.
            tok.no_padding()
            tok.no_truncation()
        elif os.path.isfile(os.path.join(path, "vocab.txt")):
            return cls.from_wordpiece_vocab(os.path.join(path, "vocab.txt"),
                                            lowercase=tcfg.get("do_lower_case", True))
        else:
            raise ValueError(f"no tokenizer.json or vocab.txt in {path}")
        template = tcfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))
        bos, eos = special("bos_token"), special("eos_token")
        if bos is None and eos is None and special("cls_token"):
            bos, eos = special("cls_token"), special("sep_token")  # BERT-style
        return cls(tok, bos=bos, eos=eos, pad=special("pad_token"), unk=special("unk_token"),
                   chat_template=template)

    @classmethod
    def from_wordpiece_vocab(cls, vocab_path: str, *, lowercase: bool = True) -> "Tokenizer":
        """A BERT WordPiece tokenizer from `vocab.txt` (`[CLS] a [SEP] b [SEP]` framing)."""
        tok = tokenizers.Tokenizer(models.WordPiece.from_file(vocab_path, unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase,
                                                    strip_accents=None if lowercase else False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        if cls_id is None or sep_id is None:
            raise ValueError(f"{vocab_path} lacks [CLS] or [SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
        tok.decoder = decoders.WordPiece()
        for s in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
            if tok.token_to_id(s) is not None:
                tok.add_special_tokens([tokenizers.AddedToken(s, special=True)])
        return cls(tok, bos="[CLS]", eos="[SEP]",
                   pad="[PAD]" if tok.token_to_id("[PAD]") is not None else None, unk="[UNK]")

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], where: str = "GGUF file") -> "Tokenizer":
        """Rebuilds the byte-level BPE tokenizer embedded in GGUF metadata.

        Args:
          meta: GGUF key -> python value (`tokenizer.ggml.tokens`, `.merges`,
            `.token_type`, `.model`, `.pre`, special ids, `tokenizer.chat_template`).
        Raises:
          ValueError: a tokenizer model or pre-tokenizer this module cannot rebuild.
        """
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"{where}: tokenizer.ggml.model {model!r} is not supported; "
                             "supported: 'gpt2' (byte-level BPE)")
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in _GGUF_PRE:
            raise ValueError(f"{where}: tokenizer.ggml.pre {pre!r} is not supported; "
                             f"supported: {sorted(_GGUF_PRE)}")
        tokens = list(meta["tokenizer.ggml.tokens"])
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        types = list(meta.get("tokenizer.ggml.token_type", [_GGUF_NORMAL] * len(tokens)))
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError(f"{where}: tokenizer.ggml.tokens has duplicate entries")
        tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
        tok.pre_tokenizer = _GGUF_PRE[pre]()
        tok.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|>, ...) must never be split by the BPE.
        tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == _GGUF_CONTROL])
        tok.add_tokens([tokenizers.AddedToken(t, normalized=False)
                        for t, ty in zip(tokens, types) if ty == _GGUF_USER_DEFINED])

        def tok_at(key):
            i = meta.get(key)
            return None if i is None or not 0 <= int(i) < len(tokens) else tokens[int(i)]

        bos = tok_at("tokenizer.ggml.bos_token_id")
        if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
        return cls(tok, bos=bos, eos=tok_at("tokenizer.ggml.eos_token_id"),
                   pad=tok_at("tokenizer.ggml.padding_token_id"),
                   unk=tok_at("tokenizer.ggml.unknown_token_id"),
                   chat_template=meta.get("tokenizer.chat_template"))

    # -- export ------------------------------------------------------------------

    def save(self, out_dir: str, *, model_max_length: int | None = None) -> list[str]:
        """Writes `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`."""
        os.makedirs(out_dir, exist_ok=True)
        self.tok.save(os.path.join(out_dir, "tokenizer.json"))
        specials = {k: v for k, v in (("bos_token", self.bos), ("eos_token", self.eos),
                                      ("pad_token", self.pad), ("unk_token", self.unk))
                    if v is not None}
        tcfg = {"tokenizer_class": "PreTrainedTokenizerFast",
                "clean_up_tokenization_spaces": False, **specials}
        if self.chat_template is not None:
            tcfg["chat_template"] = self.chat_template
        if model_max_length is not None:
            tcfg["model_max_length"] = model_max_length
        write_json(os.path.join(out_dir, "tokenizer_config.json"), tcfg)
        write_json(os.path.join(out_dir, "special_tokens_map.json"), specials)
        return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
