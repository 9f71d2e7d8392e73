"""The one attention entry point: attend over the cache and the new tokens, then write them.

Any number T >= 1 of new tokens at any fill: new token t of row b (position `lengths[b] + t`) attends
to everything the row already holds, read as it is stored (a dense layer; or a quantized layer's
sink, packed body and recent ring), and causally, at full precision, to the new tokens up to itself.
The segments are attended separately and merged exactly with log-sum-exp; then the new tokens are
written (`cache.write`). A one-shot prefill is this path on an empty cache; a decode step is T == 1.
The packed body is read by the XLA path (a loop that dequantizes one chunk at a time) or by the
Pallas kernel.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from kvq_jax import cache as kvcache
from kvq_jax import packing, quant
from kvq_jax.cache import DenseLayer, LayerCache, PackedTensor, QuantLayer
from kvq_jax.errors import KvqError
from kvq_jax.plan import split_rotation
from kvq_jax.rotations import apply_rope, hadamard

Array = jax.Array
IMPLS = ("auto", "xla", "pallas", "pallas_interpret")
# The XLA path with every loop of static length (unfilled chunks masked, not skipped), so reverse-mode
# differentiation works: the analysis differentiates the loss through the model's own forward pass.
DIFFERENTIABLE = "xla_differentiable"
_NEG = -1e30  # finite "minus infinity" for masked scores: exp() of it is exactly 0, no NaN


def resolve_impl(impl: str) -> str:
    """`auto` → `pallas` on TPU/GPU, `xla` on CPU."""
    if impl not in IMPLS and impl != DIFFERENTIABLE:
        raise KvqError(f"bad attention implementation {impl!r} (choose from {', '.join(IMPLS)})")
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("tpu", "gpu") else "xla"
    return impl


# ----------------------------------------------------------------------------- position & rotation


def _rotations(layer: LayerCache, d: int) -> tuple[Array | None, Array | None]:
    """The layer's key and value rotations `[d, d]` (None: not rotated). A Hadamard side holds k @ H
    (v @ H; H orthonormal and symmetric, H @ H = I): q.k is unchanged with q @ H, and the cached
    segments' output is rotated back; outlier channels are spread before quantization. (Keys kept
    before RoPE are rotated by position in the cache itself: `QuantLayer.rope`.)"""
    if not isinstance(layer, QuantLayer):
        return None, None
    h = lambda r: jnp.asarray(hadamard(d), jnp.float32) if r == "hadamard" else None
    k, v = split_rotation(layer.rotate)
    return h(k), h(v)


def _rotate(x: Array, rot: Array | None) -> Array:
    return x if rot is None else x @ rot


# ----------------------------------------------------------------------------- segments


def _segment(q: Array, k: Array, v: Array, mask: Array) -> tuple[Array, Array]:
    """Attention over one segment. q `[B, H, R, D]` (pre-scaled), k/v `[B, H, N, D]`, mask `[B, N]`
    (the same keys for every query row) or `[B, R, N]`.

    Returns the normalised output `[B, H, R, D]` and the log-sum-exp `[B, H, R]` (-inf if empty).
    """
    mask = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]
    s = jnp.einsum("bhrd,bhnd->bhrn", q, k.astype(q.dtype))
    s = jnp.where(mask, s, _NEG)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhrn,bhnd->bhrd", p, v.astype(q.dtype)) / l
    lse = jnp.where(jnp.any(mask, axis=-1), (m + jnp.log(l))[..., 0], -jnp.inf)
    return o, lse


def merge(parts: list[tuple[Array, Array]]) -> tuple[Array, Array]:
    """Exact merge of normalised partial attentions `(out [..., R, D], lse [..., R])` by their
    log-sum-exp: the one LSE merge (segments here, kernel splits in `pallas_kernels`).

    Returns the merged output and log-sum-exp; rows empty in every part get out 0 and lse -inf.
    """
    lses = jnp.stack([lse for _, lse in parts])  # [S, ..., R]
    top = jnp.max(lses, axis=0)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.exp(lses - top)  # exp(-inf) = 0 for empty parts
    den = jnp.sum(w, axis=0)
    out = sum(wi[..., None] * o for wi, (o, _) in zip(w, parts))
    out = out / jnp.where(den > 0, den, 1.0)[..., None]
    lse = jnp.where(den > 0, top + jnp.log(jnp.where(den > 0, den, 1.0)), -jnp.inf)
    return out, lse


def dequant_chunk(t: PackedTensor, start: Array, n: int) -> Array:
    """Body tokens [start, start+n) of one packed tensor, dequantized: `[B, H, n, D]` float32.

    `start` and `n` are multiples of the words' digits and of the per-channel group.
    """
    spec = t.spec
    if spec.dense:
        return jax.lax.dynamic_slice_in_dim(t.words, start, n, axis=2).astype(jnp.float32)
    p = packing.digits_per_word(spec.bits)
    words = jax.lax.dynamic_slice_in_dim(t.words, start // p, n // p, axis=2)
    codes = quant.level_values(packing.unpack(words, spec.bits, dtype=jnp.float32), spec.levels)  # [B, H, n, D]
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


_GEMV_ROWS = 8  # query rows per KV head up to which q·k runs as matrix-vector products


def chunk_scores(q: Array, k: Array) -> Array:
    """q `[B, H, R, D]` · k `[B, H, n, D]` → `[B, H, R, n]`.

    For a decode step (R = query heads per KV head, small) as one matrix-vector product per query row:
    XLA:CPU runs the batched `[R, D] x [n, D]^T` product 1.2-1.6x slower than R matrix-vector products
    over the same chunk (benchmarks/xla_cpu.py, table in benchmarks/RESULTS.md). Prefill chunks (many
    rows) use one matrix product.
    """
    if q.shape[2] > _GEMV_ROWS:
        return jnp.einsum("bhrd,bhnd->bhrn", q, k)
    return jnp.stack([jnp.einsum("bhnd,bhd->bhn", k, q[:, :, i]) for i in range(q.shape[2])], axis=2)


def flash_loop(q: Array, fetch: Callable[[Array, int], tuple[Array, Array]], visible: Callable[[Array], Array],
               n_stored: Array, chunk: int, total: int, static: bool = False) -> tuple[Array, Array]:
    """Online-softmax attention over a store of `total` slots, one chunk at a time.

    q `[B, H, R, D]` pre-scaled; `fetch(start, n)` → k, v `[B, H, n, D]` float32 (slots
    [start, start + n)); `visible(slots [n])` → bool `[B, R | 1, n]`, which slots each query row sees.
    Only chunks below `n_stored` (an int32 scalar) are read, so the cost follows the filled length,
    not the capacity; `static` visits every chunk (a loop of fixed length: differentiable). Returns out `[B, H, R, D]` and lse `[B, H, R]` (rows that see nothing: 0, -inf).
    """
    c = min(chunk, total)
    b, h, r, d = q.shape
    n_chunks = -(-total // c) if static else (jnp.minimum(n_stored, total) + c - 1) // c

    def body(i, carry):
        m, l, acc = carry
        # The chunk need not divide the store: the last one is moved back to end at the store's end,
        # and the slots it shares with the previous chunk are masked out.
        start = jnp.minimum(i * c, total - c)
        kc, vc = fetch(start, c)
        s = chunk_scores(q, kc)
        pos = start + jnp.arange(c)
        s = jnp.where((pos >= i * c) & visible(pos)[:, None], s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l = l * alpha + jnp.sum(p, axis=-1)
        acc = acc * alpha[..., None] + jnp.einsum("bhrn,bhnd->bhrd", p, vc)
        return m_new, l, acc

    init = (jnp.full((b, h, r), _NEG, jnp.float32), jnp.zeros((b, h, r), jnp.float32),
            jnp.zeros((b, h, r, d), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, n_chunks, body, init)
    # A row that saw no slot kept m at _NEG (masked scores are exactly _NEG, real ones far above).
    empty = m <= _NEG
    out = jnp.where(empty[..., None], 0.0, acc / jnp.maximum(l, 1e-30)[..., None])
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.maximum(l, 1e-30)))
    return out, lse


def _below(n_valid: Array) -> Callable[[Array], Array]:
    """Visibility of slots `[0, n_valid)`: n_valid `[B]` or `[B, R]` per query row."""
    lim = (n_valid[:, None] if n_valid.ndim == 1 else n_valid)[..., None]  # [B, R | 1, 1]
    return lambda pos: pos < lim


def _in_window(end: Array, size: int, lo: Array | None) -> Callable[[Array], Array]:
    """Visibility of a ring of `size` slots holding the items below `end [B]`, from `lo [B, R]` on."""
    def visible(slot: Array) -> Array:
        j = kvcache.ring_position(slot[None, None, :], end[:, None, None], size)  # [B, 1, n]
        return (j >= 0) if lo is None else (j >= 0) & (j >= lo[..., None])
    return visible


def _fetch_packed(layer: QuantLayer, positions: Callable[[Array], Array]) -> Callable[[Array, int], tuple[Array, Array]]:
    """Dequantized K, V of body slots `[start, start + n)`; a `prerope` layer's keys are rotated by
    RoPE at `positions(slots [n])` (`[B | 1, n]`: the positions the slots hold)."""
    def fetch(start: Array, n: int) -> tuple[Array, Array]:
        k = dequant_chunk(layer.k, start, n)
        if layer.rope is not None:
            k = apply_rope(k, positions(start + jnp.arange(n))[:, None, :], layer.rope)
        return k, dequant_chunk(layer.v, start, n)
    return fetch


def packed_xla(q: Array, layer: QuantLayer, n_valid: Array, static: bool = False,
               pos0: Array | int = 0) -> tuple[Array, Array]:
    """Flash-decoding over the packed body in XLA: one chunk dequantized at a time, online softmax.

    q `[B, H, R, D]` pre-scaled; n_valid `[B]` packed tokens per row; `pos0` the position of the
    first body slot (what a `prerope` layer's keys are rotated by).
    """
    fetch = _fetch_packed(layer, lambda slots: (pos0 + slots)[None, :])
    return flash_loop(q, fetch, _below(n_valid), jnp.max(n_valid), layer.chunk, layer.body_capacity, static)


def dense_read(q: Array, layer: DenseLayer, n_valid: Array, static: bool = False) -> tuple[Array, Array]:
    """Attention over the first `n_valid` positions (`[B]` or `[B, R]`) of a dense layer, in chunks."""
    b, h, cap, _ = layer.k.shape
    return flash_loop(q, _fetch_dense(layer), _below(n_valid), jnp.max(n_valid),
                      kvcache.loop_chunk_target(b * h), cap, static)


def _fetch_dense(layer: DenseLayer) -> Callable[[Array, int], tuple[Array, Array]]:
    return lambda start, n: tuple(jax.lax.dynamic_slice_in_dim(x, start, n, axis=2).astype(jnp.float32)
                                  for x in (layer.k, layer.v))


def read_window(q: Array, layer: LayerCache, lengths: Array, lo: Array, static: bool = False) -> tuple[Array, Array]:
    """Attention over what a sliding-window layer holds, from position `lo [B, R]` on (per query row).

    A dense window is a ring of positions; a quantized one a body ring (packed, read in XLA: it is
    only ~W tokens) plus the recent ring, LSE-merged. q `[B, H, R, D]` pre-scaled.
    """
    if isinstance(layer, DenseLayer):
        slots = layer.k.shape[2]
        return flash_loop(q, _fetch_dense(layer), _in_window(lengths, slots, lo), jnp.max(lengths),
                          slots, slots, static)
    n_quant = kvcache.quantized_count(layer, lengths)  # sink 0: body token j is position j
    nb, r = layer.body_capacity, layer.residual
    held = lambda slots: kvcache.ring_position(slots[None, :], n_quant[:, None], nb)  # [B, n] positions
    parts = [flash_loop(q, _fetch_packed(layer, held), _in_window(n_quant, nb, lo), jnp.max(n_quant),
                        layer.chunk, nb, static)]
    if r:
        j = kvcache.ring_position(jnp.arange(r)[None, None, :], (n_quant + r)[:, None, None], r)
        parts.append(_segment(q, layer.recent_k, layer.recent_v, (j < lengths[:, None, None]) & (j >= lo[..., None])))
    return merge(parts)


def packed_pallas(q: Array, layer: QuantLayer, n_valid: Array, interpret: bool,
                  pos0: Array | int = 0) -> tuple[Array, Array]:
    """The packed body through the fused Pallas kernel (pallas_kernels.decode_attention)."""
    from pallas_kernels import packed_decode_attention  # kernels are optional at import time

    ks, vs = layer.k.spec, layer.v.spec
    return packed_decode_attention(
        q, layer.k.words, layer.k.scale, layer.k.zero, layer.v.words, layer.v.scale, layer.v.zero,
        n_valid, k_bits=ks.bits, k_axis=ks.axis, k_group=ks.group, v_bits=vs.bits, v_axis=vs.axis,
        v_group=vs.group, backend="interpret" if interpret else "auto", k_rope=layer.rope, pos0=pos0,
        k_levels=ks.levels, v_levels=vs.levels,
    )


_KERNEL_ROWS = 16  # query rows per KV head the kernel takes (one Triton tile); prefill chunks use XLA


def _slice_start(seq: str | None, size: int) -> Array | int:
    """First token of this device's slice of a store split along `seq` in slices of `size` (0 if not)."""
    return 0 if seq is None else jax.lax.axis_index(seq) * size


def _across(part: tuple[Array, Array], seq: str | None) -> list[tuple[Array, Array]]:
    """A partial attention `(out, lse)` of this device's slice, with those of the other `seq` devices:
    only these small results cross devices, never the cache; `merge` combines them exactly."""
    if seq is None:
        return [part]
    o, lse = jax.lax.all_gather(part[0], seq), jax.lax.all_gather(part[1], seq)
    return [(o[i], lse[i]) for i in range(o.shape[0])]


def read_quantized(q: Array, layer: QuantLayer, lengths: Array, impl: str,
                   seq: str | None = None) -> tuple[Array, Array]:
    """Attention over what a quantized layer holds for rows of `lengths[b]` positions.

    q `[B, Hkv, R, D]` pre-scaled (R query rows per KV head: the GQA heads of one or more tokens).
    The sink, the packed body and the recent ring are attended separately and LSE-merged. Inside
    `shard_map` with the body split along mesh axis `seq`, `layer` holds this device's body slice
    (`body_capacity` tokens from body token `axis_index * body_capacity`) and, when the ring is split
    too (`ring_split`), its slice of the ring; the slices' partial results are merged across devices.
    """
    s, r = layer.sink, layer.residual
    parts = [_segment(q, layer.sink_k, layer.sink_v, jnp.arange(s)[None, :] < lengths[:, None])] if s else []
    n_quant = kvcache.quantized_count(layer, lengths)
    body_start, ring_seq, ring_start = kvcache.slice_of(layer, seq)
    n_body = jnp.clip(n_quant - body_start, 0, layer.body_capacity)
    dense_body = layer.k.spec.dense or layer.v.spec.dense
    pos0 = s + body_start  # the position of this device's first body slot
    if impl in ("xla", DIFFERENTIABLE) or dense_body or q.shape[2] > _KERNEL_ROWS:
        body = packed_xla(q, layer, n_body, impl == DIFFERENTIABLE, pos0)
    else:
        body = packed_pallas(q, layer, n_body, interpret=impl == "pallas_interpret", pos0=pos0)
    if not r:
        return merge(parts + _across(body, seq))
    m = jnp.maximum(lengths - s, 0)
    i = jnp.arange(layer.recent_k.shape[2])[None, :] + ring_start
    j = n_quant[:, None] + (i - n_quant[:, None]) % r  # body token held by ring slot i
    ring = _segment(q, layer.recent_k, layer.recent_v, j < m[:, None])
    # A split ring is merged with this device's body slice before crossing: one partial per device.
    return merge(parts + (_across(merge([body, ring]), seq) if ring_seq else _across(body, seq) + [ring]))


# ----------------------------------------------------------------------------- new tokens


def causal_new(q: Array, k: Array, v: Array, q_tok: Array, n_new: Array, window: int = 0) -> tuple[Array, Array]:
    """Full-precision causal attention of query rows over the new tokens.

    q `[B, H, R, D]` pre-scaled with `q_tok [R]` the new-token index of each row, k/v `[B, H, T, D]`,
    n_new `[B]` valid new tokens per row; `window` > 0 limits each row to its last `window` tokens.
    Returns out `[B, H, R, D]`, lse `[B, H, R]`.
    """
    kpos = jnp.arange(k.shape[2])[None, None, :]
    qt = q_tok[None, :, None]
    mask = (kpos <= qt) & (kpos < n_new[:, None, None])
    if window:
        mask = mask & (qt - kpos < window)
    return _segment(q, k, v, mask)


_QUERY_BLOCK = 256  # new tokens attended at once: scores stay O(block x (cache chunk + T))


def _by_query_blocks(q: Array, rep: int, t: int, fn: Callable[[Array, Array], Array], remat: bool = False) -> Array:
    """Applies `fn(q_rows, q_tok)` to blocks of `_QUERY_BLOCK` tokens' query rows (`rep` per token).

    q `[B, H, T * rep, D]`, rows ordered token-major. Returns `[B, H, T * rep, D]`. `remat`: a
    backward pass recomputes each block's scores instead of keeping them (`[rows, keys]` per block
    and layer would otherwise live until the gradient: O(T^2) memory per layer).
    """
    if remat:
        fn = jax.checkpoint(fn)
    tok = jnp.arange(t * rep) // rep
    if t <= _QUERY_BLOCK:
        return fn(q, tok)
    nb = -(-t // _QUERY_BLOCK)
    rows = _QUERY_BLOCK * rep
    pad = nb * rows - t * rep
    b, h, _, d = q.shape
    qb = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b, h, nb, rows, d).transpose(2, 0, 1, 3, 4)
    tb = (jnp.arange(nb * rows) // rep).reshape(nb, rows)
    out = jax.lax.map(lambda a: fn(*a), (qb, tb))  # [nb, B, H, rows, D]
    return out.transpose(1, 2, 0, 3, 4).reshape(b, h, nb * rows, d)[:, :, : t * rep]


# ----------------------------------------------------------------------------- entry point


def attention(q: Array, k: Array, v: Array, layer: LayerCache, lengths: Array, n_new: Array,
              impl: str = "xla", scale: float | None = None) -> tuple[Array, LayerCache]:
    """Attention with a cache, the single entry point used by the model.

    q `[B, T, Hq, D]`, k/v `[B, T, Hkv, D]` (RoPE applied), lengths `[B]` positions already cached,
    n_new `[B]` valid new tokens per row (any T >= 1 at any fill); scores are `scale * q·k` (default
    D ** -0.5). A sliding-window layer (`layer.window` W) lets each token see its last W positions.
    Softmax and its accumulators are float32 whatever the compute dtype. Returns the output
    `[B, T, Hq, D]` (rows past `n_new[b]` are padding) and the layer cache holding the new tokens too.

    A layer laid out on a mesh (`layer.placement`) runs inside `shard_map`: rows over `data`, KV heads
    over `model`, and a global layer's tokens over `seq` (context parallelism: each device attends over
    its own slice and writes the flushes that land in it).
    """
    heads = lambda p: p.spec(("batch", None, "kv_heads", "head_dim"))
    return _on_devices(layer, lambda lay, seq, *a: _attend(*a[:3], lay, *a[3:], impl, scale, seq),
                       (q, k, v, lengths, n_new), lambda p: (heads(p),) * 3 + (p.spec(("batch",)),) * 2, heads)


def store(layer: LayerCache, k: Array, v: Array, lengths: Array, n_new: Array) -> LayerCache:
    """Writes the first `n_new[b]` of k, v `[B, H, T, D]` (RoPE applied) at positions `lengths[b] + t`
    without attending: what `attention` would store for the same K/V (rotated as the layer says), on
    one device or the layer's mesh."""
    rot_k, rot_v = _rotations(layer, k.shape[-1])
    k, v = _rotate(k, rot_k), _rotate(v, rot_v)
    cache_spec = lambda p: p.spec(("batch", "kv_heads", None, "head_dim"))
    return _on_devices(layer, lambda lay, seq, *a: (None, kvcache.write(lay, *a, seq=seq)), (k, v, lengths, n_new),
                       lambda p: (cache_spec(p),) * 2 + (p.spec(("batch",)),) * 2, None)[1]


def _on_devices(layer: LayerCache, fn: Callable, args: tuple, arg_specs: Callable, out_spec: Callable | None):
    """`fn(layer, seq, *args) -> (out, layer)` on the layer's mesh (`layer.placement`) inside
    `shard_map`: rows over `data`, KV heads over `model`, a global layer's tokens over `seq` (the axis
    passed as `seq`, None when its tokens are not split); directly when the layer has no mesh.
    `arg_specs(placement)` and `out_spec(placement)` give the PartitionSpecs of args and out."""
    p = layer.placement
    if p is None:
        return fn(layer, None, *args)
    from kvq_jax.sharding import layer_specs

    seq = p.axis("cache_tokens") if layer.shards > 1 else None
    specs = layer_specs(layer)
    local_cap = layer.body_capacity // layer.shards if isinstance(layer, QuantLayer) else None

    def local(lay, *a):
        view = lay.replace(placement=None)
        if local_cap is not None:
            view = view.replace(body_capacity=local_cap)
        out, new = fn(view, seq, *a)
        new = new.replace(placement=p)
        return out, (new.replace(body_capacity=layer.body_capacity) if local_cap is not None else new)

    out_specs = (None if out_spec is None else out_spec(p), specs)
    return jax.shard_map(local, mesh=p.mesh, in_specs=(specs, *arg_specs(p)), out_specs=out_specs,
                         check_vma=False)(layer, *args)


def _attend(q: Array, k: Array, v: Array, layer: LayerCache, lengths: Array, n_new: Array,
            impl: str, scale: float | None, seq: str | None) -> tuple[Array, LayerCache]:
    """`attention` on one device's arrays; `seq` names the mesh axis a global layer's tokens are split
    along (this device holds slice `axis_index(seq)`), None when they are not."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    rep = hq // hkv
    rot_k, rot_v = _rotations(layer, d)
    heads = lambda x: x.transpose(0, 2, 1, 3)  # [B, T, H, D] -> [B, H, T, D]
    # Query rows token-major: row t * rep + i is query head i of KV head h for new token t.
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qh = (q.astype(jnp.float32) * scale).reshape(b, t, hkv, rep, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv, t * rep, d)
    kh, vh = heads(k), heads(v)
    impl = resolve_impl(impl)
    if layer.window:
        # Reads the old ring before the write, which may reuse slots earlier new tokens still see (a
        # ring is ~W tokens: a copy of it costs little).
        w = layer.window
        kc, vc = _rotate(kh, rot_k), _rotate(vh, rot_v)

        def block(qb: Array, q_tok: Array) -> Array:
            lo = lengths[:, None] + q_tok[None, :] - (w - 1)  # [B, rows] oldest visible position
            o, lse = read_window(_rotate(qb, rot_k), layer, lengths, lo, impl == DIFFERENTIABLE)
            return merge([(_rotate(o, rot_v), lse), causal_new(qb, kh, vh, q_tok, n_new, w)])[0]

        out = _by_query_blocks(qh, rep, t, block, remat=impl == DIFFERENTIABLE)
        layer = kvcache.write(layer, kc, vc, lengths, n_new)
    elif isinstance(layer, DenseLayer):
        # A dense layer stores what it is given, so the new tokens are written first and every query
        # reads the buffer causally (up to its own position); written before it is read, the buffer is
        # updated in place (the reverse order made XLA copy it). Split along `seq`, this device
        # holds positions [start, start + C) and writes and reads only those.
        start = _slice_start(seq, layer.k.shape[2])
        layer = kvcache.write(layer, kh, vh, lengths - start, n_new)
        upto = lambda tok: jnp.maximum(lengths[:, None] + jnp.minimum(tok[None, :] + 1, n_new[:, None]) - start, 0)
        static = impl == DIFFERENTIABLE
        out = _by_query_blocks(qh, rep, t, lambda qb, tok: merge(_across(dense_read(qb, layer, upto(tok), static), seq))[0],
                               remat=static)
    else:
        kc, vc = _rotate(kh, rot_k), _rotate(vh, rot_v)
        # The body is flushed first (it only changes past what is read: the old Q(n) packed tokens),
        # then the old sink and ring are read, then overwritten.
        body_start, ring_seq, ring_start = kvcache.slice_of(layer, seq)
        flushed = kvcache.flush(layer, kc, vc, lengths, n_new, body_start, ring_seq)

        def block(qb: Array, q_tok: Array) -> Array:
            o, lse = read_quantized(_rotate(qb, rot_k), flushed, lengths, impl, seq)
            return merge([(_rotate(o, rot_v), lse), causal_new(qb, kh, vh, q_tok, n_new)])[0]

        out = _by_query_blocks(qh, rep, t, block, remat=impl == DIFFERENTIABLE)
        layer = kvcache.write_window(flushed, kc, vc, lengths, n_new, ring_start)
    out = out.reshape(b, hkv, t, rep, d).transpose(0, 2, 1, 3, 4).reshape(b, t, hq, d)
    return out.astype(q.dtype), layer
