"""Fused dequantizing flash-decoding over the packed KV body (see docs/architecture.md).

`packed_decode_attention` reads the uint32 words `[B, Hkv, W, D]` block by block, unpacks the digits
on chip (shifts/masks, or exact base-3 division for 1.58 bits), folds the scales/zeros into the two
attention products, and runs an online softmax; sequence splits are merged by log-sum-exp here.

Backends:
  - "tpu": Mosaic kernel (`_tpu_kernel`), grid (B, Hkv, splits, blocks), `n_valid` scalar-prefetched.
  - "gpu": Triton kernel (`_loop_kernel`), grid (B, Hkv, splits), in-kernel loop over valid blocks.
  - "interpret": the same loop kernel with `interpret=True` (any platform).
  - "tpu_interpret": the TPU kernel with `interpret=pltpu.InterpretParams()` (TPU memory semantics).
  - "auto": tpu on TPU, gpu on GPU, interpret elsewhere.

Block size (`block_tokens`, tokens per step): TPU — a multiple of lcm(8·P_k, 8·P_v, 16, per-channel
groups), default the largest such multiple <= 512 (at least one unit): words blocks are whole
8-sublane tiles and blocks start on group boundaries. GPU/interpret — default 64 (or the
per-channel group when larger); the GPU needs it, head_dim and per-token group counts to be powers
of two, every width takes the same path, and n_rep is zero-padded to a power of two >= 16 (Triton
dots need M >= 16).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kvq_jax.errors import KvqError
from kvq_jax.rotations import Rope, apply_rope, rope_frequencies
from pallas_kernels import _common as C
from pallas_kernels._loop_kernel import loop_attention
from pallas_kernels._tpu_kernel import tpu_attention

Array = jax.Array
BACKENDS = ("auto", "tpu", "gpu", "interpret", "tpu_interpret")
_TPU_TARGET = 512  # tokens per block on TPU: amortises the ~0.35 µs per grid step
_GPU_BLOCK = 64  # tokens per loop step on GPU: keeps the [T, D] code tiles in registers


def resolve_backend(backend: str) -> str:
    """`auto` → the platform's kernel (tpu / gpu), else the interpreter."""
    if backend not in BACKENDS:
        raise KvqError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    platform = jax.default_backend()
    if platform == "tpu":
        return "tpu"
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    return "interpret"


def tpu_block_unit(klay: C.Layout, vlay: C.Layout) -> int:
    """Smallest TPU block: a multiple of 8·P of both widths (8-sublane word blocks), of 16 (bf16
    per-token scale tiles) and of each per-channel group (blocks start on group boundaries)."""
    unit = math.lcm(8 * klay.digits, 8 * vlay.digits, 16)
    for lay in (klay, vlay):
        if lay.axis == "channel":
            unit = math.lcm(unit, lay.group)
    return unit


def default_block(klay: C.Layout, vlay: C.Layout, backend: str) -> int:
    """TPU: the largest multiple of the unit <= 512 (at least one unit). Loop kernels: a power of
    two >= 64 that the per-channel groups divide (Triton needs power-of-two tiles)."""
    if backend in ("tpu", "tpu_interpret"):
        unit = tpu_block_unit(klay, vlay)
        return unit * max(1, _TPU_TARGET // unit)
    groups = [lay.group for lay in (klay, vlay) if lay.axis == "channel"]
    base = math.lcm(*groups) if groups else 1
    return base * -(-_GPU_BLOCK // base) if base & (base - 1) else max(_GPU_BLOCK, base)


def _check_block(block: int, klay: C.Layout, vlay: C.Layout, backend: str, d: int) -> None:
    if not isinstance(block, int) or block < 1:
        raise KvqError(f"block_tokens must be a positive int, got {block!r}")
    if backend in ("tpu", "tpu_interpret"):
        unit = tpu_block_unit(klay, vlay)
        if block % unit:
            raise KvqError(f"TPU block_tokens must be a multiple of {unit}, got {block}")
        return
    for lay in (klay, vlay):
        if lay.axis == "channel" and block % lay.group and lay.group % block:
            raise KvqError(f"block_tokens {block} and per-channel group {lay.group} must divide "
                           "one another")
    if backend == "gpu":
        pow2 = [x for x in (block, d) if x & (x - 1)]
        pow2 += [d // lay.group for lay in (klay, vlay)
                 if lay.axis == "token" and (d // lay.group) & (d // lay.group - 1)]
        if pow2:
            raise KvqError("the Triton kernel needs power-of-two block_tokens, head_dim and "
                           f"per-token group counts; got {pow2} (use the XLA path)")


def _capacity(words: Array, scale: Array, lay: C.Layout) -> int:
    rows = scale.shape[2] * (lay.group if lay.axis == "channel" else 1)
    return min(words.shape[2] * lay.digits, rows)


def _default_splits(b: int, h: int, n_blocks: int, backend: str) -> int:
    """Sequence splits: enough programs to fill a GPU; TPU only splits to feed both megacore
    TensorCores when B·H is 1; the interpreter uses two so the merge is exercised."""
    if backend == "gpu":
        want = max(1, -(-256 // (b * h)))
        return max(1, min(want, n_blocks // 4, n_blocks))
    if backend in ("tpu", "tpu_interpret"):
        return 2 if b * h == 1 and n_blocks >= 2 else 1
    return min(2, n_blocks)


def _pad_rows(x: Array, rows: int) -> Array:
    """Zero-pads axis 2 of `[B, H, N, X]` up to `rows` (no-op when already that long)."""
    if x.shape[2] >= rows:
        return x
    return jnp.pad(x, [(0, 0), (0, 0), (0, rows - x.shape[2]), (0, 0)])


def merge_splits(out: Array, lse: Array) -> tuple[Array, Array]:
    """Log-sum-exp merge over the split axis 2: out `[B, H, S, R, D]`, lse `[B, H, S, R]`."""
    from kvq_jax.attention import merge  # the one LSE merge (attention imports this package lazily)

    return merge([(out[:, :, i], lse[:, :, i]) for i in range(out.shape[2])])


def packed_decode_attention(
    q: Array,
    k_words: Array, k_scale: Array, k_zero: Array,
    v_words: Array, v_scale: Array, v_zero: Array,
    n_valid: Array,
    *,
    k_bits: float, k_axis: str, k_group: int,
    v_bits: float, v_axis: str, v_group: int,
    block_tokens: int | None = None,
    num_splits: int | None = None,
    backend: str = "auto",
    k_rope: Rope | None = None,
    pos0: Array | int = 0,
    k_levels: tuple[float, ...] | None = None,
    v_levels: tuple[float, ...] | None = None,
) -> tuple[Array, Array]:
    """Attention of `q` over the packed tokens `[0, n_valid[b])` of each row.

    q `[B, Hkv, n_rep, D]` float32, pre-scaled by the softmax scale (GQA: the n_rep query heads of a
    KV head together). k/v words `[B, Hkv, W, D]` uint32 (token t = digit t % P of word t // P).
    Scales/zeros (bf16 or f32): axis "channel" `[B, Hkv, NB, D]` (row t // group), axis "token"
    `[B, Hkv, NT, D // group]` (row t). value = code * scale + zero, or with a codebook
    `k_levels`/`v_levels` (one float per code, `kvq_jax.quant`) levels[code] * scale + zero. n_valid `[B]` int32.
    `k_rope` (theta, scaling): the keys are stored before RoPE, token t at position `pos0 + t`
    (an int32 scalar, the same for every row); each key block is dequantized and rotated on chip.

    Returns out `[B, Hkv, n_rep, D]` float32 (normalised) and lse `[B, Hkv, n_rep]` float32; a row
    with no valid token gets out 0 and lse -inf. Static: widths, axes, groups, block_tokens,
    num_splits, backend, k_rope, k_levels, v_levels. jit- and while_loop-safe.
    """
    backend = resolve_backend(backend)
    q = jnp.asarray(q, jnp.float32)
    b, h, r, d = q.shape
    if k_rope is not None and d % 2:
        raise KvqError(f"keys stored before RoPE need an even head_dim, got {d}")
    klay = C.Layout.make(k_bits, k_axis, k_group, d, k_levels)
    vlay = C.Layout.make(v_bits, v_axis, v_group, d, v_levels)
    _check_operands(q, k_words, k_scale, k_zero, klay, "k")
    _check_operands(q, v_words, v_scale, v_zero, vlay, "v")
    block = default_block(klay, vlay, backend) if block_tokens is None else block_tokens
    _check_block(block, klay, vlay, backend, d)

    # Tokens that words and scales all describe; n_valid beyond that would read past them.
    capacity = min(_capacity(k_words, k_scale, klay), _capacity(v_words, v_scale, vlay))
    n_valid = jnp.clip(jnp.broadcast_to(jnp.asarray(n_valid, jnp.int32), (b,)), 0, capacity)
    n_blocks = max(1, -(-capacity // block))
    splits = num_splits or _default_splits(b, h, n_blocks, backend)
    per_split = -(-n_blocks // max(1, min(int(splits), n_blocks)))
    splits = -(-n_blocks // per_split)  # no split left without blocks

    # int32 views of the words: same bits, and the signed type every lowering handles.
    kw = lax.bitcast_convert_type(k_words, jnp.int32)
    vw = lax.bitcast_convert_type(v_words, jnp.int32)
    geometry = dict(klay=klay, vlay=vlay, block=block, blocks_per_split=per_split, splits=splits)
    rope = (jnp.reshape(jnp.asarray(pos0, jnp.int32), (1,)), _inverse_frequencies(k_rope, d))
    if backend in ("tpu", "tpu_interpret"):
        q = _pad_rows(q, -(-r // 8) * 8)  # whole sublane tiles for the stacked per-group q rows
        kw, ks, kz = _cover_one_block(kw, k_scale, k_zero, klay, block)
        vw, vs, vz = _cover_one_block(vw, v_scale, v_zero, vlay, block)
        out, lse = tpu_attention(q, kw, ks, kz, vw, vs, vz, n_valid, *rope, **geometry,
                                 interpret=_tpu_interpret_params() if backend == "tpu_interpret" else False)
    else:
        # Triton dots need M >= 16 and power-of-two tiles; the interpreter runs the same shapes.
        q = _pad_rows(q, max(16, 1 << (r - 1).bit_length()))
        out, lse = loop_attention(q, kw, k_scale, k_zero, vw, v_scale, v_zero, n_valid, *rope, **geometry,
                                  interpret=backend == "interpret")
    return merge_splits(out[:, :, :, :r], lse[:, :, :, :r, 0])


def _inverse_frequencies(k_rope: Rope | None, d: int) -> Array | None:
    """`[1, D]` float32: the RoPE inverse frequencies twice (rotate-half pairs lane i with i + D/2)."""
    if k_rope is None:
        return None
    inv = rope_frequencies(d, *k_rope)
    return jnp.asarray(np.concatenate([inv, inv])[None, :], jnp.float32)


def _check_operands(q: Array, words: Array, scale: Array, zero: Array, lay: C.Layout, name: str) -> None:
    b, h, _, d = q.shape
    if words.ndim != 4 or words.shape[:2] != (b, h) or words.shape[3] != d or words.dtype != jnp.uint32:
        raise KvqError(f"{name}_words must be uint32 [{b}, {h}, W, {d}], got {words.dtype} "
                       f"{tuple(words.shape)}")
    lanes = d if lay.axis == "channel" else d // lay.group
    if scale.ndim != 4 or scale.shape[:2] != (b, h) or scale.shape[3] != lanes:
        raise KvqError(f"{name}_scale must be [{b}, {h}, rows, {lanes}] for axis={lay.axis} "
                       f"group={lay.group}, got {tuple(scale.shape)}")
    if zero.shape != scale.shape:
        raise KvqError(f"{name}_zero {tuple(zero.shape)} must match {name}_scale {tuple(scale.shape)}")


def _cover_one_block(words: Array, scale: Array, zero: Array, lay: C.Layout, block: int):
    """TPU blocks may not exceed the arrays: pads caches smaller than one block (tests, tiny
    prompts) — a no-op for real cache sizes."""
    words = _pad_rows(words, block // lay.digits)
    if lay.axis == "token":
        scale, zero = _pad_rows(scale, block), _pad_rows(zero, block)
    return words, scale, zero


def _tpu_interpret_params():
    from jax.experimental.pallas import tpu as pltpu

    params = getattr(pltpu, "InterpretParams", None)
    return params() if params is not None else True  # older jax: the generic interpreter


def reference_packed_attention(
    q: Array,
    k_words: Array, k_scale: Array, k_zero: Array,
    v_words: Array, v_scale: Array, v_zero: Array,
    n_valid: Array,
    *,
    k_bits: float, k_axis: str, k_group: int,
    v_bits: float, v_axis: str, v_group: int,
    block_tokens: int | None = None,
    num_splits: int | None = None,
    k_rope: Rope | None = None,
    pos0: Array | int = 0,
    k_levels: tuple[float, ...] | None = None,
    v_levels: tuple[float, ...] | None = None,
) -> tuple[Array, Array]:
    """Pure-jnp reference of `packed_decode_attention` (same arguments; block/splits ignored).

    Unpacks with `kvq_jax.packing`, dequantizes with `kvq_jax.quant`, masked softmax over all
    tokens at once. Materialises the whole dequantized cache: for tests and small inputs only.
    """
    from kvq_jax import packing, quant

    del block_tokens, num_splits
    q = jnp.asarray(q, jnp.float32)
    b = q.shape[0]

    def dense(words, scale, zero, bits, axis, group, levels):
        codes = packing.unpack(words, bits)
        # quant.dequantize wants exactly the tokens the scales describe: crop or zero-pad the codes.
        n_tok = scale.shape[2] * group if axis == "channel" else scale.shape[2]
        t = codes.shape[2]
        codes = codes[:, :, :n_tok] if t >= n_tok else jnp.pad(
            codes, [(0, 0), (0, 0), (0, n_tok - t), (0, 0)])
        return quant.dequantize(codes, scale, zero, axis, group, jnp.float32, levels), t

    k, tk = dense(k_words, k_scale, k_zero, k_bits, k_axis, k_group, k_levels)
    v, tv = dense(v_words, v_scale, v_zero, v_bits, v_axis, v_group, v_levels)
    n = min(tk, tv, k.shape[2], v.shape[2])
    k, v = k[:, :, :n], v[:, :, :n]
    if k_rope is not None:
        k = apply_rope(k, pos0 + jnp.arange(n)[None, None, :], k_rope)
    n_valid = jnp.broadcast_to(jnp.asarray(n_valid, jnp.int32), (b,))
    ok = (jnp.arange(n)[None, :] < n_valid[:, None])[:, None, None, :]  # [B, 1, 1, N]
    s = jnp.einsum("bhrd,bhnd->bhrn", q, k, precision=lax.Precision.HIGHEST)
    s = jnp.where(ok, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    v = jnp.where(ok[:, :, 0, :, None], v, 0.0)  # undefined values past n_valid must not leak
    o = jnp.einsum("bhrn,bhnd->bhrd", p, v, precision=lax.Precision.HIGHEST)
    empty = l[..., 0] <= 0
    out = jnp.where(empty[..., None], 0.0, o / jnp.where(l > 0, l, 1.0))
    lse = jnp.where(empty, -jnp.inf, (m + jnp.log(jnp.where(l > 0, l, 1.0)))[..., 0])
    return out, lse
