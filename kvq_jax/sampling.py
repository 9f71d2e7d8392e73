"""Next-token samplers: greedy, temperature, top-k and top-p, with explicit PRNG keys."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvq_jax.errors import KvqError

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """temperature 0 means greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and self.temperature < float("inf")):
            raise KvqError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise KvqError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise KvqError(f"--top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: Array, top_k: Array, top_p: Array) -> Array:
    """Masks logits `[B, V]` outside the top-k set and outside the smallest top-p nucleus."""
    v = logits.shape[-1]
    srt = jnp.sort(logits, axis=-1)[:, ::-1]  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(srt, jnp.broadcast_to(k - 1, (logits.shape[0], 1)), axis=-1)
    probs = jax.nn.softmax(srt, axis=-1)
    # Keep a token while the mass strictly before it is < top_p (the first token always stays).
    before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 1)
    pth = jnp.take_along_axis(srt, n_keep - 1, axis=-1)
    cut = jnp.maximum(kth, pth)
    return jnp.where(logits >= cut, logits, -jnp.inf)


def sample(logits: Array, key: Array, cfg: SamplerConfig) -> Array:
    """Draws one token per row from logits `[B, V]` → `[B]` int32."""
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = logits.astype(jnp.float32) / cfg.temperature
    if cfg.top_k > 0 or cfg.top_p < 1.0:
        # A top-k beyond the vocabulary keeps every token (and must not overflow int32).
        k = min(cfg.top_k, logits.shape[-1])
        x = filter_logits(x, jnp.int32(k), jnp.float32(cfg.top_p))
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)
