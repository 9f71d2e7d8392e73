"""Learned codebooks: Lloyd-Max levels for the cache's group-normalised values, ends fixed.

A group's min and max stay its end levels (0 and qmax in code units, as uniform codes have them), so
a codebook never clips the outliers attention weighs most (free Lloyd-Max levels move the ends inward
and lost badly in `benchmarks/quantizer_variants.py`); only the inner levels are learned. Each value's
position `u = (x - zero) / scale` in code units is weighted by `scale²`, so the levels minimise the
squared error of x itself, not of the normalised values.

Levels are learned per layer and tensor on calibration windows (`kvq_jax.analysis`), stored in the
plan (`QuantSpec.levels`) and read by `kvq_jax.quant` and the Pallas kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvq_jax import quant

Array = jax.Array
MAX_LEVELS = 16  # the widest codebook (4 bits): the stats store every layer's table padded to this
_MIN_GAP = 1e-3  # levels closer than this (code units) are pushed apart: a plan needs increasing levels


@functools.partial(jax.jit, static_argnames=("bits", "axis", "group", "sink", "scale_dtype", "iters",
                                             "fixed_ends"))
def lloyd_levels(x: Array, *, bits: float, axis: str, group: int, sink: int, scale_dtype: str = "bfloat16",
                 iters: int = 30, fixed_ends: bool = True) -> Array:
    """Fixed-end Lloyd-Max levels `[qmax + 1]` (code units) for the body tokens of x `[B, T, H, D]`.

    The body is the tokens after the `sink`, cut to whole groups of `group` tokens (axis "channel")
    as the cache flushes them; scales and zeros are the cache's own (`quant.quantize`).
    `fixed_ends=False` learns the end levels too (the variant that lost: it clips the extremes; a plan
    cannot store it).
    """
    qm = quant.qmax(bits)
    body = x[:, sink:].astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, H, Tb, D]
    n = body.shape[2] - (body.shape[2] % group if axis == "channel" else 0)
    body = body[:, :, :n]
    _, s, z = quant.quantize(body, bits, axis, group, scale_dtype=scale_dtype)
    # each element's scale and zero, through the one grouping `quant` knows: code 1 reads the scale
    scale = quant.dequantize(jnp.ones(body.shape, jnp.uint8), s, jnp.zeros_like(z), axis, group)
    zero = quant.dequantize(jnp.zeros(body.shape, jnp.uint8), s, z, axis, group)
    live = scale > 0
    u = jnp.clip(jnp.where(live, (body - zero) / jnp.where(live, scale, 1.0), 0.0), 0, qm).ravel()
    w = jnp.where(live, scale * scale, 0.0).ravel()
    ends = ((jnp.arange(qm + 1) == 0) | (jnp.arange(qm + 1) == qm)) & fixed_ends

    def step(_, lv):
        idx = jnp.sum(u[:, None] > (lv[1:] + lv[:-1])[None, :] * 0.5, axis=1)
        num = jax.ops.segment_sum(w * u, idx, num_segments=qm + 1)
        den = jax.ops.segment_sum(w, idx, num_segments=qm + 1)
        new = jnp.sort(jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), lv))
        return jnp.where(ends, lv, new)

    return jax.lax.fori_loop(0, iters, step, jnp.arange(qm + 1, dtype=jnp.float32))


def strict_levels(levels: np.ndarray) -> tuple[float, ...]:
    """Levels `[qmax + 1]` as a plan stores them: ends exactly 0 and qmax, strictly increasing (gaps of at
    least 1e-3), rounded to 5 decimals."""
    lv = np.asarray(levels, np.float64).copy()
    qm = len(lv) - 1
    lv[0], lv[-1] = 0.0, float(qm)
    for i in range(1, qm):
        lv[i] = min(max(lv[i], lv[i - 1] + _MIN_GAP), qm - (qm - i) * _MIN_GAP)
    return tuple(round(float(v), 5) for v in lv)
