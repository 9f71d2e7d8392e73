"""The one attention entry point: write the new keys/values into the cache, then attend over it.

Prefill (T > 1, empty cache) attends at full precision over the prompt, as the reference does; what
is quantized is what the cache keeps for later tokens. A decode step (T == 1) attends over the sink,
the packed body and the recent window separately and merges the three with log-sum-exp. The packed
body is read by the XLA path (a loop that dequantizes one chunk at a time) or by the Pallas kernel.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kvq_jax import cache as kvcache
from kvq_jax import packing
from kvq_jax.cache import DenseLayer, LayerCache, PackedTensor, QuantLayer
from kvq_jax.errors import KvqError

Array = jax.Array
IMPLS = ("auto", "xla", "pallas", "pallas_interpret")
_NEG = -1e30  # finite "minus infinity" for masked scores: exp() of it is exactly 0, no NaN


def resolve_impl(impl: str) -> str:
    """`auto` → `pallas` on TPU/GPU, `xla` on CPU."""
    if impl not in IMPLS:
        raise KvqError(f"bad attention implementation {impl!r} (choose from {', '.join(IMPLS)})")
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("tpu", "gpu") else "xla"
    return impl


# ----------------------------------------------------------------------------- position & rotation


def rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotate-half RoPE. x `[B, T, H, D]`, positions `[B, T]`."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    ang = positions.astype(jnp.float32)[..., None] * inv  # [B, T, D/2]
    cos = jnp.cos(ang)[:, :, None, :]
    sin = jnp.sin(ang)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


@functools.lru_cache(maxsize=8)
def hadamard(d: int) -> np.ndarray:
    """Orthonormal Hadamard matrix `[d, d]` (d a power of two): H @ H.T = I."""
    if d & (d - 1):
        raise KvqError(f"hadamard rotation needs a power-of-two head_dim, got {d}")
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(d)


# ----------------------------------------------------------------------------- segments


def _segment(q: Array, k: Array, v: Array, mask: Array) -> tuple[Array, Array]:
    """Attention over one segment. q `[B, H, R, D]` (pre-scaled), k/v `[B, H, N, D]`, mask `[B, N]`.

    Returns the normalised output `[B, H, R, D]` and the log-sum-exp `[B, H, R]` (-inf if empty).
    """
    s = jnp.einsum("bhrd,bhnd->bhrn", q, k.astype(q.dtype))
    s = jnp.where(mask[:, None, None, :], s, _NEG)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhrn,bhnd->bhrd", p, v.astype(q.dtype)) / l
    lse = jnp.where(jnp.any(mask, axis=-1)[:, None, None], (m + jnp.log(l))[..., 0], -jnp.inf)
    return o, lse


def merge(parts: list[tuple[Array, Array]]) -> Array:
    """Exact merge of normalised partial attentions by their log-sum-exp."""
    lses = jnp.stack([lse for _, lse in parts])  # [S, B, H, R]
    top = jnp.max(lses, axis=0)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.exp(lses - top)  # exp(-inf) = 0 for empty segments
    out = sum(wi[..., None] * o for wi, (o, _) in zip(w, parts))
    return out / jnp.maximum(jnp.sum(w, axis=0), 1e-30)[..., None]


def dequant_chunk(t: PackedTensor, start: Array, n: int) -> Array:
    """Body tokens [start, start+n) of one packed tensor, dequantized: `[B, H, n, D]` float32.

    `start` and `n` are multiples of the words' digits and of the per-channel group.
    """
    spec = t.spec
    if spec.dense:
        return jax.lax.dynamic_slice_in_dim(t.words, start, n, axis=2).astype(jnp.float32)
    p = packing.digits_per_word(spec.bits)
    words = jax.lax.dynamic_slice_in_dim(t.words, start // p, n // p, axis=2)
    codes = packing.unpack(words, spec.bits, dtype=jnp.float32)  # [B, H, n, D]
    if spec.axis == "channel":
        g = spec.group
        sc = jax.lax.dynamic_slice_in_dim(t.scale, start // g, n // g, axis=2)
        zc = jax.lax.dynamic_slice_in_dim(t.zero, start // g, n // g, axis=2)
        sc = jnp.repeat(sc.astype(jnp.float32), g, axis=2)
        zc = jnp.repeat(zc.astype(jnp.float32), g, axis=2)
    else:
        sc = jax.lax.dynamic_slice_in_dim(t.scale, start, n, axis=2)
        zc = jax.lax.dynamic_slice_in_dim(t.zero, start, n, axis=2)
        sc = jnp.repeat(sc.astype(jnp.float32), spec.group, axis=3)
        zc = jnp.repeat(zc.astype(jnp.float32), spec.group, axis=3)
    return codes * sc + zc


def chunk_scores(q: Array, k: Array) -> Array:
    """q `[B, H, R, D]` · k `[B, H, n, D]` → `[B, H, R, n]`, as one matrix-vector product per query head.

    With R (query heads per KV head) this small, XLA:CPU runs the batched `[R, D] x [n, D]^T` product
    1.2-1.6x slower than R matrix-vector products over the same chunk (benchmarks/xla_cpu.py, table in
    benchmarks/RESULTS.md); on TPU/GPU the Pallas kernel reads the body instead.
    """
    return jnp.stack([jnp.einsum("bhnd,bhd->bhn", k, q[:, :, i]) for i in range(q.shape[2])], axis=2)


def packed_xla(q: Array, layer: QuantLayer, n_valid: Array) -> tuple[Array, Array]:
    """Flash-decoding over the packed body in XLA: one chunk dequantized at a time, online softmax.

    q `[B, H, R, D]` pre-scaled; n_valid `[B]` packed tokens per row. Only chunks below
    `max(n_valid)` are read, so the cost follows the filled length, not the capacity.
    """
    c, nb = layer.chunk, layer.body_capacity
    b, h, r, d = q.shape
    n_chunks = (jnp.max(n_valid) + c - 1) // c

    def body(i, carry):
        m, l, acc = carry
        # The chunk need not divide the body: the last one is moved back to end at the body's end,
        # and the tokens it shares with the previous chunk are masked out.
        start = jnp.minimum(i * c, nb - c)
        s = chunk_scores(q, dequant_chunk(layer.k, start, c))
        pos = start + jnp.arange(c)
        ok = (pos >= i * c)[None, :] & (pos[None, :] < n_valid[:, None])
        s = jnp.where(ok[:, None, None, :], s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l = l * alpha + jnp.sum(p, axis=-1)
        acc = acc * alpha[..., None] + jnp.einsum("bhrn,bhnd->bhrd", p, dequant_chunk(layer.v, start, c))
        return m_new, l, acc

    init = (jnp.full((b, h, r), _NEG, jnp.float32), jnp.zeros((b, h, r), jnp.float32),
            jnp.zeros((b, h, r, d), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, n_chunks, body, init)
    empty = (n_valid == 0)[:, None, None]
    out = jnp.where(empty[..., None], 0.0, acc / jnp.maximum(l, 1e-30)[..., None])
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.maximum(l, 1e-30)))
    return out, lse


def packed_pallas(q: Array, layer: QuantLayer, n_valid: Array, interpret: bool) -> tuple[Array, Array]:
    """The packed body through the fused Pallas kernel (pallas_kernels.decode_attention)."""
    from pallas_kernels import packed_decode_attention  # kernels are optional at import time

    ks, vs = layer.k.spec, layer.v.spec
    return packed_decode_attention(
        q, layer.k.words, layer.k.scale, layer.k.zero, layer.v.words, layer.v.scale, layer.v.zero,
        n_valid, k_bits=ks.bits, k_axis=ks.axis, k_group=ks.group, v_bits=vs.bits, v_axis=vs.axis,
        v_group=vs.group, backend="interpret" if interpret else "auto",
    )


def read_quantized(q: Array, layer: QuantLayer, lengths: Array, impl: str) -> Array:
    """Decode attention over a quantized layer. q `[B, Hkv, R, D]` pre-scaled, lengths after append."""
    s, r = layer.sink, layer.residual
    sink_mask = jnp.arange(s)[None, :] < lengths[:, None]
    parts = [_segment(q, layer.sink_k, layer.sink_v, sink_mask)] if s else []
    n_quant = kvcache.quantized_count(layer, lengths)
    dense_body = layer.k.spec.dense or layer.v.spec.dense
    if impl == "xla" or dense_body:
        parts.append(packed_xla(q, layer, n_quant))
    else:
        parts.append(packed_pallas(q, layer, n_quant, interpret=impl == "pallas_interpret"))
    if r:
        m = jnp.maximum(lengths - s, 0)
        i = jnp.arange(r)[None, :]
        j = n_quant[:, None] + (i - n_quant[:, None]) % r  # body token held by ring slot i
        parts.append(_segment(q, layer.recent_k, layer.recent_v, j < m[:, None]))
    return merge(parts)


# ----------------------------------------------------------------------------- prefill


def causal_attention(q: Array, k: Array, v: Array, n_new: Array, block: int = 256) -> Array:
    """Full-precision causal attention within a prompt chunk.

    q `[B, Hkv, R, T, D]` pre-scaled, k/v `[B, Hkv, T, D]`, n_new `[B]` valid tokens per row.
    Queries are processed `block` at a time so memory stays `O(block * T)`.
    """
    t = q.shape[3]
    kpos = jnp.arange(t)

    def one(q_blk: Array, qpos: Array) -> Array:
        s = jnp.einsum("bhrqd,bhkd->bhrqk", q_blk, k.astype(q.dtype))
        ok = (kpos[None, :] <= qpos[:, None])[None] & (kpos[None, None, :] < n_new[:, None, None])
        s = jnp.where(ok[:, None, None], s, _NEG)
        p = jax.nn.softmax(s, axis=-1)
        return jnp.einsum("bhrqk,bhkd->bhrqd", p, v.astype(q.dtype))

    if t <= block:
        return one(q, kpos)
    nb = -(-t // block)
    pad = nb * block - t
    qp = jnp.pad(q, ((0, 0),) * 3 + ((0, pad), (0, 0)))
    qb = qp.reshape(q.shape[:3] + (nb, block, q.shape[4])).transpose(3, 0, 1, 2, 4, 5)
    pos = jnp.arange(nb * block).reshape(nb, block)
    out = jax.lax.map(lambda a: one(*a), (qb, pos))  # [nb, B, H, R, block, D]
    out = out.transpose(1, 2, 3, 0, 4, 5).reshape(q.shape[:3] + (nb * block, q.shape[4]))
    return out[:, :, :, :t]


# ----------------------------------------------------------------------------- entry point


def attention(q: Array, k: Array, v: Array, layer: LayerCache, lengths: Array, n_new: Array,
              impl: str = "xla") -> tuple[Array, LayerCache]:
    """Attention with a cache, the single entry point used by the model.

    q `[B, T, Hq, D]`, k/v `[B, T, Hkv, D]` (RoPE applied), lengths `[B]` positions already cached,
    n_new `[B]` valid new tokens per row. T > 1 is a prefill into an empty cache; T == 1 a decode step.
    Returns the output `[B, T, Hq, D]` and the updated layer cache.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    rep = hq // hkv
    rot = None
    if isinstance(layer, QuantLayer) and layer.rotate == "hadamard":
        # The cache holds k @ H and v @ H (H orthonormal, H @ H = I): q.k is unchanged with q @ H, and
        # the output is rotated back; outlier channels are spread before quantization.
        rot = jnp.asarray(hadamard(d), q.dtype)
    heads = lambda x: x.transpose(0, 2, 1, 3)  # [B, T, H, D] -> [B, H, T, D]
    qh = (q * (1.0 / math.sqrt(d))).reshape(b, t, hkv, rep, d).transpose(0, 2, 3, 1, 4)  # [B,Hkv,R,T,D]
    kc, vc = (k, v) if rot is None else (k @ rot, v @ rot)
    if t > 1:
        out = causal_attention(qh, heads(k), heads(v), n_new)
        layer = kvcache.prefill(layer, heads(kc), heads(vc), n_new)
    else:
        layer = kvcache.append(layer, heads(kc), heads(vc), lengths)
        n = lengths + 1
        q1 = qh[:, :, :, 0]
        if isinstance(layer, DenseLayer):
            mask = jnp.arange(layer.k.shape[2])[None, :] < n[:, None]
            out, _ = _segment(q1, layer.k, layer.v, mask)
        else:
            out = read_quantized(q1 if rot is None else q1 @ rot, layer, n, resolve_impl(impl))
            out = out if rot is None else out @ rot
        out = out[:, :, :, None]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d)  # [B, T, Hq, D]
    return out.astype(q.dtype), layer
