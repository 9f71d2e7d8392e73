"""KV cache pytrees: dense layers and quantized (sink + packed body + recent ring) layers.

Every per-layer array is `[B, H, T, D]` (batch, KV head, token, head_dim). `KVCache.lengths[b]` counts
the positions stored for row b; rows are ragged. Static structure (specs, sizes) lives in the pytree
aux data, so a cache can cross a `jax.jit` boundary and its layout is fixed at trace time.
See docs/architecture.md for the layout of a quantized layer.
"""

from __future__ import annotations

import math
from typing import Union

import flax.struct
import jax
import jax.numpy as jnp

from kvq_jax import packing, quant
from kvq_jax.config import ModelConfig
from kvq_jax.errors import KvqError
from kvq_jax.plan import DenseKV, KVPlan, QuantSpec

Array = jax.Array


@flax.struct.dataclass
class DenseLayer:
    """Unquantized layer: `k, v [B, H, C, D]`, position p of row b at `[b, :, p]`."""

    k: Array
    v: Array


@flax.struct.dataclass
class PackedTensor:
    """Quantized body of K or V.

    words `[B, H, W, D]` uint32 (or `[B, H, Nb, D]` float for a 16-bit spec, scale/zero empty);
    scale, zero: `[B, H, Nb/G + 1, D]` (channel axis) or `[B, H, Nb + G, D/g]` (token axis).
    """

    words: Array
    scale: Array
    zero: Array
    spec: QuantSpec = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class QuantLayer:
    """Sink `[B, H, S, D]`, packed body, recent ring `[B, H, R, D]` for K and V."""

    sink_k: Array
    sink_v: Array
    recent_k: Array
    recent_v: Array
    k: PackedTensor
    v: PackedTensor
    sink: int = flax.struct.field(pytree_node=False)
    residual: int = flax.struct.field(pytree_node=False)
    block: int = flax.struct.field(pytree_node=False)
    chunk: int = flax.struct.field(pytree_node=False)
    body_capacity: int = flax.struct.field(pytree_node=False)
    rotate: str = flax.struct.field(pytree_node=False)


LayerCache = Union[DenseLayer, QuantLayer]


@flax.struct.dataclass
class KVCache:
    """All layers plus per-row lengths `[B]` int32; `capacity` positions per row."""

    layers: tuple
    lengths: Array
    capacity: int = flax.struct.field(pytree_node=False)

    @property
    def batch(self) -> int:
        return int(self.lengths.shape[0])

    def nbytes(self) -> int:
        """Real bytes of every array the cache holds."""
        return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(self)))


# ----------------------------------------------------------------------------- construction


def chunk_tokens(k: QuantSpec, v: QuantSpec, block: int, target: int = 512) -> int:
    """`target` tokens rounded up to a multiple of both digits-per-word and `block` (the packing unit)."""
    unit = block
    for s in (k, v):
        if not s.dense:
            unit = math.lcm(unit, packing.digits_per_word(s.bits))
    return unit * max(1, -(-target // unit))


def loop_chunk_target(rows: int) -> int:
    """Default tokens per step of the XLA packed-body loop for `rows` = batch x KV heads.

    About 24k (row, token) pairs, a few MB of dequantized float per step: large enough to amortise the
    loop's per-step cost, small enough to stay in cache. Tuned on a 2-core EPYC with 3 KV heads: 512
    tokens at batch >= 16, 1024 at batch 8, 2048 at batch <= 4.
    """
    return min(2048, max(512, 1 << max(0, (24576 // max(rows, 1)).bit_length() - 1)))


def _packed_tensor(spec: QuantSpec, b: int, h: int, nb: int, d: int, block: int,
                   dtype: jnp.dtype, scale_dtype: jnp.dtype) -> PackedTensor:
    if spec.dense:
        empty = jnp.zeros((b, h, 0, 1), scale_dtype)
        return PackedTensor(jnp.zeros((b, h, nb, d), dtype), empty, empty, spec)
    words = jnp.zeros((b, h, packing.num_words(nb, spec.bits, spare=True), d), jnp.uint32)
    if spec.axis == "channel":
        shape = (b, h, nb // spec.group + 1, d)
    else:
        shape = (b, h, nb + block, d // spec.group)
    return PackedTensor(words, jnp.zeros(shape, scale_dtype), jnp.zeros(shape, scale_dtype), spec)


def init_cache(cfg: ModelConfig, kv: KVPlan | DenseKV, batch: int, capacity: int,
               dtype: jnp.dtype = jnp.float32, chunk: int | None = None) -> KVCache:
    """An empty cache for `batch` rows of `capacity` positions.

    `dtype` is the full-precision dtype (sink, recent window, dense layers of a plan); a `DenseKV`
    uses its own dtype. `chunk` sets the tokens per step of the XLA packed-body loop (rounded up to
    the layer's packing unit, never more than the body can hold packed; default `loop_chunk_target`).
    """
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise KvqError(f"chunk must be a positive number of tokens, got {chunk!r}")
    if batch < 1 or capacity < 1:
        raise KvqError(f"cache needs batch >= 1 and capacity >= 1, got batch={batch}, capacity={capacity}")
    h, d = cfg.n_kv_heads, cfg.head_dim
    if isinstance(kv, DenseKV):
        dt = jnp.dtype(kv.dtype)
        layer = lambda: DenseLayer(jnp.zeros((batch, h, capacity, d), dt), jnp.zeros((batch, h, capacity, d), dt))
        return KVCache(tuple(layer() for _ in range(cfg.n_layers)), jnp.zeros((batch,), jnp.int32), capacity)
    kv.validate(cfg)
    scale_dtype = jnp.dtype(kv.scale_dtype)
    layers = []
    for i, (ks, vs) in enumerate(zip(kv.keys, kv.values)):
        if ks.dense and vs.dense and kv.rotate == "none":
            # Both 16-bit: the plain dense layer, so a 16-bit plan reproduces the dense path exactly.
            layers.append(DenseLayer(jnp.zeros((batch, h, capacity, d), dtype), jnp.zeros((batch, h, capacity, d), dtype)))
            continue
        block = kv.block(i)
        base = chunk_tokens(ks, vs, block)  # the body's capacity is a multiple of ~512 tokens
        nb = max(base, -(-max(0, capacity - kv.sink) // base) * base)
        # Never longer than the most tokens the body will hold packed (short contexts read less).
        most = chunk_tokens(ks, vs, block, max(1, capacity - kv.sink - kv.residual))
        loop = min(nb, most, chunk_tokens(ks, vs, block, chunk or loop_chunk_target(batch * h)))
        layers.append(QuantLayer(
            sink_k=jnp.zeros((batch, h, kv.sink, d), dtype),
            sink_v=jnp.zeros((batch, h, kv.sink, d), dtype),
            recent_k=jnp.zeros((batch, h, kv.residual, d), dtype),
            recent_v=jnp.zeros((batch, h, kv.residual, d), dtype),
            k=_packed_tensor(ks, batch, h, nb, d, block, dtype, scale_dtype),
            v=_packed_tensor(vs, batch, h, nb, d, block, dtype, scale_dtype),
            sink=kv.sink, residual=kv.residual, block=block, chunk=loop, body_capacity=nb,
            rotate=kv.rotate,
        ))
    return KVCache(tuple(layers), jnp.zeros((batch,), jnp.int32), capacity)


# ----------------------------------------------------------------------------- segment bookkeeping


def quantized_count(layer: QuantLayer, lengths: Array) -> Array:
    """Body tokens held in packed form per row: `G * ceil(max(0, m - R) / G)`, `m = max(0, n - S)`."""
    m = jnp.maximum(lengths - layer.sink, 0)
    g = layer.block
    return g * ((jnp.maximum(m - layer.residual, 0) + g - 1) // g)


# ----------------------------------------------------------------------------- writes


def _quantize_into(t: PackedTensor, x: Array, start: Array, enabled: Array, block: int) -> PackedTensor:
    """Quantizes G tokens `x [H, G, D]` of one row into body tokens [start, start+G) if `enabled`."""
    spec = t.spec
    if spec.dense:
        old = jax.lax.dynamic_slice_in_dim(t.words, start, block, axis=1)
        new = jnp.where(enabled, x.astype(t.words.dtype), old)
        return t.replace(words=jax.lax.dynamic_update_slice_in_dim(t.words, new, start, axis=1))
    codes, s, z = quant.quantize(x, spec.bits, spec.axis, spec.group, scale_dtype=t.scale.dtype)
    words = packing.add_block(t.words, codes, start, spec.bits, enabled=enabled)
    at = start // spec.group if spec.axis == "channel" else start
    n = s.shape[1]
    old_s = jax.lax.dynamic_slice_in_dim(t.scale, at, n, axis=1)
    old_z = jax.lax.dynamic_slice_in_dim(t.zero, at, n, axis=1)
    scale = jax.lax.dynamic_update_slice_in_dim(t.scale, jnp.where(enabled, s, old_s), at, axis=1)
    zero = jax.lax.dynamic_update_slice_in_dim(t.zero, jnp.where(enabled, z, old_z), at, axis=1)
    return t.replace(words=words, scale=scale, zero=zero)


def _write_rows(buf: Array, x: Array, at: Array, enabled: Array | None = None) -> Array:
    """Per row b: `buf[b, :, at[b]] = x[b, :, 0]` where `enabled[b]` (all rows if None).

    buf `[B, H, N, D]`, x `[B, H, 1, D]`. One scatter that drops disabled rows (their index is pushed out
    of range) and reads nothing back from `buf`: XLA then updates the buffer in place. A per-row
    dynamic_update_slice that kept the old token made XLA copy whole cache buffers every step.
    """
    b, h, n, _ = buf.shape
    at = jnp.clip(at, 0, n - 1)
    if enabled is not None:
        at = jnp.where(enabled, at, n)
    rows = jnp.arange(b)[:, None]
    heads = jnp.arange(h)[None, :]
    return buf.at[rows, heads, at[:, None]].set(x[:, :, 0].astype(buf.dtype), mode="drop")


def append(layer: LayerCache, k: Array, v: Array, lengths: Array) -> LayerCache:
    """Stores one new token per row at position `lengths[b]`. k, v: `[B, H, 1, D]`."""
    if isinstance(layer, DenseLayer):
        return layer.replace(k=_write_rows(layer.k, k, lengths), v=_write_rows(layer.v, v, lengths))
    s, r, g = layer.sink, layer.residual, layer.block
    in_sink = lengths < s
    j = jnp.maximum(lengths - s, 0)  # body index of the new token
    q_old = quantized_count(layer, lengths)
    flush = jnp.logical_and(~in_sink, j - q_old == r)

    def do_flush(lay: QuantLayer) -> QuantLayer:
        def row(kt, vt, rk, rv, q, f):
            slot = q % r
            kb = jax.lax.dynamic_slice_in_dim(rk, slot, g, axis=1)
            vb = jax.lax.dynamic_slice_in_dim(rv, slot, g, axis=1)
            return _quantize_into(kt, kb, q, f, g), _quantize_into(vt, vb, q, f, g)

        kt, vt = jax.vmap(row)(lay.k, lay.v, lay.recent_k, lay.recent_v, q_old, flush)
        return lay.replace(k=kt, v=vt)

    layer = jax.lax.cond(jnp.any(flush), do_flush, lambda lay: lay, layer)
    slot = j % max(r, 1)
    if s:  # a 0-token sink has nothing to write (and a 0-length slice cannot take one token)
        layer = layer.replace(sink_k=_write_rows(layer.sink_k, k, lengths, in_sink),
                              sink_v=_write_rows(layer.sink_v, v, lengths, in_sink))
    return layer.replace(
        recent_k=_write_rows(layer.recent_k, k, slot, ~in_sink),
        recent_v=_write_rows(layer.recent_v, v, slot, ~in_sink),
    )


def _prefill_packed(t: PackedTensor, body: Array, n_quant: Array, block: int) -> PackedTensor:
    """Quantizes body tokens `[0, n_quant[b])` of `body [B, H, T, D]` (T a multiple of `block`)."""
    spec = t.spec
    tb = body.shape[2]
    valid = (jnp.arange(tb)[None, :] < n_quant[:, None])[:, None, :, None]  # [B, 1, T, 1]
    if spec.dense:
        x = jnp.where(valid, body, 0).astype(t.words.dtype)
        return t.replace(words=jax.lax.dynamic_update_slice_in_dim(t.words, x, 0, axis=2))
    codes, s, z = quant.quantize(body, spec.bits, spec.axis, spec.group, scale_dtype=t.scale.dtype, valid=valid)
    codes = jnp.where(valid, codes, 0).astype(codes.dtype)
    words = jax.lax.dynamic_update_slice_in_dim(t.words, packing.pack(codes, spec.bits), 0, axis=2)
    return t.replace(
        words=words,
        scale=jax.lax.dynamic_update_slice_in_dim(t.scale, s, 0, axis=2),
        zero=jax.lax.dynamic_update_slice_in_dim(t.zero, z, 0, axis=2),
    )


def prefill(layer: LayerCache, k: Array, v: Array, n_new: Array) -> LayerCache:
    """Writes the first `n_new[b]` tokens of k, v `[B, H, T, D]` into an EMPTY layer cache."""
    t = k.shape[2]
    if isinstance(layer, DenseLayer):
        return layer.replace(
            k=jax.lax.dynamic_update_slice_in_dim(layer.k, k.astype(layer.k.dtype), 0, axis=2),
            v=jax.lax.dynamic_update_slice_in_dim(layer.v, v.astype(layer.v.dtype), 0, axis=2),
        )
    s, r, g = layer.sink, layer.residual, layer.block

    def fit(x: Array, n: int) -> Array:  # pad or cut the token axis to n
        x = x[:, :, :n]
        return jnp.pad(x, ((0, 0), (0, 0), (0, n - x.shape[2]), (0, 0)))

    sink_k, sink_v = fit(k, s), fit(v, s)
    tb = -(-max(t - s, 0) // g) * g
    body_k = fit(k[:, :, s:], tb)
    body_v = fit(v[:, :, s:], tb)
    m = jnp.maximum(n_new - s, 0)
    n_quant = quantized_count(layer, n_new)
    kt = _prefill_packed(layer.k, body_k, n_quant, g) if tb else layer.k
    vt = _prefill_packed(layer.v, body_v, n_quant, g) if tb else layer.v
    # Ring slot i holds body token j = Q + ((i - Q) mod R), if j < m.
    i = jnp.arange(r)
    j = n_quant[:, None] + (i[None, :] - n_quant[:, None]) % max(r, 1)  # [B, R]
    ok = (j < m[:, None])[:, None, :, None]
    idx = jnp.clip(j, 0, max(tb - 1, 0))[:, None, :, None]

    def ring(body: Array, like: Array) -> Array:
        if tb == 0:
            return like
        got = jnp.take_along_axis(body, jnp.broadcast_to(idx, body.shape[:2] + (r, body.shape[3])), axis=2)
        return jnp.where(ok, got, 0).astype(like.dtype)

    return layer.replace(
        sink_k=sink_k.astype(layer.sink_k.dtype), sink_v=sink_v.astype(layer.sink_v.dtype),
        recent_k=ring(body_k, layer.recent_k), recent_v=ring(body_v, layer.recent_v), k=kt, v=vt,
    )
