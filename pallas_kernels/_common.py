"""Kernel math shared by every backend: on-chip digit extraction, dequantization folded into the two
attention products, and the online-softmax block update.

Everything here works on *values* (already loaded blocks) with 32-bit integer and float ops only, so
the same code traces inside a Mosaic (TPU), a Triton (GPU) and an interpreted kernel. Per-block
arrays use tokens as the second-minor axis and head_dim as the minor (lane) axis, as in the cache.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from kvq_jax.errors import KvqError
from kvq_jax.quant import level_values

Array = jax.Array

# bits → (digit base, digits per uint32 word P); mirrors kvq_jax.packing (checked by the tests).
WIDTHS: dict[float, tuple[int, int]] = {
    1: (2, 32), 1.58: (3, 20), 2: (4, 16), 3: (8, 10), 4: (16, 8), 5: (32, 6), 6: (64, 5), 8: (256, 4),
}
_HIGHEST = lax.Precision.HIGHEST
_POW3_10 = 3**10  # base-3 words are split into two 10-digit halves, each < 2**16


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static description of one packed tensor (K or V) as the kernels see it.

    axis "channel": scale/zero `[B, H, NB, D]`, row `t // group`; axis "token": scale/zero
    `[B, H, NT, D // group]`, row `t`.
    """

    bits: float
    axis: str
    group: int
    base: int
    digits: int
    levels: tuple[float, ...] | None = None  # a codebook: digit c reads as levels[c]

    @staticmethod
    def make(bits: float, axis: str, group: int, head_dim: int,
             levels: tuple[float, ...] | None = None) -> "Layout":
        if isinstance(bits, bool) or bits not in WIDTHS:
            raise KvqError(f"the packed kernel supports widths {sorted(WIDTHS)}, got {bits!r}")
        if axis not in ("token", "channel"):
            raise KvqError(f"axis must be 'token' or 'channel', got {axis!r}")
        if isinstance(group, bool) or not isinstance(group, numbers.Integral) or group < 1:
            raise KvqError(f"group must be a positive int, got {group!r}")
        if axis == "token" and head_dim % group:
            raise KvqError(f"head_dim {head_dim} is not divisible by the token-axis group {group}")
        base, p = WIDTHS[bits]
        if levels is not None:
            levels = tuple(float(x) for x in levels)
            if len(levels) != base:
                raise KvqError(f"a {bits}-bit codebook has {base} levels, got {len(levels)}")
        return Layout(float(bits), axis, int(group), base, p, levels)

    @property
    def shift(self) -> int:
        """Bits per digit for power-of-two bases (0 for base 3)."""
        return 0 if self.base == 3 else int(math.log2(self.base))


# ----------------------------------------------------------------------------- digit extraction


def _floor_div(x: Array, d: Array | float) -> Array:
    """floor(x / d) for non-negative integer-valued float32 x, d < 2**24, exact.

    The reciprocal product may be one off near integers (and divides may be approximate on chip);
    one remainder test each way repairs it.
    """
    q = jnp.floor(x * (1.0 / d))
    r = x - q * d
    q = jnp.where(r < 0, q - 1.0, q)
    return jnp.where(r >= d, q + 1.0, q)


def _split_base3(w: Array) -> tuple[Array, Array]:
    """int32 base-3 words (as bit patterns of uint32 < 3**20) → (low, high) 10-digit halves, float32.

    float32 cannot hold a 32-bit word exactly, so the quotient by 3**10 is estimated in float32 (off
    by at most one), and the remainder is then fixed with exact wrapping int32 arithmetic.
    """
    a = lax.shift_right_logical(w, jnp.int32(16)).astype(jnp.float32)
    b = (w & 0xFFFF).astype(jnp.float32)
    hi = jnp.floor((a * 65536.0 + b) * (1.0 / _POW3_10)).astype(jnp.int32)
    r = w - hi * _POW3_10  # the true remainder is small, so int32 wrap-around cancels out
    hi = jnp.where(r < 0, hi - 1, hi)
    r = jnp.where(r < 0, r + _POW3_10, r)
    hi = jnp.where(r >= _POW3_10, hi + 1, hi)
    r = jnp.where(r >= _POW3_10, r - _POW3_10, r)
    return r.astype(jnp.float32), hi.astype(jnp.float32)


def digit_planes(w: Array, lay: Layout) -> list[Array]:
    """int32 words `[N, D]` → the P digit planes `[N, D]` float32; plane i holds token `word*P + i`.
    With a codebook the planes hold each digit's level (what the scale multiplies)."""
    return [level_values(p, lay.levels) for p in _digit_planes(w, lay)]


def _digit_planes(w: Array, lay: Layout) -> list[Array]:
    if lay.base != 3:
        mask = lay.base - 1
        return [(lax.shift_right_logical(w, jnp.int32(i * lay.shift)) & mask).astype(jnp.float32)
                for i in range(lay.digits)]
    planes = []
    for half in _split_base3(w):
        q = half
        for _ in range(10):
            q_next = _floor_div(q, 3.0)
            planes.append(q - 3.0 * q_next)
            q = q_next
    return planes


def digits_at(w: Array, digit: Array, lay: Layout) -> Array:
    """Per-row digit: words `[N, D]` int32, digit index `[N, 1]` int32 → codes `[N, D]` float32
    (with a codebook, the digits' levels)."""
    return level_values(_digits_at(w, digit, lay), lay.levels)


def _digits_at(w: Array, digit: Array, lay: Layout) -> Array:
    if lay.base != 3:
        return (lax.shift_right_logical(w, digit * lay.shift) & (lay.base - 1)).astype(jnp.float32)
    lo, hi = _split_base3(w)
    x = jnp.where(digit < 10, lo, hi)
    e = jnp.where(digit < 10, digit, digit - 10)
    p = jnp.ones(digit.shape, jnp.float32)
    for k in range(1, 10):  # 3**e per row, exactly, without pow()
        p = jnp.where(e >= k, p * 3.0, p)
    q = _floor_div(x, p)
    return q - 3.0 * _floor_div(q, 3.0)


# ----------------------------------------------------------------------------- attention block


def dot_nt(a: Array, b: Array) -> Array:
    """a `[M, K]` · b `[N, K]`ᵀ → `[M, N]` float32 at full precision."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_HIGHEST,
                           preferred_element_type=jnp.float32)


def dot_nn(a: Array, b: Array) -> Array:
    """a `[M, K]` · b `[K, N]` → `[M, N]` float32 at full precision."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_HIGHEST,
                           preferred_element_type=jnp.float32)


def _iota(shape: tuple[int, ...], axis: int) -> Array:
    # Masks are built from full-shape iotas: Mosaic is happiest comparing same-shape int32 vectors
    # rather than broadcasting boolean vectors.
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def expand_lanes(s: Array, head_dim: int) -> Array:
    """Per-token groups `[T, J]` → broadcastable to `[T, D]` (channel d uses column d // (D/J)).

    Masked lane reductions and selects instead of slicing or repeating lanes, which both Mosaic and
    Triton handle for any small J.
    """
    t, j = s.shape
    if j == 1:
        return s
    g = head_dim // j
    col = _iota((t, j), 1)
    lane = _iota((t, head_dim), 1)
    out = jnp.zeros((t, head_dim), jnp.float32)
    for i in range(j):
        si = jnp.sum(jnp.where(col == i, s, 0.0), axis=1, keepdims=True)  # [T, 1]
        out = jnp.where((lane >= i * g) & (lane < (i + 1) * g), si, out)
    return out


def n_groups(lay: Layout, block: int) -> int:
    """Per-channel groups a block of `block` tokens touches (the block is group-aligned)."""
    return max(1, block // lay.group)


def block_update(
    q: Array,
    kc: Array, ks: Array | None, kz: Array | None,
    vc: Array, vs: Array | None, vz: Array | None,
    t0: Array, n: Array,
    m: Array, l: Array, acc: Array,
    klay: Layout, vlay: Layout,
) -> tuple[Array, Array, Array]:
    """One online-softmax step over a block of T tokens starting at token `t0`.

    q `[R, D]` (pre-scaled); kc/vc codes `[T, D]` float32 in token order; scales/zeros float32:
    channel axis `[nG, D]` (the block's groups, first one holding token t0), token axis `[T, J]`,
    or None when kc/vc already hold dequantized values.
    Tokens `>= n` are masked (their codes/scales may be garbage). m/l `[R, 1]`, acc `[R, D]`.
    Requires at least one valid token in the block, and `t0` on a group boundary when nG > 1.
    """
    r, d = q.shape
    t = kc.shape[0]

    if ks is None:  # already dequantized by the caller
        s = dot_nt(q, kc)
    elif klay.axis == "channel":
        s = _channel_scores(q, kc, ks, kz, t0, n, klay)
    else:
        s = dot_nt(q, dequantize_block(kc, ks, kz, t0, klay))
    s = jnp.where(t0 + _iota((r, t), 1) < n, s, -jnp.inf)

    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new)  # masked tokens: exp(-inf) = 0
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)

    if vs is not None and vlay.axis == "channel":
        pv = _channel_values(p, vc, vs, vz, t0, n, vlay)
    else:
        v = vc if vs is None else dequantize_block(vc, vs, vz, t0, vlay)
        v = jnp.where(t0 + _iota((t, d), 0) < n, v, 0.0)  # 0 * garbage (NaN padding) is NaN
        pv = dot_nn(p, v)
    return m_new, l, alpha * acc + pv


def _group_pick(ng: int, r: int, t: int, group: int) -> Array:
    """`[nG, R, T]` mask: token t (relative to a group-aligned block start) is in group k.
    Comparisons, not division: TPU vector units have no integer divide."""
    rel = _iota((ng, r, t), 2) - _iota((ng, r, t), 0) * group
    return (rel >= 0) & (rel < group)


def _group_live(scale: Array, t0: Array, n: Array, lay: Layout) -> Array:
    """Zeroes scale/zero rows of groups that hold no valid token (their contents are undefined)."""
    g0 = (t0 // lay.group) * lay.group
    return jnp.where(g0 + _iota(scale.shape, 0) * lay.group < n, scale, 0.0)


def _channel_scores(q, kc, ks, kz, t0, n, lay: Layout) -> Array:
    """Scores with per-channel keys, dequantization folded into q:
    s[r, t] = (q_r ⊙ scale_g(t)) · codes_t + q_r · zero_g(t).

    Several groups in a block: q is stacked once per group (`[nG*R, D]`, one MXU pass) and each
    token picks its group's rows, instead of expanding scales over the whole `[T, D]` block.
    """
    r, d = q.shape
    ng, t = ks.shape[0], kc.shape[0]
    if ng == 1:
        return dot_nt(q * ks, kc) + jnp.sum(q * kz, axis=1, keepdims=True)
    qs = (q[None] * ks[:, None, :]).reshape(ng * r, d)
    s3 = dot_nt(qs, kc).reshape(ng, r, t)
    s3 = s3 + jnp.sum(q[None] * kz[:, None, :], axis=2, keepdims=True)
    return jnp.sum(jnp.where(_group_pick(ng, r, t, lay.group), s3, 0.0), axis=0)


def _channel_values(p, vc, vs, vz, t0, n, lay: Layout) -> Array:
    """p `[R, T]` · dequantized per-channel values, folded: Σ_g scale_g ⊙ (p_g · codes) + zero_g Σ p_g."""
    r, t = p.shape
    ng, d = vs.shape
    vs = _group_live(vs, t0, n, lay)
    vz = _group_live(vz, t0, n, lay)
    if ng == 1:
        return dot_nn(p, vc) * vs + jnp.sum(p, axis=1, keepdims=True) * vz
    p3 = jnp.where(_group_pick(ng, r, t, lay.group), p[None], 0.0)  # each group's share of p
    a3 = dot_nn(p3.reshape(ng * r, t), vc).reshape(ng, r, d)
    return jnp.sum(a3 * vs[:, None, :] + jnp.sum(p3, axis=2, keepdims=True) * vz[:, None, :], axis=0)


def dequantize_block(c: Array, s: Array, z: Array, t0: Array, lay: Layout) -> Array:
    """codes `[T, D]` → code·scale + zero `[T, D]` float32, explicitly (not folded into a product).

    Scales/zeros as `block_update` takes them: channel axis `[nG, D]` (t0 on a group boundary when
    nG > 1), token axis `[T, J]`."""
    t, d = c.shape
    if lay.axis == "token":
        return c * expand_lanes(s, d) + expand_lanes(z, d)
    if s.shape[0] == 1:
        return c * s + z
    rel = _iota((t, d), 0)
    rows = _iota(s.shape, 0)
    out = jnp.zeros((t, d), jnp.float32)
    for g in range(s.shape[0]):  # each token takes its group's row: comparisons, no integer divide
        # Row g by a masked sublane sum: Triton lowers no static slice.
        sg, zg = (jnp.sum(jnp.where(rows == g, x, 0.0), axis=0, keepdims=True) for x in (s, z))
        on = (rel >= g * lay.group) & (rel < (g + 1) * lay.group)
        out = jnp.where(on, c * sg + zg, out)
    return out


def rope_block(k: Array, pos: Array, inv: Array) -> Array:
    """Rotate-half RoPE of keys `[T, D]` at positions `pos [T, 1]` float32 with inverse frequencies
    `inv [1, D]` (the `[D/2]` frequencies twice), as `kvq_jax.rotations.apply_rope` computes it.

    rotate_half(k) = k @ P with P a signed permutation built from iotas: one small MXU product
    instead of lane slicing, which Mosaic and Triton both lower."""
    t, d = k.shape
    h = d // 2
    i, j = _iota((d, d), 0), _iota((d, d), 1)
    perm = jnp.where(i == j + h, -1.0, jnp.where(j == i + h, 1.0, 0.0))
    ang = pos * inv
    return k * jnp.cos(ang) + dot_nn(k, perm) * jnp.sin(ang)


def finalize(m: Array, l: Array, acc: Array) -> tuple[Array, Array]:
    """(m, l, acc) → normalised output `[R, D]` and lse `[R, 1]`; no valid token → (0, -inf)."""
    empty = l <= 0.0
    safe = jnp.where(empty, 1.0, l)
    # acc is still 0 when no block ran, so no select over [R, D] is needed.
    return acc / safe, jnp.where(empty, -jnp.inf, m + jnp.log(safe))
