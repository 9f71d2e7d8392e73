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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvq_jax import quant
from kvq_jax.attention import DIFFERENTIABLE
from kvq_jax.rotations import Rope, apply_rope, hadamard
from kvq_jax.cache import init_cache
from kvq_jax.plan import CODEBOOK_BITS, DenseKV

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
             scale_dtype: jnp.dtype, levels: Array | None = None) -> Array:
    """x `[B, T, H, D]` with body tokens `[S, T)` quantize-dequantized in the cache's blocks (with a
    codebook of `levels`, see `kvq_jax.quant`)."""
    b, t, h, d = x.shape
    body = x[:, sink:].transpose(0, 2, 1, 3)  # [B, H, Tb, D]
    n = body.shape[2]
    pad = -(-n // block) * block - n  # padded tokens are never read (Q(t) is a multiple of block)
    body = jnp.pad(body, ((0, 0), (0, 0), (0, pad), (0, 0)))
    codes, s, z = quant.quantize(body, bits, axis, group, scale_dtype=scale_dtype, levels=levels)
    deq = quant.dequantize(codes, s, z, axis, group, levels=levels)[:, :, :n].transpose(0, 2, 1, 3)
    return jnp.concatenate([x[:, :sink], deq.astype(x.dtype)], axis=1)


def mixed_attention(q: Array, k: Array, v: Array, k_hat: Array, v_hat: Array, mask_q: Array,
                    scale: float | None = None, window: int = 0) -> Array:
    """Causal attention where query t reads `k_hat`/`v_hat` at the keys `mask_q[t]` marks, else k/v.

    q `[B, T, Hq, D]`, k/v/k_hat/v_hat `[B, T, Hkv, D]`, mask_q `[T, T]` → `[B, T, Hq, D]`. Scores are
    scaled by `scale` (default D ** -0.5); `window` > 0 limits query t to keys (t - window, t].
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qh = (q * (d ** -0.5 if scale is None else scale)).reshape(b, t, hkv, hq // hkv, d)
    s_fp = jnp.einsum("bqhrd,bkhd->bhrqk", qh, k)
    s_q = jnp.einsum("bqhrd,bkhd->bhrqk", qh, k_hat)
    s = jnp.where(mask_q, s_q, s_fp)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    causal = jnp.asarray((j <= i) & ((i - j < window) if window else True))
    p = jax.nn.softmax(jnp.where(causal, s, _NEG), axis=-1)
    out = (jnp.einsum("bhrqk,bkhd->bqhrd", jnp.where(mask_q, p, 0.0), v_hat)
           + jnp.einsum("bhrqk,bkhd->bqhrd", jnp.where(mask_q, 0.0, p), v))
    return out.reshape(b, t, hq, d)


_NLL_BLOCK = 256  # positions whose logits [B, block, V] exist at once (Gemma's vocabulary is 262k)


def nll(graphdef, state, tokens: Array, probes: tuple[Array, ...]) -> tuple[Array, tuple[Array, Array, Array]]:
    """Summed NLL of tokens 1.. of every window `[B, T]`, through the model's own forward pass (a
    full-precision cache), with `probes [B, T, Hq, D]` per layer added to the attention outputs; and
    each layer's q, k, v stacked `[L, B, T, H, D]`."""
    model = nnx.merge(graphdef, state)
    b, t = tokens.shape
    cache = init_cache(model.cfg, DenseKV("float32"), b, t)
    h, _, taps = model.forward(tokens, cache, attention_impl=DIFFERENTIABLE, probes=probes)
    n = -(-(t - 1) // _NLL_BLOCK)
    pad = n * _NLL_BLOCK - (t - 1)
    hb = jnp.pad(h[:, :-1], ((0, 0), (0, pad), (0, 0))).reshape(b, n, _NLL_BLOCK, -1).transpose(1, 0, 2, 3)
    tb = jnp.pad(tokens[:, 1:], ((0, 0), (0, pad))).reshape(b, n, _NLL_BLOCK).transpose(1, 0, 2)
    vb = (jnp.arange(n * _NLL_BLOCK) < t - 1).reshape(n, 1, _NLL_BLOCK)

    @jax.checkpoint  # recomputed in the backward pass: no [B, T, V] log-softmax is kept for it
    def block(a):
        x, tok, valid = a
        lp = jax.nn.log_softmax(model.logits(x), axis=-1)
        return -jnp.sum(jnp.where(valid, jnp.take_along_axis(lp, tok[..., None], axis=-1)[..., 0], 0.0))

    value = jnp.sum(jax.lax.map(block, (hb, tb, vb)))
    stack = lambda name: jnp.stack([getattr(tp, name) for tp in taps])
    return value, (stack("q"), stack("k"), stack("v"))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def fisher_pass(graphdef, state, tokens: Array) -> tuple[Array, Array, tuple[Array, Array, Array]]:
    """`nll` at zero probes, its gradient w.r.t. every layer's attention output `[L, B, T, Hq, D]`,
    and each layer's q, k, v."""
    b, t = tokens.shape
    cfg = nnx.merge(graphdef, state).cfg
    probes = tuple(jnp.zeros((b, t, cfg.n_heads, cfg.head_dim), jnp.float32) for _ in range(cfg.n_layers))
    f = lambda p: nll(graphdef, state, tokens, p)
    (value, qkv), grads = jax.value_and_grad(f, has_aux=True)(probes)
    return value, jnp.stack(grads), qkv


@functools.partial(jax.jit, static_argnames=("bits", "key_axis", "value_axis", "group_k", "group_v",
                                             "sink", "residual", "block", "scale_dtype", "scale", "window",
                                             "rotate", "rope"))
def layer_fisher_errors(q: Array, k: Array, v: Array, grad: Array, *, bits: tuple[float, ...],
                        key_axis: str, value_axis: str, group_k: int, group_v: int, sink: int,
                        residual: int, block: int, scale_dtype: str, scale: float | None = None,
                        window: int = 0, rotate: str = "none", rope: Rope | None = None,
                        k_levels: Array | None = None, v_levels: Array | None = None
                        ) -> tuple[Array | None, Array | None]:
    """`[nb]` Fisher-weighted errors of one layer's keys and of its values, summed over the batch.

    A sliding-window layer (`window` > 0) has no sink in the cache: pass `sink=0`. `rotate`
    "hadamard": the cache holds k @ H and v @ H, so the quantization error is that of the rotated
    tensors, rotated back (H is orthonormal and symmetric); "prerope": the cache holds the keys
    before the layer's RoPE `rope` (window position t at position t), rotated forward when read,
    and the values as they are (their errors are the unrotated ones: None is returned for them).
    `k_levels [nb, 16]`: the keys are stored with the codebook `k_levels[j, :qmax + 1]` at each
    width `bits[j]` that takes one (`plan.CODEBOOK_BITS`, uniform codes at the others); only the
    keys are measured then (None is returned for the values). `v_levels [nb, 16]`: the same for the
    values (with `rotate` "hadamard": the codebook of the rotated values); only the values are
    measured then (None is returned for the keys)."""
    q, k, v, grad = (a.astype(jnp.float32) for a in (q, k, v, grad))
    k_qdq = v_qdq = qdq_body
    if rotate == "hadamard":
        h = jnp.asarray(hadamard(k.shape[-1]), jnp.float32)
        k_qdq = v_qdq = lambda x, *a: qdq_body(x @ h, *a) @ h
    elif rotate == "prerope":
        if rope is None:
            raise ValueError("rotate='prerope' needs the layer's rope")
        pos = jnp.arange(k.shape[1])[None, :, None]  # [1, T, 1] against [B, T, H]
        k_qdq = lambda x, *a: apply_rope(qdq_body(apply_rope(x, pos, rope, inverse=True), *a), pos, rope)
    mask = jnp.asarray(protocol_mask(q.shape[1], sink, residual, block))
    attend = lambda kh, vh, m: mixed_attention(q, k, v, kh, vh, m, scale, window)
    ref = attend(k, v, jnp.zeros_like(mask))
    fisher = grad * grad
    sd = jnp.dtype(scale_dtype)
    ke, ve = [], []
    if k_levels is not None and v_levels is not None:
        raise ValueError("measure key codebooks and value codebooks in separate calls")
    if v_levels is not None and rotate == "prerope":
        raise ValueError("rotate='prerope' measures keys only: value codebooks need rotate 'none' or 'hadamard'")
    keys = v_levels is None
    values = rotate != "prerope" and k_levels is None
    book = lambda table, j, b: table[j, :quant.qmax(b) + 1] if table is not None and b in CODEBOOK_BITS else None
    for j, b in enumerate(bits):
        if keys:
            k_hat = k_qdq(k, b, key_axis, group_k, sink, block, sd, book(k_levels, j, b))
            ke.append(0.5 * jnp.sum(fisher * (attend(k_hat, v, mask) - ref) ** 2))
        if values:
            v_hat = v_qdq(v, b, value_axis, group_v, sink, block, sd, book(v_levels, j, b))
            ve.append(0.5 * jnp.sum(fisher * (attend(k, v_hat, mask) - ref) ** 2))
    return (jnp.stack(ke) if ke else None), (jnp.stack(ve) if ve else None)
