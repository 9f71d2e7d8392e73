"""Asymmetric min-max quantizer with per-token or per-channel groups.

`x ≈ code · scale + zero`, `code ∈ [0, qmax(bits)]`, `zero` = group min (not rounded to a level).

Groups:
  - axis="token":   each token's D channels in groups of `group` channels → scale/zero `[..., T, D//group]`
  - axis="channel": each channel over blocks of `group` tokens            → scale/zero `[..., T//group, D]`

Scale and zero are stored in `scale_dtype` (bf16 by default); codes are computed against the *stored*
values, with zero rounded down and scale rounded up so the stored grid still covers `[min, max]`, hence
`|dequantize(quantize(x)) - x| <= scale / 2` (up to float32 rounding) for every finite input.

Non-finite inputs: NaN and ±inf are left out of a group's min/max; +inf saturates to the top code,
-inf and NaN map to code 0 (the group min); a group with no finite value gets scale 0, zero 0. The
cache therefore never stores a non-finite value. Tokens masked out by `valid` are treated like NaN
(left out of min/max, code 0).

Codebooks: with `levels` (a learned level table in code units, `levels[0] = 0`, `levels[-1] = qmax`,
increasing) a value is stored as the index of its nearest level and read back as
`levels[code] · scale + zero`. The ends are the group's min and max as before, so scale and zero are
unchanged and no extreme is clipped; the error bound becomes `scale · max gap / 2`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvq_jax.errors import KvqError

QUANT_BITS = (1, 1.58, 2, 3, 4, 5, 6, 8)
AXES = ("token", "channel")
SCALE_DTYPES = ("bfloat16", "float32")


def qmax(bits: float) -> int:
    """Largest code for `bits`: round(2**bits - 1); 1.58 bits → 2 (ternary, 3 levels)."""
    if isinstance(bits, bool) or bits not in QUANT_BITS:
        raise KvqError(f"quantizer bits must be one of {', '.join(map(str, QUANT_BITS))}, got {bits!r}")
    return int(round(2.0**bits - 1))


def level_values(codes: jax.Array, levels: Any) -> jax.Array:
    """Codes (any numeric dtype) → their levels, float32; `levels` None: the codes themselves.

    Static levels (a tuple of floats) become a chain of selects on constants, which every Pallas
    backend lowers; an array of levels is gathered (the analysis measures many codebooks with one
    compiled function)."""
    c = jnp.asarray(codes).astype(jnp.float32)
    if levels is None:
        return c
    if isinstance(levels, (tuple, list)):
        out = c
        for i, lv in enumerate(levels):
            if float(lv) != i:  # the fixed ends (and any level on its code) need no select
                out = jnp.where(c == i, jnp.float32(lv), out)
        return out
    return jnp.take(jnp.asarray(levels, jnp.float32), c.astype(jnp.int32), mode="clip")


def nearest_codes(u: jax.Array, levels: Any) -> jax.Array:
    """Positions `u` in code units (float, within [0, qmax]) → the index of the nearest level, float32
    (a tie goes to the lower level); `levels` None: round to the nearest integer code."""
    if levels is None:
        return jnp.round(u)
    lv = jnp.asarray(levels, jnp.float32)
    mids = (lv[1:] + lv[:-1]) * 0.5
    return jnp.sum((u[..., None] > mids).astype(jnp.float32), axis=-1)


def _scale_dtype(scale_dtype: Any) -> jnp.dtype:
    try:
        dt = jnp.dtype(scale_dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in SCALE_DTYPES:
        raise KvqError(f"scale_dtype must be bfloat16 or float32, got {scale_dtype!r}")
    return dt


def _check_layout(shape: tuple[int, ...], axis: str, group: int) -> None:
    if axis not in AXES:
        raise KvqError(f"axis must be 'token' or 'channel', got {axis!r}")
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1:
        raise KvqError(f"group must be a positive int, got {group!r}")
    if len(shape) < 2:
        raise KvqError(f"expected an array [..., T, D], got shape {tuple(shape)}")
    t, d = shape[-2], shape[-1]
    if axis == "token" and d % group:
        raise KvqError(f"head_dim {d} is not divisible by the token-axis group {group}")
    if axis == "channel" and t % group:
        raise KvqError(f"token count {t} is not divisible by the channel-axis group {group}")


def _grouped(a: jax.Array, axis: str, group: int) -> jax.Array:
    """[..., T, D] → token: [..., T, D//g, g]; channel: [..., T//g, g, D]."""
    *lead, t, d = a.shape
    if axis == "token":
        return a.reshape(*lead, t, d // group, group)
    return a.reshape(*lead, t // group, group, d)


def _red_axis(axis: str) -> int:
    return -1 if axis == "token" else -2


def _round_down(v: jax.Array, dt: jnp.dtype) -> jax.Array:
    """Largest value of dtype `dt` that is <= v (finite, clamped to dt's range)."""
    big = jnp.finfo(dt).max
    if dt == jnp.float32:
        return jnp.clip(v, -big, big)
    r = v.astype(dt)
    r = jnp.where(r.astype(jnp.float32) > v, jnp.nextafter(r, jnp.full_like(r, -jnp.inf)), r)
    return jnp.clip(r, -big, big)


def _round_up(v: jax.Array, dt: jnp.dtype) -> jax.Array:
    """Smallest value of dtype `dt` that is >= v (clamped to dt's finite range)."""
    big = jnp.finfo(dt).max
    if dt == jnp.float32:
        return jnp.clip(v, -big, big)
    r = v.astype(dt)
    r = jnp.where(r.astype(jnp.float32) < v, jnp.nextafter(r, jnp.full_like(r, jnp.inf)), r)
    return jnp.clip(r, -big, big)


def quantize(
    x: jax.Array,
    bits: float,
    axis: str,
    group: int,
    scale_dtype: Any = jnp.bfloat16,
    valid: jax.Array | None = None,
    levels: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Quantizes `x [..., T, D]` → `(codes uint8 [..., T, D], scale, zero)`.

    scale/zero are `[..., T, D//group]` (axis="token") or `[..., T//group, D]` (axis="channel") in
    `scale_dtype`. `valid` (bool, broadcastable to `[..., T, 1]`) marks real tokens; padding is left
    out of min/max and gets code 0. `levels`: a codebook of `qmax(bits) + 1` levels (see the module
    docstring), or None for uniform codes. `bits`, `axis`, `group`, `scale_dtype` must be static under jit.
    """
    qm = qmax(bits)
    if levels is not None and np.shape(levels) != (qm + 1,):
        raise KvqError(f"a {bits}-bit codebook has {qm + 1} levels, got shape {np.shape(levels)}")
    x = jnp.asarray(x)
    _check_layout(x.shape, axis, group)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise KvqError(f"quantize expects a float array, got {x.dtype}")
    sdt = _scale_dtype(scale_dtype)
    ax = _red_axis(axis)

    x32 = x.astype(jnp.float32)
    use = jnp.isfinite(x32)
    if valid is not None:
        valid = jnp.asarray(valid, jnp.bool_)
        try:
            valid = jnp.broadcast_to(valid, x.shape)
        except ValueError:
            raise KvqError(f"valid of shape {valid.shape} does not broadcast to {x.shape}") from None
        use = use & valid
    xg = _grouped(x32, axis, group)
    ug = _grouped(use, axis, group)

    mn = jnp.min(jnp.where(ug, xg, jnp.inf), axis=ax, keepdims=True)
    mx = jnp.max(jnp.where(ug, xg, -jnp.inf), axis=ax, keepdims=True)
    any_use = jnp.any(ug, axis=ax, keepdims=True)
    mn = jnp.where(any_use, mn, 0.0)
    mx = jnp.where(any_use, mx, 0.0)

    zero = _round_down(mn, sdt)
    z32 = zero.astype(jnp.float32)
    # Divide before subtracting: (max - min) alone overflows for ranges near float32 max.
    # The explicit mx > zero test keeps constant groups at scale 0 even if XLA contracts this to an FMA.
    span = jnp.where(mx > z32, jnp.maximum(mx / qm - z32 / qm, 0.0), 0.0)
    scale = _round_up(span, sdt)
    s32 = scale.astype(jnp.float32)

    pos = s32 > 0
    # XLA divides through a reciprocal that flushes to zero for divisors above ~2**126, and x - zero can
    # overflow: groups with huge scales are brought down by an exact power of two first.
    k = jnp.where(s32 > 2.0**96, 2.0**-64, 1.0)
    q = jnp.where(pos, (xg * k - z32 * k) / jnp.where(pos, s32 * k, 1.0), 0.0)
    # NaN → 0 before rounding; ±inf saturate through the clip.
    q = nearest_codes(jnp.clip(jnp.nan_to_num(q, nan=0.0, posinf=qm, neginf=0.0), 0, qm), levels)
    q = jnp.where(xg == jnp.inf, qm, q)
    q = jnp.where(jnp.isnan(xg) | (xg == -jnp.inf), 0, q)
    if valid is not None:
        q = jnp.where(_grouped(valid, axis, group), q, 0)
    codes = q.astype(jnp.uint8).reshape(x.shape)
    return codes, jnp.squeeze(scale, ax), jnp.squeeze(zero, ax)


def dequantize(
    codes: jax.Array,
    scale: jax.Array,
    zero: jax.Array,
    axis: str,
    group: int,
    dtype: Any = jnp.float32,
    levels: Any = None,
) -> jax.Array:
    """`codes [..., T, D]` → `code · scale + zero` as `[..., T, D]` in `dtype` (computed in float32);
    with a codebook `levels`, `levels[code] · scale + zero`."""
    codes = jnp.asarray(codes)
    _check_layout(codes.shape, axis, group)
    *lead, t, d = codes.shape
    want = (*lead, t, d // group) if axis == "token" else (*lead, t // group, d)
    if tuple(scale.shape) != want or tuple(zero.shape) != want:
        raise KvqError(
            f"scale/zero shapes {tuple(scale.shape)}/{tuple(zero.shape)} do not match codes "
            f"{tuple(codes.shape)} for axis={axis} group={group} (expected {want})"
        )
    ax = _red_axis(axis)
    cg = _grouped(level_values(codes, levels), axis, group)
    # Halved (exactly) so code·scale cannot overflow when a group spans nearly the whole float range.
    s = jnp.expand_dims(scale.astype(jnp.float32) * 0.5, ax)
    z = jnp.expand_dims(zero.astype(jnp.float32) * 0.5, ax)
    return ((cg * s + z) * 2.0).reshape(codes.shape).astype(dtype)
