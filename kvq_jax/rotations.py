"""Rotations of keys and values: RoPE by position, and the orthonormal Hadamard matrix.

RoPE is applied by the model to q and k; a cache layer that stores its body keys before RoPE
(`rotate="prerope"`) undoes it by position when a block is flushed and applies it again after
dequantization, by the same angles, so both directions are exact inverses up to rounding. A
Hadamard layer (`rotate="hadamard"`) stores `k @ H` and `v @ H` to spread outlier channels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvq_jax.config import RopeScaling
from kvq_jax.errors import KvqError

Array = jax.Array
Rope = tuple[float, "RopeScaling | None"]  # a layer's RoPE: base theta and scaling (ModelConfig.rope)


def rope_frequencies(d: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Inverse frequencies `[D/2]` float32 of RoPE with base `theta`, scaled as `scaling` says."""
    inv = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if scaling is None:
        pass
    elif scaling.kind == "linear":
        inv = inv / scaling.factor
    elif scaling.kind == "factors":  # GGUF rope_freqs: llama.cpp divides each frequency by its factor
        inv = inv / np.asarray(scaling.freq_factors, np.float64)
    else:  # llama3: long wavelengths divided by the factor, short kept, a smooth band between
        lo, hi, f = scaling.low_freq_factor, scaling.high_freq_factor, scaling.factor
        wavelen = 2 * np.pi / inv
        ctx = scaling.original_max_position
        smooth = (ctx / wavelen - lo) / (hi - lo)
        scaled = np.where(wavelen > ctx / lo, inv / f, inv)
        medium = (wavelen >= ctx / hi) & (wavelen <= ctx / lo)
        inv = np.where(medium, (1 - smooth) * inv / f + smooth * inv, scaled)
    return inv.astype(np.float32)


def apply_rope(x: Array, positions: Array, rope: Rope, inverse: bool = False) -> Array:
    """Rotate-half RoPE of `x [..., D]` at `positions` (broadcastable to `x.shape[:-1]`), computed in
    float32 and returned in x's dtype; `inverse` rotates back (the angles negated: R(p)^T)."""
    d = x.shape[-1]
    inv = rope_frequencies(d, *rope)
    ang = jnp.asarray(positions).astype(jnp.float32)[..., None] * inv  # [..., D/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    if inverse:
        sin = -sin
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rope(x: Array, positions: Array, theta: float, scaling: RopeScaling | None = None) -> Array:
    """The model's RoPE: x `[B, T, H, D]`, positions `[B, T]`."""
    return apply_rope(x, positions[:, :, None], (theta, scaling))


@functools.lru_cache(maxsize=8)
def hadamard(d: int) -> np.ndarray:
    """Orthonormal Hadamard matrix `[d, d]` (d a power of two): H @ H.T = I."""
    if d & (d - 1):
        raise KvqError(f"hadamard rotation needs a power-of-two head_dim, got {d}")
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(d)
