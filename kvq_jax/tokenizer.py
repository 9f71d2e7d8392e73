"""Tokenizer: byte-level BPE or SentencePiece (HF `tokenizers`), special ids, chat template."""

from __future__ import annotations

import datetime
import json
import os
import re
from typing import Any, Mapping, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from kvq_jax.errors import KvqError

# Split regexes as llama.cpp / HF tokenizer.json spell them.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GGUF `tokenizer.ggml.pre` values grouped by the HF pre-tokenizer they stand for.
_PRE_GPT2 = {"default", "gpt2", "gpt-2"}
_PRE_DIGITS = {"smollm", "starcoder", "refact", "codeshell"}
_PRE_QWEN2 = {"qwen2", "deepseek-r1-qwen"}
_PRE_LLAMA3 = {"llama-bpe", "llama3"}

# llama.cpp's `tokenizer.ggml.token_type` values.
_TOKEN_UNKNOWN = 2
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4
_SPM_SPACE = "\u2581"  # SentencePiece's visible space, "▁"

_SYSTEM_IN_TEMPLATE = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.S)


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` with BOS/EOS ids and a chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        bos_id: int | None = None,
        eos_ids: Sequence[int] = (),
        chat_template: str | None = None,
        add_bos_token: bool = False,
    ) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.chat_template = chat_template or None
        # What the model's own files ask for; encode() still takes add_bos explicitly.
        self.add_bos_token = add_bos_token

    # ------------------------------------------------------------------ basics
    @property
    def uses_bos(self) -> bool:
        """Whether the model's files ask for BOS in front of raw text (Gemma, Llama 2/3; not SmolLM2)."""
        return self.add_bos_token and self.bos_id is not None

    @property
    def has_chat_format(self) -> bool:
        """A template of its own, or ChatML's tokens for the fallback; a base model has neither."""
        return self.chat_template is not None or self.token_id("<|im_start|>") is not None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special tokens (the ones `decode(skip_special=True)` drops), content -> id."""
        return {
            t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.special
        }

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Text -> ids. Special tokens written in the text (`<|im_start|>`) map to their single id."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise KvqError("add_bos requested but the tokenizer has no BOS token")
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def _token_str(self, i: int | None) -> str:
        return "" if i is None else (self.backend.id_to_token(i) or "")

    # ------------------------------------------------------------------ chat
    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Renders `messages` ([{"role", "content"}, ...]) with the model's chat template.

        Uses jinja2 when available (as HF does); otherwise, or without a template, ChatML.
        """
        for m in messages:
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(
                m.get("content"), str
            ):
                raise KvqError("chat messages must be dicts with string 'role' and 'content'")
        if self.chat_template is not None:
            try:
                import jinja2  # noqa: F401
            except ImportError:
                pass
            else:
                return self._render_jinja(messages, add_generation_prompt)
        return self._render_chatml(messages, add_generation_prompt)

    def chat_prompt(self, user_text: str) -> str:
        """A one-turn chat prompt ending with the assistant header."""
        return self.apply_chat_template([{"role": "user", "content": user_text}])

    def _render_jinja(self, messages: Sequence[Mapping[str, Any]], add_gen: bool) -> str:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg: str) -> None:
            raise jinja2.TemplateError(msg)

        # The same environment HF transformers renders chat templates with.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(
            x, indent=indent, ensure_ascii=False
        )
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_gen,
                bos_token=self._token_str(self.bos_id),
                eos_token=self._token_str(self.eos_ids[0] if self.eos_ids else None),
            )
        except jinja2.TemplateError as e:
            raise KvqError(f"chat template failed: {_one_line(e)}") from None

    def _render_chatml(self, messages: Sequence[Mapping[str, Any]], add_gen: bool) -> str:
        out = []
        default_sys = _SYSTEM_IN_TEMPLATE.search(self.chat_template or "")
        if default_sys and (not messages or messages[0]["role"] != "system"):
            out.append(f"<|im_start|>system\n{default_sys.group(1)}<|im_end|>\n")
        out += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
        if add_gen:
            out.append("<|im_start|>assistant\n")
        return "".join(out)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> "Tokenizer":
        """Rebuilds the tokenizer stored in GGUF `tokenizer.ggml.*` metadata.

        `tokenizer.ggml.model` 'gpt2' is byte-level BPE with merges; 'llama' is SentencePiece BPE
        (Llama 2, Gemma), whose merges are recovered from the token scores.
        """
        model = meta.get("tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise KvqError(
                f"unsupported GGUF tokenizer model {model!r} "
                "(supported: byte-level BPE 'gpt2', SentencePiece 'llama')"
            )
        tokens = list(meta.get("tokenizer.ggml.tokens") or ())
        if not tokens:
            raise KvqError("GGUF metadata lacks tokenizer.ggml.tokens")
        types = [int(t) for t in (meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))]
        if len(types) != len(tokens):
            raise KvqError("GGUF tokenizer.ggml.token_type and tokens differ in length")
        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)  # a duplicated string keeps its first id

        def opt_id(key: str) -> int | None:
            v = meta.get(key)
            return None if v is None else int(v)

        if model == "gpt2":
            backend = _gguf_bpe_backend(vocab, meta)
            special_types = {_TOKEN_CONTROL}
            add_bos_default = False
        else:
            unk_id = opt_id("tokenizer.ggml.unknown_token_id")
            backend = _gguf_spm_backend(vocab, tokens, meta, unk_id)
            # llama.cpp matches <unk> written in the text too; it also adds BOS to a
            # SentencePiece vocabulary whose file does not say otherwise.
            special_types = {_TOKEN_CONTROL, _TOKEN_UNKNOWN}
            add_bos_default = True
        added = [
            AddedToken(tokens[i], special=types[i] in special_types, normalized=False)
            for i in range(len(tokens))
            if types[i] in special_types or types[i] == _TOKEN_USER_DEFINED
        ]
        backend.add_tokens(added)

        eos_ids: list[int] = []
        # <end_of_turn> ends Gemma chat turns and <|im_end|> ChatML ones; neither is the file's EOS.
        for i in (opt_id("tokenizer.ggml.eos_token_id"), opt_id("tokenizer.ggml.eot_token_id"),
                  vocab.get("<end_of_turn>"), vocab.get("<|im_end|>")):
            if i is not None and i not in eos_ids:
                eos_ids.append(i)
        return cls(
            backend,
            bos_id=opt_id("tokenizer.ggml.bos_token_id"),
            eos_ids=eos_ids,
            chat_template=meta.get("tokenizer.chat_template"),
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        )

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, config: Mapping[str, Any] | None = None
    ) -> "Tokenizer":
        """Loads an HF `tokenizer.json`.

        `config` is a `tokenizer_config.json`-like dict: `chat_template`, `bos_token` /
        `bos_token_id`, `eos_token` / `eos_token_id` (int or list), `add_bos_token`.
        """
        if not os.path.isfile(path):
            raise KvqError(f"tokenizer file not found: {path}")
        try:
            backend = tokenizers.Tokenizer.from_file(os.fspath(path))
        except Exception as e:  # tokenizers raises plain Exception on bad JSON
            raise KvqError(f"cannot read tokenizer {path}: {_one_line(e)}") from None
        config = dict(config or {})

        def tok_id(value: Any) -> int | None:
            if isinstance(value, Mapping):  # {"content": "<s>", ...} in older configs
                value = value.get("content")
            if isinstance(value, str):
                return backend.token_to_id(value)
            return None if value is None else int(value)

        bos_id = tok_id(config.get("bos_token_id"))
        if bos_id is None:
            bos_id = tok_id(config.get("bos_token"))
        eos_ids: list[int] = []
        raw = config.get("eos_token_id")
        for v in [*(raw if isinstance(raw, list) else [raw]), config.get("eos_token"), "<|im_end|>"]:
            i = tok_id(v)
            if i is not None and i not in eos_ids:
                eos_ids.append(i)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        return cls(
            backend,
            bos_id=bos_id,
            eos_ids=eos_ids,
            chat_template=template if isinstance(template, str) else None,
            add_bos_token=bool(config.get("add_bos_token", False)),
        )


def _gguf_bpe_backend(vocab: dict[str, int], meta: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """Byte-level BPE ('gpt2') from the file's merges and pre-tokenizer name."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    pairs = []
    for m in meta.get("tokenizer.ggml.merges") or ():
        parts = m.split(" ", 1)
        if len(parts) != 2:
            raise KvqError(f"malformed GGUF merge {m!r}")
        pairs.append((parts[0], parts[1]))
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                   ignore_merges=pre in _PRE_LLAMA3)
    )
    _set_byte_level_pipeline(backend, pre)
    return backend


def _gguf_spm_backend(
    vocab: dict[str, int], tokens: Sequence[str], meta: Mapping[str, Any], unk_id: int | None
) -> tokenizers.Tokenizer:
    """SentencePiece BPE ('llama') as HF's Llama/Gemma converters and llama.cpp's SPM build it.

    Text becomes "▁"-spaced pieces merged best-score first; characters outside the vocabulary
    fall back to `<0xNN>` byte tokens.
    """
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        # Without scores nothing says which merge comes first.
        raise KvqError("unsupported GGUF tokenizer model 'llama' without tokenizer.ggml.scores")
    scores = [float(x) for x in scores]
    if len(scores) != len(tokens):
        raise KvqError("GGUF tokenizer.ggml.scores and tokens differ in length")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=_spm_merges(vocab, tokens, scores), fuse_unk=True,
                   byte_fallback=True, unk_token=unk)
    )
    # No pre-tokenizer: SentencePiece merges across the whole span between added tokens.
    replace = normalizers.Replace(" ", _SPM_SPACE)
    unspace = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", False):
        # Llama 2: a dummy "▁" starts each span, and decoding drops the one at the start.
        backend.normalizer = normalizers.Sequence([normalizers.Prepend(_SPM_SPACE), replace])
        backend.decoder = decoders.Sequence([*unspace, decoders.Strip(" ", 1, 0)])
    else:  # Gemma
        backend.normalizer = replace
        backend.decoder = decoders.Sequence(unspace)
    return backend


def _spm_merges(
    vocab: Mapping[str, int], tokens: Sequence[str], scores: Sequence[float]
) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies, best first.

    Every split of a token into two vocabulary pieces is a merge, ranked by the token's score
    (highest first), then by token id and the pieces' ids -- the order HF's
    SentencePieceExtractor gives. One dict lookup per split: ~1 s for a 262k vocabulary.
    """
    get = vocab.get
    ranked: list[tuple[float, int, int, int]] = []
    for tok, i in vocab.items():
        neg = -scores[i]
        for k in range(1, len(tok)):
            left = get(tok[:k])
            if left is not None:
                right = get(tok[k:])
                if right is not None:
                    ranked.append((neg, i, left, right))
    ranked.sort()
    return [(tokens[left], tokens[right]) for _, _, left, right in ranked]


def _set_byte_level_pipeline(backend: tokenizers.Tokenizer, pre: str) -> None:
    """Installs the HF pre-tokenizer that llama.cpp's `tokenizer.ggml.pre` names."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_GPT2:
        backend.pre_tokenizer = byte_level
    elif pre in _PRE_DIGITS:
        # SmolLM2's tokenizer.json: single digits, then GPT-2's regex.
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in _PRE_QWEN2 or pre in _PRE_LLAMA3:
        split = _QWEN2_SPLIT if pre in _PRE_QWEN2 else _LLAMA3_SPLIT
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        if pre in _PRE_QWEN2:
            backend.normalizer = normalizers.NFC()  # as Qwen2's tokenizer.json
    else:
        raise KvqError(f"unsupported GGUF pre-tokenizer {pre!r}")
    backend.decoder = decoders.ByteLevel()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__
