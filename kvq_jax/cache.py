"""KV cache pytrees: dense layers and quantized (sink + packed body + recent ring) layers.

Every per-layer array is `[B, H, T, D]` (batch, KV head, token, head_dim). `KVCache.lengths[b]` counts
the positions stored for row b; rows are ragged. Static structure (specs, sizes) lives in the pytree
aux data, so a cache can cross a `jax.jit` boundary and its layout is fixed at trace time.
See docs/architecture.md for the layout of a quantized layer.
"""

from __future__ import annotations

import math
from typing import Any, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kvq_jax import packing, quant
from kvq_jax.config import ModelConfig
from kvq_jax.errors import KvqError
from kvq_jax.plan import DenseKV, KVPlan, QuantSpec
from kvq_jax.rotations import apply_rope

Array = jax.Array


@flax.struct.dataclass
class DenseLayer:
    """Unquantized layer: `k, v [B, H, C, D]`, position p of row b at `[b, :, p]`.

    A sliding-window layer (`window` W > 0) holds the last W positions only: C = min(W, capacity)
    slots, position p in slot `p % C` (see `ring_position`). On a mesh (`placement`), a global
    layer's slots are split in `shards` equal slices along the `seq` axis (C rounded up to divide).
    """

    k: Array
    v: Array
    window: int = flax.struct.field(pytree_node=False, default=0)
    shards: int = flax.struct.field(pytree_node=False, default=1)
    placement: Any = flax.struct.field(pytree_node=False, default=None)


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
    """Sink `[B, H, S, D]`, packed body, recent ring `[B, H, R, D]` for K and V.

    A sliding-window layer (`window` W > 0) has no sink, and its body is itself a ring of
    `body_capacity` >= W tokens (body token j in slot `j % body_capacity`), so its size never
    depends on the context. On a mesh (`placement`) with `shards` S > 1 (global layers only), the body
    is S self-contained bodies of `body_capacity / S` tokens laid end to end (words, scales and zeros
    each with their own spare rows), body token j in slice `j // (body_capacity / S)`, one per `seq`
    device; so is the recent ring when `shards` divides R (`ring_split`): device i holds ring slots
    `[i * R / S, (i + 1) * R / S)`. `rope` (a `rotate="prerope"` layer): the layer's RoPE (theta,
    scaling); the body stores keys before it (a flush rotates them back by position, readers rotate
    the dequantized keys forward), while the sink and ring hold them as the model produced them.
    """

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
    window: int = flax.struct.field(pytree_node=False, default=0)
    shards: int = flax.struct.field(pytree_node=False, default=1)
    placement: Any = flax.struct.field(pytree_node=False, default=None)
    rope: Any = flax.struct.field(pytree_node=False, default=None)


LayerCache = Union[DenseLayer, QuantLayer]


def ring_split(layer: QuantLayer) -> bool:
    """Whether the layer's recent ring is split along `seq` like its body (its R slots divide over the
    shards): its memory then shrinks with the mesh too; only a flush gathers it, R tokens at a time."""
    return layer.shards > 1 and layer.residual > 0 and layer.residual % layer.shards == 0


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
                   dtype: jnp.dtype, scale_dtype: jnp.dtype, shards: int = 1) -> PackedTensor:
    """An empty body of `shards` slices of `nb` tokens each, end to end along the token axis."""
    if spec.dense:  # two distinct empty arrays: one buffer twice in a cache cannot be donated
        empty = lambda: jnp.zeros((b, h, 0, 1), scale_dtype)
        return PackedTensor(jnp.zeros((b, h, shards * nb, d), dtype), empty(), empty(), spec)
    words = jnp.zeros((b, h, shards * packing.num_words(nb, spec.bits, spare=True), d), jnp.uint32)
    if spec.axis == "channel":
        shape = (b, h, shards * (nb // spec.group + 1), d)
    else:
        shape = (b, h, shards * (nb + block), d // spec.group)
    return PackedTensor(words, jnp.zeros(shape, scale_dtype), jnp.zeros(shape, scale_dtype), spec)


def init_cache(cfg: ModelConfig, kv: KVPlan | DenseKV, batch: int, capacity: int,
               dtype: jnp.dtype = jnp.float32, chunk: int | None = None, mesh: Any = None,
               rules: Any = None) -> KVCache:
    """An empty cache for `batch` rows of `capacity` positions.

    `dtype` is the full-precision dtype (sink and recent window unless the plan's `window_dtype`
    says otherwise, dense layers of a plan); a `DenseKV`
    uses its own dtype. `chunk` sets the tokens per step of the XLA packed-body loop (rounded up to
    the layer's packing unit, never more than the body can hold packed; default `loop_chunk_target`).
    `mesh` (`kvq_jax.make_mesh`) lays the cache out over devices as `rules` (`ShardingRules`) say:
    rows over `data`, KV heads over `model`, global layers' tokens over `seq`.
    """
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise KvqError(f"chunk must be a positive number of tokens, got {chunk!r}")
    _check_size(batch, capacity)
    if mesh is None:
        return _empty_cache(cfg, kv, batch, capacity, dtype, chunk, None)
    from kvq_jax import sharding

    p = sharding.placement(mesh, cfg, batch, rules)
    shape = jax.eval_shape(lambda: _empty_cache(cfg, kv, batch, capacity, dtype, chunk, p))
    # Built where it lives: each device allocates its own slice (the whole cache never sits on one).
    return jax.jit(lambda: _empty_cache(cfg, kv, batch, capacity, dtype, chunk, p),
                   out_shardings=sharding.cache_shardings(shape))()


def _check_size(batch: int, capacity: int) -> None:
    if batch < 1 or capacity < 1:
        raise KvqError(f"cache needs batch >= 1 and capacity >= 1, got batch={batch}, capacity={capacity}")


def cache_bytes(cfg: ModelConfig, kv: KVPlan | DenseKV, batch: int, capacity: int,
                dtype: jnp.dtype = jnp.float32, mesh: Any = None, rules: Any = None) -> int:
    """Bytes one device would hold of `init_cache(...)`'s cache (the most any device holds), from
    shapes alone: nothing is allocated, so any model's config and context can be planned."""
    _check_size(batch, capacity)
    if mesh is None:
        shape = jax.eval_shape(lambda: _empty_cache(cfg, kv, batch, capacity, dtype, None, None))
        return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shape)))
    from kvq_jax import sharding

    p = sharding.placement(mesh, cfg, batch, rules)
    shape = jax.eval_shape(lambda: _empty_cache(cfg, kv, batch, capacity, dtype, None, p))
    leaves = jax.tree_util.tree_leaves(shape)
    shardings = jax.tree_util.tree_leaves(sharding.cache_shardings(shape))
    # NamedShardings of evenly divided axes: every device holds a shard of the same shape.
    return int(sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in zip(leaves, shardings)))


def _empty_cache(cfg: ModelConfig, kv: KVPlan | DenseKV, batch: int, capacity: int, dtype: jnp.dtype,
                 chunk: int | None, p: Any) -> KVCache:
    h, d = cfg.n_kv_heads, cfg.head_dim
    seq = 1 if p is None else p.seq

    def dense(dt: jnp.dtype, window: int) -> DenseLayer:
        shards = 1 if window else seq
        slots = min(window, capacity) if window else shards * -(-capacity // shards)
        return DenseLayer(jnp.zeros((batch, h, slots, d), dt), jnp.zeros((batch, h, slots, d), dt), window,
                          shards, p)

    if isinstance(kv, DenseKV):
        layers = tuple(dense(jnp.dtype(kv.dtype), cfg.window(i)) for i in range(cfg.n_layers))
        return KVCache(tuple(layers), jnp.zeros((batch,), jnp.int32), capacity)
    kv.validate(cfg)
    window_dt = dtype if kv.window_dtype == "compute" else jnp.dtype(kv.window_dtype)
    scale_dtype = jnp.dtype(kv.scale_dtype)
    layers = []
    for i, (ks, vs) in enumerate(zip(kv.keys, kv.values)):
        window = cfg.window(i)
        if ks.dense and vs.dense and "hadamard" not in (kv.key_rotation(i), kv.value_rotation(i)):
            # Both 16-bit: the plain dense layer, so a 16-bit plan reproduces the dense path exactly
            # (keys kept before RoPE at full precision would only be rotated back and forth).
            layers.append(dense(dtype, window))
            continue
        block = kv.block(i)
        shards = 1 if window else seq
        # A local layer attends to its window only: no sink, and a body ring just longer than the
        # window (a block more, so the oldest visible block is never the one being overwritten).
        sink = 0 if window else kv.sink
        body = max(0, capacity - sink)
        if window:
            nb = chunk_tokens(ks, vs, block, window + block)
        elif shards > 1:  # each seq slice: a whole number of packing units
            nb = chunk_tokens(ks, vs, block, max(1, -(-body // shards)))
        else:
            base = chunk_tokens(ks, vs, block)
            nb = max(base, -(-body // base) * base)
        # Never longer than the most tokens the body will hold packed (short contexts read less).
        most = chunk_tokens(ks, vs, block, max(1, capacity - sink - kv.residual))
        nb = min(nb, most) if window else nb
        loop = min(nb, most, chunk_tokens(ks, vs, block, chunk or loop_chunk_target(batch * h)))
        layers.append(QuantLayer(
            sink_k=jnp.zeros((batch, h, sink, d), window_dt),
            sink_v=jnp.zeros((batch, h, sink, d), window_dt),
            recent_k=jnp.zeros((batch, h, kv.residual, d), window_dt),
            recent_v=jnp.zeros((batch, h, kv.residual, d), window_dt),
            k=_packed_tensor(ks, batch, h, nb, d, block, dtype, scale_dtype, shards),
            v=_packed_tensor(vs, batch, h, nb, d, block, dtype, scale_dtype, shards),
            sink=sink, residual=kv.residual, block=block, chunk=loop, body_capacity=shards * nb,
            rotate=kv.rotation(i), window=window, shards=shards, placement=p,
            rope=cfg.rope(i) if kv.key_rotation(i) == "prerope" else None,
        ))
    return KVCache(tuple(layers), jnp.zeros((batch,), jnp.int32), capacity)


# ----------------------------------------------------------------------------- segment bookkeeping


def check_room(lengths: np.ndarray | Array, n_new: np.ndarray | Array, capacity: int, extra: int = 0) -> None:
    """One clear KvqError if some row's cached + new (+ extra) positions exceed the capacity.

    The one capacity check: eager model calls, prefill and generate all go through it. Traced
    arguments (under jit) are not checked here; their caller checked before launch.
    """
    if isinstance(lengths, jax.core.Tracer) or isinstance(n_new, jax.core.Tracer):
        return
    from kvq_jax.sharding import to_host

    lengths = to_host(lengths).astype(np.int64)
    n_new = np.broadcast_to(to_host(n_new).astype(np.int64), lengths.shape)
    need = lengths + n_new + extra
    if need.max(initial=0) > capacity:
        row = int(np.argmax(need))
        what = f"{int(lengths[row])} cached + {int(n_new[row])} new tokens"
        if extra:
            what += f" + max_new_tokens {extra}"
        raise KvqError(f"row {row}: {what} = {int(need[row])} exceeds the cache capacity "
                       f"({capacity} positions; {max(0, capacity - int(lengths[row]))} left)")


def ring_position(slot: Array, end: Array, size: int) -> Array:
    """The item a ring slot holds: the newest index below `end` congruent to `slot` mod `size`.

    The one map from ring slots to what they hold (dense window slots to positions, a local body's
    slots and the recent ring's slots to body tokens). Negative: the slot holds nothing yet.
    """
    return end - 1 - (end - 1 - slot) % size


def quantized_count(layer: QuantLayer, lengths: Array) -> Array:
    """Body tokens held in packed form per row: `G * ceil(max(0, m - R) / G)`, `m = max(0, n - S)`.

    Never more than m: with R >= G that holds by itself; a window-less layer (R = 0, dense bodies
    only) holds every body token in the body.
    """
    m = jnp.maximum(lengths - layer.sink, 0)
    g = layer.block
    return jnp.minimum(g * ((jnp.maximum(m - layer.residual, 0) + g - 1) // g), m)


# ----------------------------------------------------------------------------- writes


def _scatter(buf: Array, x: Array, at: Array, enabled: Array) -> Array:
    """Per row b and token t: `buf[b, :, at[b, t]] = x[b, :, t]` where `enabled[b, t]`.

    buf `[B, H, N, X]`, x `[B, H, T, X]`, at / enabled `[B, T]`. One scatter that drops disabled and
    out-of-range tokens (their index is pushed past N) and reads nothing back from `buf`: XLA then
    updates the buffer in place (a read-modify-write that kept old tokens made XLA copy whole cache
    buffers every step). Enabled indices of a row must be distinct.
    """
    b, h, n, _ = buf.shape
    at = jnp.where(enabled & (at >= 0) & (at < n), at, n)
    rows = jnp.arange(b)[:, None, None]
    heads = jnp.arange(h)[None, :, None]
    return buf.at[rows, heads, at[:, None, :]].set(x.astype(buf.dtype), mode="drop")


def _store_body(t: PackedTensor, x: Array, start: Array, live: Array, reuse: bool = False) -> PackedTensor:
    """Stores body tokens `x [B, H, F, D]` at body slot `start[b]` onward where `live [B, F]`.

    F is a multiple of the layer's block and `start` a block boundary, so every quantization group
    (G tokens per channel, or one token's channels) is quantized from exactly its own tokens: what a
    block stores never depends on how the tokens arrived. `reuse`: the slots may hold older tokens
    (a local layer's body ring), so their digits are overwritten instead of added.
    """
    spec = t.spec
    f = x.shape[2]
    idx = start[:, None] + jnp.arange(f)[None, :]
    if spec.dense:
        return t.replace(words=_scatter(t.words, x, idx, live))
    codes, s, z = quant.quantize(x, spec.bits, spec.axis, spec.group, scale_dtype=t.scale.dtype,
                                 valid=live[:, None, :, None], levels=spec.levels)
    codes = jnp.where(live[:, None, :, None], codes, 0).astype(codes.dtype)
    if reuse:
        put = lambda w, c, at, on: packing.put_block(w, c, at, spec.bits, on)
        words = jax.vmap(put)(t.words, codes, start, live[:, 0])
    else:  # digits of the body past `start` are still zero, so the codes are added into the words
        words = jax.vmap(lambda w, c, at: packing.add_block(w, c, at, spec.bits))(t.words, codes, start)
    if spec.axis == "channel":
        g = spec.group
        rows, rows_live = idx[:, ::g] // g, live[:, ::g]
    else:
        rows, rows_live = idx, live
    return t.replace(words=words, scale=_scatter(t.scale, s, rows, rows_live),
                     zero=_scatter(t.zero, z, rows, rows_live))


def slice_of(layer: QuantLayer, seq: str | None) -> tuple[Array | int, str | None, Array | int]:
    """Inside `shard_map` with the layer split along mesh axis `seq` (None: not split): this device's
    first body token, the axis its split ring is gathered over when flushing (None: whole ring
    here), and its first ring slot."""
    if seq is None:
        return 0, None, 0
    i = jax.lax.axis_index(seq)
    if not ring_split(layer):
        return i * layer.body_capacity, None, 0
    return i * layer.body_capacity, seq, i * layer.recent_k.shape[2]


def write(layer: LayerCache, k: Array, v: Array, lengths: Array, n_new: Array,
          seq: str | None = None) -> LayerCache:
    """Stores the first `n_new[b]` of k, v `[B, H, T, D]` at positions `lengths[b] + t`.

    The one write of the cache, for any T at any fill: `write_window(flush(...))` for a quantized
    layer (`seq`: the mesh axis its body is split along, inside `shard_map`). A row with `n_new[b] == 0`
    is left exactly as it was. Positions at or past the capacity are dropped, never wrapped: callers
    check the capacity before launch.
    """
    if isinstance(layer, DenseLayer):
        pos, valid = _positions(k, lengths, n_new)
        if layer.window:  # only the newest C positions of the call reach the C slots, each once
            c = layer.k.shape[2]
            valid = valid & (pos >= (lengths + n_new)[:, None] - c)
            pos = pos % c
        return layer.replace(k=_scatter(layer.k, k, pos, valid), v=_scatter(layer.v, v, pos, valid))
    body_start, ring_seq, ring_start = slice_of(layer, seq)
    return write_window(flush(layer, k, v, lengths, n_new, body_start, ring_seq), k, v, lengths, n_new, ring_start)


def _positions(k: Array, lengths: Array, n_new: Array) -> tuple[Array, Array]:
    """Positions `[B, T]` of the new tokens and which of them are real."""
    tok = jnp.arange(k.shape[2])[None, :]
    return lengths[:, None] + tok, tok < n_new[:, None]


def flush(layer: QuantLayer, k: Array, v: Array, lengths: Array, n_new: Array,
          body_start: Array | int = 0, seq: str | None = None) -> QuantLayer:
    """The packed-body half of `write`: quantizes every body block the ring overflows into.

    Body blocks `[Q(n), Q(n + n_new))` are taken, in order, from the ring (old tokens) and from the new
    tokens k, v `[B, H, T, D]`. Only body digits and scale rows at or past Q(n) change, so a reader of
    the first Q(n) body tokens sees them as before (attention reads the old cache through this).
    `body_start`: the layer holds body tokens `[body_start, body_start + body_capacity)` only (one
    device's slice of a body split along the mesh's `seq` axis); blocks outside it are not stored.
    `seq`: the mesh axis this device's slice of a split ring (`ring_split`) is gathered over when a
    block is flushed (inside `shard_map`), None when the layer holds its whole ring.
    """
    s, r, g = layer.sink, layer.residual, layer.block
    t = k.shape[2]
    m0 = jnp.maximum(lengths - s, 0)
    q0, q1 = quantized_count(layer, lengths), quantized_count(layer, lengths + n_new)

    def tokens(lay: QuantLayer, j: Array) -> tuple[Array, Array]:
        """K, V `[B, H, F, D]` of body tokens j `[B, F]`: in ring slot j % R while j < m0, else new
        token j + S - lengths."""
        if seq is not None:  # the whole ring, only on the steps that flush
            whole = lambda x: jax.lax.all_gather(x, seq, axis=2, tiled=True)
            lay = lay.replace(recent_k=whole(lay.recent_k), recent_v=whole(lay.recent_v))
        src = jnp.where(j < m0[:, None], j % max(r, 1), r + j + s - lengths[:, None])
        src = jnp.clip(src, 0, r + t - 1)[:, None, :, None]

        def take(ring: Array, new: Array) -> Array:
            pool = jnp.concatenate([ring, new.astype(ring.dtype)], axis=2)  # [B, H, R + T, D]
            return jnp.take_along_axis(pool, jnp.broadcast_to(src, (*pool.shape[:2], j.shape[1], pool.shape[3])), axis=2)

        kx = take(lay.recent_k, k)
        if lay.rope is not None:  # the body keeps keys before RoPE: rotate back by position S + j
            kx = apply_rope(kx.astype(jnp.float32), (j + s)[:, None, :], lay.rope, inverse=True)
        return kx, take(lay.recent_v, v)

    def run(lay: QuantLayer) -> QuantLayer:
        f = g * -(-t // g)  # Q1 - Q0 <= G * ceil(T / G)
        # Both Q(n) and a slice's start are whole blocks, so the blocks of [Q0, Q1) that land in the
        # slice start at `first` and are quantized from exactly their own tokens, as unsplit.
        first = jnp.maximum(q0, body_start)
        j = first[:, None] + jnp.arange(f)[None, :]
        kx, vx = tokens(lay, j)
        live = (j < q1[:, None]) & (j < body_start + lay.body_capacity)
        at = first - body_start
        return lay.replace(k=_store_body(lay.k, kx, at, live), v=_store_body(lay.v, vx, at, live))

    def run_ring(lay: QuantLayer) -> QuantLayer:
        # A local layer's body is a ring: only its newest body_capacity tokens survive the call, one
        # block at a time (a block never wraps: the ring is a whole number of blocks).
        nb = lay.body_capacity
        first = jnp.maximum(q0, q1 - nb)
        for i in range(min(-(-t // g), nb // g)):
            j = first[:, None] + i * g + jnp.arange(g)[None, :]
            kx, vx = tokens(lay, j)
            live = j < q1[:, None]
            slot = (first + i * g) % nb
            lay = lay.replace(k=_store_body(lay.k, kx, slot, live, reuse=True),
                              v=_store_body(lay.v, vx, slot, live, reuse=True))
        return lay

    return jax.lax.cond(jnp.any(q1 > q0), run_ring if layer.window else run, lambda lay: lay, layer)


def write_window(layer: QuantLayer, k: Array, v: Array, lengths: Array, n_new: Array,
                 ring_start: Array | int = 0) -> QuantLayer:
    """The full-precision half of `write`: new positions below S go to the sink, and the newest R
    body tokens of the call to the ring (body token j in slot j % R), after `flush` took what they
    overwrite. `ring_start`: the layer holds ring slots from `ring_start` on only (a split ring)."""
    s, r = layer.sink, layer.residual
    pos, valid = _positions(k, lengths, n_new)
    if s:  # a 0-token sink has nothing to write
        in_sink = valid & (pos < s)
        layer = layer.replace(sink_k=_scatter(layer.sink_k, k, pos, in_sink),
                              sink_v=_scatter(layer.sink_v, v, pos, in_sink))
    if r:
        j = pos - s
        m1 = jnp.maximum(lengths + n_new - s, 0)
        # Only the newest R body tokens of the call reach the ring, so a slot is written at most once.
        ring = valid & (j >= 0) & (j >= m1[:, None] - r)
        slot = j % r - ring_start
        layer = layer.replace(recent_k=_scatter(layer.recent_k, k, slot, ring),
                              recent_v=_scatter(layer.recent_v, v, slot, ring))
    return layer
