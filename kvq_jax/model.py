"""Flax NNX decoders (llama, qwen2, gemma3: one block per architecture) with a functional KV cache.

`logits, cache = model(tokens, cache, n_new)`: the cache is a pytree passed in and returned, never
module state, so the model can be split (`nnx.split`) and merged inside a jitted decode loop.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvq_jax.attention import attention
from kvq_jax.rotations import rope
from kvq_jax.cache import KVCache, check_room
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


class Taps(NamedTuple):
    """What one layer's attention saw and produced, for the analysis: q `[B, T, Hq, D]`, k before and
    after RoPE and v `[B, T, Hkv, D]`, the attention output before W_o `[B, T, Hq, D]`."""

    q: Array
    k_pre: Array
    k: Array
    v: Array
    out: Array


class Attention(nnx.Module):
    """Q/K/V projections, RoPE (and per-head QK-norm where the architecture has it), the cache."""

    def __init__(self, cfg: ModelConfig, layer: int, dtype: jnp.dtype, rngs: nnx.Rngs, qk_norm: bool = False):
        hd = cfg.head_dim
        self.cfg = cfg
        self.theta, self.scaling = cfg.rope(layer)
        self.wq = Linear(cfg.dim, cfg.n_heads * hd, cfg.qkv_bias, dtype, rngs)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * hd, cfg.qkv_bias, dtype, rngs)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * hd, cfg.qkv_bias, dtype, rngs)
        self.wo = Linear(cfg.n_heads * hd, cfg.dim, False, dtype, rngs)
        self.q_norm = RMSNorm(hd, cfg.norm_eps, dtype) if qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps, dtype) if qk_norm else None

    def project(self, x: Array) -> tuple[Array, Array, Array]:
        """x `[B, T, dim]` → q `[B, T, Hq, D]`, k, v `[B, T, Hkv, D]` before RoPE (after QK-norm)."""
        c = self.cfg
        b, t, _ = x.shape
        q = self.wq(x).reshape(b, t, c.n_heads, c.head_dim)
        k = self.wk(x).reshape(b, t, c.n_kv_heads, c.head_dim)
        v = self.wv(x).reshape(b, t, c.n_kv_heads, c.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def qkv(self, x: Array, positions: Array) -> tuple[Array, Array, Array]:
        """x `[B, T, dim]` → q `[B, T, Hq, D]`, k, v `[B, T, Hkv, D]` with RoPE applied."""
        q, k, v = self.project(x)
        return rope(q, positions, self.theta, self.scaling), rope(k, positions, self.theta, self.scaling), v

    def __call__(self, x, layer_cache, lengths, n_new, impl, probe=None):
        b, t, _ = x.shape
        positions = lengths[:, None] + jnp.arange(t)[None, :]
        q, k_pre, v = self.project(x)
        q, k = rope(q, positions, self.theta, self.scaling), rope(k_pre, positions, self.theta, self.scaling)
        out, layer_cache = attention(q, k, v, layer_cache, lengths, n_new, impl, self.cfg.scale)
        if probe is not None:  # the analysis differentiates the loss by the attention output here
            out = out + probe.astype(out.dtype)
        return self.wo(out.reshape(b, t, -1)), layer_cache, Taps(q, k_pre, k, v, out)

    def params(self, prefix: str) -> dict[str, nnx.Param]:
        p = {prefix + n: getattr(self, n).w for n in ("wq", "wk", "wv", "wo")}
        if self.cfg.qkv_bias:
            p.update({prefix + b: getattr(self, n).b for n, b in (("wq", "bq"), ("wk", "bk"), ("wv", "bv"))})
        if self.q_norm is not None:
            p.update({prefix + "q_norm": self.q_norm.weight, prefix + "k_norm": self.k_norm.weight})
        return p


class MLP(nnx.Module):
    """Gated MLP: `down(act(gate(x)) * up(x))` with SiLU (SwiGLU) or tanh-approximated GELU (GeGLU)."""

    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs, gelu: bool = False):
        self.w_gate = Linear(cfg.dim, cfg.hidden_dim, False, dtype, rngs)
        self.w_up = Linear(cfg.dim, cfg.hidden_dim, False, dtype, rngs)
        self.w_down = Linear(cfg.hidden_dim, cfg.dim, False, dtype, rngs)
        self.gelu = gelu

    def __call__(self, x: Array) -> Array:
        g = self.w_gate(x)
        g = jax.nn.gelu(g, approximate=True) if self.gelu else jax.nn.silu(g)
        return self.w_down(g * self.w_up(x))

    def params(self, prefix: str) -> dict[str, nnx.Param]:
        return {prefix + n: getattr(self, n).w for n in ("w_gate", "w_up", "w_down")}


class Block(nnx.Module):
    """Llama / Qwen2 block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, cfg: ModelConfig, layer: int, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        self.attn = Attention(cfg, layer, dtype, rngs)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, rngs)

    def __call__(self, x, layer_cache, lengths, n_new, impl, probe=None):
        h, layer_cache, taps = self.attn(self.attn_norm(x), layer_cache, lengths, n_new, impl, probe)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), layer_cache, taps

    def params(self, prefix: str) -> dict[str, nnx.Param]:
        return {prefix + "attn_norm": self.attn_norm.weight, prefix + "mlp_norm": self.mlp_norm.weight,
                **self.attn.params(prefix), **self.mlp.params(prefix)}


class Gemma3Block(nnx.Module):
    """Gemma 3 block: norms before and after attention and the GeGLU MLP, QK-norm, local or global
    attention per `cfg.local_layers`. Norm weights are multipliers (HF's `1 + w`, as GGUF stores them)."""

    def __init__(self, cfg: ModelConfig, layer: int, dtype: jnp.dtype, rngs: nnx.Rngs):
        norm = lambda: RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        self.attn_norm, self.post_attn_norm, self.mlp_norm, self.post_mlp_norm = norm(), norm(), norm(), norm()
        self.attn = Attention(cfg, layer, dtype, rngs, qk_norm=True)
        self.mlp = MLP(cfg, dtype, rngs, gelu=True)

    def __call__(self, x, layer_cache, lengths, n_new, impl, probe=None):
        h, layer_cache, taps = self.attn(self.attn_norm(x), layer_cache, lengths, n_new, impl, probe)
        x = x + self.post_attn_norm(h)
        return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x))), layer_cache, taps

    def params(self, prefix: str) -> dict[str, nnx.Param]:
        norms = ("attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm")
        return {**{prefix + n: getattr(self, n).weight for n in norms}, **self.attn.params(prefix),
                **self.mlp.params(prefix)}


ARCH_BLOCKS = {"llama": Block, "qwen2": Block, "gemma3": Gemma3Block}


class Transformer(nnx.Module):
    """Decoder-only transformer (llama, qwen2, gemma3). Random init; use `load_params` for real weights."""

    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.cfg = cfg
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.dim), dtype) * 0.02)
        block = ARCH_BLOCKS[cfg.arch]
        self.layers = nnx.List([block(cfg, i, dtype, rngs) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        self.lm_head = None if cfg.tie_embeddings else nnx.Param(
            jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.dim), dtype) * 0.02)  # [V, dim]
        # Gemma scales the embeddings by sqrt(dim), rounded to the compute dtype as the reference does.
        self.embed_scale = math.sqrt(cfg.dim) if cfg.arch == "gemma3" else None

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
        x, cache, _ = self.forward(tokens, cache, n_new, attention_impl)
        return x, cache

    def forward(self, tokens: Array, cache: KVCache, n_new: Array | None = None, attention_impl: str = "xla",
                probes: Sequence[Array] | None = None) -> tuple[Array, KVCache, tuple[Taps, ...]]:
        """The one forward pass: `hidden`, plus each layer's `Taps`; `probes [B, T, Hq, D]` per layer are
        added to the attention outputs (zeros, so the loss can be differentiated by them). Under jit,
        taps nobody reads cost nothing."""
        b, t = tokens.shape
        if n_new is None:
            n_new = jnp.full((b,), t, jnp.int32)
        check_room(cache.lengths, n_new, cache.capacity)
        x = jnp.take(self.embed.get_value(), tokens, axis=0)
        if self.embed_scale is not None:
            x = x * jnp.asarray(self.embed_scale, x.dtype)
        new_layers, taps = [], []
        for i, (blk, layer_cache) in enumerate(zip(self.layers, cache.layers)):
            x, layer_cache, tap = blk(x, layer_cache, cache.lengths, n_new, attention_impl,
                                      None if probes is None else probes[i])
            new_layers.append(layer_cache)
            taps.append(tap)
        cache = cache.replace(layers=tuple(new_layers), lengths=cache.lengths + n_new)
        return self.final_norm(x), cache, tuple(taps)

    def logits(self, x: Array) -> Array:
        """LM head: final-norm output `[..., dim]` → float32 logits `[..., V]`."""
        head = self.embed.get_value() if self.lm_head is None else self.lm_head.get_value()  # [V, dim]
        logits = (x @ head.T.astype(x.dtype)).astype(jnp.float32)
        cap = self.cfg.final_logit_softcap
        return logits if cap is None else cap * jnp.tanh(logits / cap)


def param_table(model: Transformer) -> dict[str, nnx.Param]:
    """Every parameter of the model by its canonical name (`embed`, `layers.3.wq`, ...): the names the
    loaders map files onto and the sharding rules name axes for."""
    targets: dict[str, nnx.Param] = {"embed": model.embed, "final_norm": model.final_norm.weight}
    if model.lm_head is not None:
        targets["lm_head"] = model.lm_head
    for i, blk in enumerate(model.layers):
        targets.update(blk.params(f"layers.{i}."))
    return targets


def load_params(model: Transformer, params: Mapping[str, np.ndarray]) -> None:
    """Copies a canonical parameter dict (see gguf_loader) into the model, checking every shape."""
    dtype = model.embed.get_value().dtype
    targets = param_table(model)
    for key, target in targets.items():
        if key not in params:
            raise KvqError(f"weights lack tensor {key!r}")
        arr = np.asarray(params[key])
        if arr.shape != target.get_value().shape:
            raise KvqError(f"tensor {key!r} has shape {arr.shape}, model expects {target.get_value().shape}")
        target.set_value(jnp.asarray(arr, dtype))
    extra = set(params) - set(targets)
    if extra:
        raise KvqError(f"weights hold unexpected tensors: {', '.join(sorted(extra)[:5])}")
