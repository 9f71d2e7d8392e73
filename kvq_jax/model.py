"""Flax NNX Llama-family decoder (llama, qwen2) with an explicit functional KV cache.

`logits, cache = model(tokens, cache, n_new)`: the cache is a pytree passed in and returned, never
module state, so the model can be split (`nnx.split`) and merged inside a jitted decode loop.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvq_jax.attention import attention, rope
from kvq_jax.cache import KVCache
from kvq_jax.config import ModelConfig
from kvq_jax.errors import KvqError

Array = jax.Array


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight.get_value().astype(jnp.float32)).astype(x.dtype)


class Linear(nnx.Module):
    """`y = x @ w (+ b)`, w `[in, out]`."""

    def __init__(self, d_in: int, d_out: int, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (d_in, d_out), dtype) * (d_in ** -0.5))
        self.b = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x: Array) -> Array:
        y = x @ self.w.get_value()
        return y + self.b.get_value() if self.b is not None else y


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        hd = cfg.head_dim
        self.cfg = cfg
        self.wq = Linear(cfg.dim, cfg.n_heads * hd, cfg.qkv_bias, dtype, rngs)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * hd, cfg.qkv_bias, dtype, rngs)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * hd, cfg.qkv_bias, dtype, rngs)
        self.wo = Linear(cfg.n_heads * hd, cfg.dim, False, dtype, rngs)

    def qkv(self, x: Array, positions: Array) -> tuple[Array, Array, Array]:
        """x `[B, T, dim]` → q `[B, T, Hq, D]`, k, v `[B, T, Hkv, D]` with RoPE applied."""
        c = self.cfg
        b, t, _ = x.shape
        q = self.wq(x).reshape(b, t, c.n_heads, c.head_dim)
        k = self.wk(x).reshape(b, t, c.n_kv_heads, c.head_dim)
        v = self.wv(x).reshape(b, t, c.n_kv_heads, c.head_dim)
        return rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta), v

    def __call__(self, x, layer_cache, lengths, n_new, impl):
        b, t, _ = x.shape
        positions = lengths[:, None] + jnp.arange(t)[None, :]
        q, k, v = self.qkv(x, positions)
        out, layer_cache = attention(q, k, v, layer_cache, lengths, n_new, impl)
        return self.wo(out.reshape(b, t, -1)), layer_cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.w_gate = Linear(cfg.dim, cfg.hidden_dim, False, dtype, rngs)
        self.w_up = Linear(cfg.dim, cfg.hidden_dim, False, dtype, rngs)
        self.w_down = Linear(cfg.hidden_dim, cfg.dim, False, dtype, rngs)

    def __call__(self, x: Array) -> Array:
        return self.w_down(jax.nn.silu(self.w_gate(x)) * self.w_up(x))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        self.attn = Attention(cfg, dtype, rngs)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, rngs)

    def __call__(self, x, layer_cache, lengths, n_new, impl):
        h, layer_cache = self.attn(self.attn_norm(x), layer_cache, lengths, n_new, impl)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), layer_cache


class Transformer(nnx.Module):
    """Decoder-only transformer. Random init; use `load_params` for real weights."""

    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.cfg = cfg
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.dim), dtype) * 0.02)
        self.layers = nnx.List([Block(cfg, dtype, rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        self.lm_head = None if cfg.tie_embeddings else nnx.Param(
            jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.dim), dtype) * 0.02)  # [V, dim]

    def __call__(self, tokens: Array, cache: KVCache, n_new: Array | None = None,
                 attention_impl: str = "xla", last_only: bool = False) -> tuple[Array, KVCache]:
        """tokens `[B, T]` at positions `cache.lengths[b] + t`; n_new `[B]` real tokens (default T).

        Any T >= 1 at any fill: a prefill, a chunk of one, a new chat turn or a decode step (T == 1);
        row b's tokens past `n_new[b]` are padding, and a row with `n_new[b] == 0` is left as it was.
        Returns logits `[B, T, V]` (`[B, V]` of each row's last real token if `last_only`) and the
        cache holding the new tokens. Called eagerly, a call that would overflow the cache raises
        KvqError; under jit the caller checks (positions past the capacity are dropped, never wrapped).
        """
        x, cache = self.hidden(tokens, cache, n_new, attention_impl)
        if last_only:
            n = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32) if n_new is None else n_new
            x = jnp.take_along_axis(x, jnp.maximum(n - 1, 0)[:, None, None], axis=1)[:, 0]
        return self.logits(x), cache

    def hidden(self, tokens: Array, cache: KVCache, n_new: Array | None = None,
               attention_impl: str = "xla") -> tuple[Array, KVCache]:
        """The decoder up to the final norm: `[B, T, dim]` and the updated cache (see `__call__`)."""
        b, t = tokens.shape
        if n_new is None:
            n_new = jnp.full((b,), t, jnp.int32)
        check_room(cache, n_new)
        x = jnp.take(self.embed.get_value(), tokens, axis=0)
        new_layers = []
        for blk, layer_cache in zip(self.layers, cache.layers):
            x, layer_cache = blk(x, layer_cache, cache.lengths, n_new, attention_impl)
            new_layers.append(layer_cache)
        return self.final_norm(x), cache.replace(layers=tuple(new_layers), lengths=cache.lengths + n_new)

    def logits(self, x: Array) -> Array:
        """LM head: final-norm output `[..., dim]` → float32 logits `[..., V]`."""
        head = self.embed.get_value() if self.lm_head is None else self.lm_head.get_value()  # [V, dim]
        return (x @ head.T.astype(x.dtype)).astype(jnp.float32)


def check_room(cache: KVCache, n_new: Array) -> None:
    """Raises KvqError if appending `n_new [B]` tokens would overflow a concrete cache (no-op under jit)."""
    if isinstance(cache.lengths, jax.core.Tracer) or isinstance(n_new, jax.core.Tracer):
        return
    end = np.asarray(cache.lengths) + np.asarray(n_new)
    if end.max(initial=0) > cache.capacity:
        row = int(np.argmax(end))
        raise KvqError(f"row {row}: {int(np.asarray(cache.lengths)[row])} cached + "
                       f"{int(np.asarray(n_new)[row])} new tokens exceed the cache capacity of "
                       f"{cache.capacity} positions")


def load_params(model: Transformer, params: Mapping[str, np.ndarray]) -> None:
    """Copies a canonical parameter dict (see gguf_loader) into the model, checking every shape."""
    dtype = model.embed.get_value().dtype
    used: set[str] = set()

    def put(target: nnx.Param, key: str) -> None:
        if key not in params:
            raise KvqError(f"weights lack tensor {key!r}")
        arr = np.asarray(params[key])
        if arr.shape != target.get_value().shape:
            raise KvqError(f"tensor {key!r} has shape {arr.shape}, model expects {target.get_value().shape}")
        target.set_value(jnp.asarray(arr, dtype))
        used.add(key)

    put(model.embed, "embed")
    put(model.final_norm.weight, "final_norm")
    if model.lm_head is not None:
        put(model.lm_head, "lm_head")
    for i, blk in enumerate(model.layers):
        p = f"layers.{i}."
        put(blk.attn_norm.weight, p + "attn_norm")
        put(blk.mlp_norm.weight, p + "mlp_norm")
        for name in ("wq", "wk", "wv", "wo"):
            put(getattr(blk.attn, name).w, p + name)
        if model.cfg.qkv_bias:
            for name, bname in (("wq", "bq"), ("wk", "bk"), ("wv", "bv")):
                put(getattr(blk.attn, name).b, p + bname)
        for name in ("w_gate", "w_up", "w_down"):
            put(getattr(blk.mlp, name).w, p + name)
    extra = set(params) - used
    if extra:
        raise KvqError(f"weights hold unexpected tensors: {', '.join(sorted(extra)[:5])}")
