"""Loss-aware sensitivity: Fisher-weighted attention-output error under the cache's protocol.

For layer l, tensor K (or V) and width b:

    e(l, b) = 1/2 * sum over calibration tokens of  F_l * (A_l(quantized) - A_l)^2

A_l `[B, T, Hq, D]` is the layer's attention output (before W_o). "Quantized" follows the cache: a query
at position t sees the sink and its recent window in full precision and only the older body tokens
`[S, S + Q(t))` quantized (Q(t) = G * ceil(max(0, t - S - R) / G): what the cache holds packed when
the token at position t arrives, read before it is written), with
the plan's grouping. F_l = (dNLL/dA_l)^2 is the empirical Fisher diagonal of the calibration NLL, from
one backward pass. To second order e is the rise in NLL (in nats) that quantizing only that tensor
causes, so errors of different layers and of K vs V share one unit and add up, which the relative
attention-output error (`KVStats.k_attn_err`) does not: it weighs a layer the loss ignores like
one it depends on.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvq_jax import quant

Array = jax.Array
_NEG = -1e30


def quantized_prefix(t: int, sink: int, residual: int, block: int) -> np.ndarray:
    """`[T]` int: Q(t), the body tokens a query at position t reads in quantized form."""
    m = np.maximum(np.arange(t) - sink - residual, 0)
    return block * ((m + block - 1) // block)


def protocol_mask(t: int, sink: int, residual: int, block: int) -> np.ndarray:
    """`[T, T]` bool: key s is quantized for query t (s in [S, S + Q(t)))."""
    q = quantized_prefix(t, sink, residual, block)
    s = np.arange(t)[None, :]
    return (s >= sink) & (s < sink + q[:, None])


def qdq_body(x: Array, bits: float, axis: str, group: int, sink: int, block: int,
             scale_dtype: jnp.dtype) -> Array:
    """x `[B, T, H, D]` with body tokens `[S, T)` quantize-dequantized in the cache's blocks."""
    b, t, h, d = x.shape
    body = x[:, sink:].transpose(0, 2, 1, 3)  # [B, H, Tb, D]
    n = body.shape[2]
    pad = -(-n // block) * block - n  # padded tokens are never read (Q(t) is a multiple of block)
    body = jnp.pad(body, ((0, 0), (0, 0), (0, pad), (0, 0)))
    codes, s, z = quant.quantize(body, bits, axis, group, scale_dtype=scale_dtype)
    deq = quant.dequantize(codes, s, z, axis, group)[:, :, :n].transpose(0, 2, 1, 3)
    return jnp.concatenate([x[:, :sink], deq.astype(x.dtype)], axis=1)


def mixed_attention(q: Array, k: Array, v: Array, k_hat: Array, v_hat: Array, mask_q: Array) -> Array:
    """Causal attention where query t reads `k_hat`/`v_hat` at the keys `mask_q[t]` marks, else k/v.

    q `[B, T, Hq, D]`, k/v/k_hat/v_hat `[B, T, Hkv, D]`, mask_q `[T, T]` → `[B, T, Hq, D]`.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qh = (q / math.sqrt(d)).reshape(b, t, hkv, hq // hkv, d)
    s_fp = jnp.einsum("bqhrd,bkhd->bhrqk", qh, k)
    s_q = jnp.einsum("bqhrd,bkhd->bhrqk", qh, k_hat)
    s = jnp.where(mask_q, s_q, s_fp)
    causal = jnp.tril(jnp.ones((t, t), bool))
    p = jax.nn.softmax(jnp.where(causal, s, _NEG), axis=-1)
    out = (jnp.einsum("bhrqk,bkhd->bqhrd", jnp.where(mask_q, p, 0.0), v_hat)
           + jnp.einsum("bhrqk,bkhd->bqhrd", jnp.where(mask_q, 0.0, p), v))
    return out.reshape(b, t, hq, d)


def _block(blk, x: Array, pos: Array, probe: Array) -> tuple[Array, tuple[Array, Array, Array]]:
    """One decoder block with `probe` added to its attention output; also returns q, k, v."""
    b, t, _ = x.shape
    q, k, v = blk.attn.qkv(blk.attn_norm(x), pos)
    no_quant = jnp.zeros((t, t), bool)
    out = mixed_attention(q, k, v, k, v, no_quant) + probe
    x = x + blk.attn.wo(out.reshape(b, t, -1))
    return x + blk.mlp(blk.mlp_norm(x)), (q, k, v)


def nll(graphdef, stacked, embed: Array, head: Array, norm_w: Array, eps: float, tokens: Array,
        probes: Array) -> tuple[Array, tuple[Array, Array, Array]]:
    """Summed NLL of tokens 1.. of every window `[B, T]` with `probes [L, B, T, Hq, D]` added to the
    attention outputs, and each layer's q, k, v (`[L, B, T, H, D]`). Same math as `Transformer`."""
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))

    def body(x, inp):
        st, probe = inp
        return _block(nnx.merge(graphdef, st), x, pos, probe)

    x, qkv = jax.lax.scan(body, jnp.take(embed, tokens, axis=0), (stacked, probes))
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps) * norm_w
    lp = jax.nn.log_softmax(xf[:, :-1] @ head.T.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)), qkv


@functools.partial(jax.jit, static_argnames=("graphdef",))
def fisher_pass(graphdef, stacked, embed: Array, head: Array, norm_w: Array, eps: float,
                tokens: Array) -> tuple[Array, Array, tuple[Array, Array, Array]]:
    """`nll` at zero probes, its gradient w.r.t. every layer's attention output `[L, B, T, Hq, D]`,
    and each layer's q, k, v. `stacked`: the blocks' states stacked on a leading layer axis."""
    b, t = tokens.shape
    n_layers = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    cfg = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], stacked)).attn.cfg
    probes = jnp.zeros((n_layers, b, t, cfg.n_heads, cfg.head_dim), embed.dtype)
    f = lambda p: nll(graphdef, stacked, embed, head, norm_w, eps, tokens, p)
    (value, qkv), grads = jax.value_and_grad(f, has_aux=True)(probes)
    return value, grads, qkv


@functools.partial(jax.jit, static_argnames=("bits", "key_axis", "value_axis", "group_k", "group_v",
                                             "sink", "residual", "block", "scale_dtype"))
def layer_fisher_errors(q: Array, k: Array, v: Array, grad: Array, *, bits: tuple[float, ...],
                        key_axis: str, value_axis: str, group_k: int, group_v: int, sink: int,
                        residual: int, block: int, scale_dtype: str) -> tuple[Array, Array]:
    """`[nb]` Fisher-weighted errors of one layer's keys and of its values, summed over the batch."""
    q, k, v, grad = (a.astype(jnp.float32) for a in (q, k, v, grad))
    mask = jnp.asarray(protocol_mask(q.shape[1], sink, residual, block))
    ref = mixed_attention(q, k, v, k, v, jnp.zeros_like(mask))
    fisher = grad * grad
    sd = jnp.dtype(scale_dtype)
    ke, ve = [], []
    for b in bits:
        k_hat = qdq_body(k, b, key_axis, group_k, sink, block, sd)
        v_hat = qdq_body(v, b, value_axis, group_v, sink, block, sd)
        ke.append(0.5 * jnp.sum(fisher * (mixed_attention(q, k, v, k_hat, v, mask) - ref) ** 2))
        ve.append(0.5 * jnp.sum(fisher * (mixed_attention(q, k, v, k, v_hat, mask) - ref) ** 2))
    return jnp.stack(ke), jnp.stack(ve)
