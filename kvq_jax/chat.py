"""Multi-turn chat over one continued cache: each turn prefills only its own tokens.

    chat = ChatSession(model, tok, kv=parse_kv("K4V2", model.cfg.n_layers), capacity=4096)
    chat.send("What is the capital of France?")   # -> "The capital of France is Paris."
    chat.send("And of Italy?")                    # attends to the cached first turn
    chat.stats()                                  # tokens cached, cache bytes, bits per element
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from kvq_jax.cache import KVCache, init_cache
from kvq_jax.decode import check_prefill_chunk, generate
from kvq_jax.errors import KvqError
from kvq_jax.model import Transformer
from kvq_jax.plan import DenseKV, KVPlan
from kvq_jax.sampling import SamplerConfig
from kvq_jax.tokenizer import Tokenizer


class TextStream:
    """Turns generated ids into text pieces as they come, holding back a split multi-byte character."""

    def __init__(self, tok: Tokenizer, write: Callable[[str], None]) -> None:
        self.tok, self.write = tok, write
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, toks: np.ndarray, emit: np.ndarray) -> None:
        """A decode-loop stream callback for row 0: `(tokens [B], emitted [B])`."""
        if bool(emit[0]):
            self.ids.append(int(toks[0]))
            s = self.tok.decode(self.ids)
            if not s.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                self.write(s[self.printed:])
                self.printed = len(s)

    def finish(self, text: str) -> None:
        """Writes what of the final `text` has not been written yet."""
        self.write(text[self.printed:])
        self.printed = len(text)


class _Relay:
    """The stream callable a session hands to the compiled decode loop: always the same object (the
    loop is compiled once per callable), forwarding to the current turn's target."""

    def __init__(self) -> None:
        self.target: Callable[[np.ndarray, np.ndarray], None] | None = None

    def __call__(self, toks: np.ndarray, emit: np.ndarray) -> None:
        if self.target is not None:
            self.target(toks, emit)


class ChatSession:
    """A conversation whose history lives in one (quantized) cache; `send` prefills only the new turn.

    The chat template renders the whole conversation each turn, and only the text past what the cache
    already holds is tokenized and fed (in compiled calls of `prefill_chunk` tokens, so turns reuse
    one compiled step). A file without a template gets ChatML.
    """

    def __init__(self, model: Transformer, tok: Tokenizer, *, kv: KVPlan | DenseKV = DenseKV("float32"),
                 capacity: int | None = None, system: str | None = None, max_new_tokens: int = 256,
                 sampler: SamplerConfig = SamplerConfig(), seed: int = 0, attention_impl: str = "auto",
                 prefill_chunk: int = 64, mesh: Any = None) -> None:
        cfg = model.cfg
        capacity = cfg.max_seq_len if capacity is None else capacity
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= cfg.max_seq_len:
            raise KvqError(f"--capacity must be in [1, {cfg.max_seq_len}] (the model's context), got {capacity}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise KvqError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        self.model, self.tok, self.kv = model, tok, kv
        self.capacity, self.system, self.max_new_tokens = capacity, system, max_new_tokens
        self.sampler, self.seed, self.attention_impl = sampler, seed, attention_impl
        self.prefill_chunk = check_prefill_chunk(prefill_chunk)
        self._relay = _Relay()
        self.mesh = mesh  # one row: its heads over `model`, its long cache over `seq`
        if mesh is not None:
            from kvq_jax.sharding import prepare

            prepare(model, mesh, 1)
        self.reset()

    def reset(self) -> None:
        """Forgets the conversation: an empty cache (same layout, nothing recompiles)."""
        self.messages: list[dict[str, str]] = [] if self.system is None else [
            {"role": "system", "content": self.system}]
        self.ids: list[int] = []  # the tokens the cache holds, in order
        self._text = ""  # the text those tokens spell
        self.turns = 0
        self.cache: KVCache = init_cache(self.model.cfg, self.kv, 1, self.capacity,
                                         self.model.embed.get_value().dtype, mesh=self.mesh)

    @property
    def tokens_left(self) -> int:
        return self.capacity - len(self.ids)

    def next_turn(self, text: str) -> tuple[str, list[int]]:
        """The rendered conversation with `text` as the next user turn, and the tokens `send(text)`
        would prefill: those of the rendering past what the cache holds."""
        if not isinstance(text, str) or not text.strip():
            raise KvqError("empty message")
        full = self.tok.apply_chat_template(self.messages + [{"role": "user", "content": text}])
        if not full.startswith(self._text):
            raise KvqError("the chat template does not extend the cached conversation (reset the session)")
        return full, self.tok.encode(full[len(self._text):], add_bos=False)

    def send(self, text: str, *, max_new_tokens: int | None = None,
             stream: Callable[[str], None] | None = None) -> str:
        """Appends a user turn, generates the reply (streamed as text pieces to `stream`) and caches it.

        A turn that does not fit raises KvqError and leaves the session as it was.
        """
        max_new = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        full, ids = self.next_turn(text)
        if len(ids) + max_new > self.tokens_left:
            raise KvqError(f"this turn needs {len(ids)} prompt + up to {max_new} reply tokens, but only "
                           f"{self.tokens_left} of the {self.capacity} positions are left (/reset to start over)")
        if len(self.ids) + len(ids) + max_new > self.model.cfg.max_seq_len:
            raise KvqError(f"this turn would pass the model's context of {self.model.cfg.max_seq_len} tokens")
        text_stream = TextStream(self.tok, stream) if stream is not None else None
        self._relay.target = text_stream
        try:
            res = generate(self.model, [ids], max_new_tokens=max_new, sampler=self.sampler,
                           seed=(self.seed + self.turns) % 2**32, attention_impl=self.attention_impl,
                           stream=self._relay, cache=self.cache, prefill_chunk=self.prefill_chunk)
        finally:
            self._relay.target = None
        reply_ids = res.tokens[0]
        reply = self.tok.decode(reply_ids)
        if text_stream is not None:
            text_stream.finish(reply)
        self.cache = res.cache
        self.ids += ids + reply_ids
        self._text = full + self.tok.decode(reply_ids, skip_special=False)
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        self.turns += 1
        return reply

    def stats(self) -> dict[str, Any]:
        """Tokens cached, tokens left, cache bytes and bits per K/V element of the capacity."""
        c = self.model.cfg
        nbytes = self.cache.nbytes()
        elems = 2 * c.n_layers * c.n_kv_heads * c.head_dim * self.capacity
        return {"turns": self.turns, "tokens_cached": len(self.ids), "tokens_left": self.tokens_left,
                "capacity": self.capacity, "cache_bytes": nbytes, "bits_per_element": nbytes * 8 / elems}
