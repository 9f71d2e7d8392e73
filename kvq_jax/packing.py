"""Codes ↔ uint32 words, packed along the token axis (axis -2); head_dim stays the minor axis.

Token `t` is digit `t % P` of word `t // P`, `word = Σ_i code_i · base**i`, with `P` digits of base
`code_base(bits)` per word (1.58 bits: base 3, 20 digits since 3**20 < 2**32). Packing is additive, so a
block of tokens can be added into words whose digits at those tokens are still zero (`add_block`).
Codes must lie in `[0, base - 1]`; power-of-two widths mask them, base 3 clips them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kvq_jax.errors import KvqError

_DIGITS = {1: 32, 1.58: 20, 2: 16, 3: 10, 4: 8, 5: 6, 6: 5, 8: 4}


def _check_bits(bits: float) -> None:
    if isinstance(bits, bool) or bits not in _DIGITS:
        raise KvqError(f"packing bits must be one of {', '.join(map(str, _DIGITS))}, got {bits!r}")


def digits_per_word(bits: float) -> int:
    """Codes per uint32 word `P`: 1→32, 1.58→20, 2→16, 3→10, 4→8, 5→6, 6→5, 8→4."""
    _check_bits(bits)
    return _DIGITS[1.58 if bits == 1.58 else int(bits)]


def code_base(bits: float) -> int:
    """Digit base: 3 for 1.58 bits (ternary), else 2**bits."""
    _check_bits(bits)
    return 3 if bits == 1.58 else 2 ** int(bits)


def num_words(n_tokens: int, bits: float, spare: bool = False) -> int:
    """Words holding `n_tokens` codes: ceil(n/P), plus one if `spare`."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, np.integer)) or n_tokens < 0:
        raise KvqError(f"n_tokens must be a non-negative int, got {n_tokens!r}")
    p = digits_per_word(bits)
    return -(-int(n_tokens) // p) + int(bool(spare))


def _pow3(p: int) -> np.ndarray:
    return np.array([3**i for i in range(p)], np.uint32)


def _check_codes(a: jax.Array, what: str) -> None:
    if a.ndim < 2:
        raise KvqError(f"{what} must be [..., T, D], got shape {tuple(a.shape)}")


def _pack_aligned(codes: jax.Array, bits: float) -> jax.Array:
    """codes [..., W*P, D] (any int dtype) → uint32 [..., W, D]."""
    p, base = digits_per_word(bits), code_base(bits)
    *lead, t, d = codes.shape
    c = codes.astype(jnp.uint32).reshape(*lead, t // p, p, d)
    if base == 3:
        c = jnp.minimum(c, jnp.uint32(2))
        weights = jnp.asarray(_pow3(p))
        digits = c * weights[:, None]
    else:
        nb = int(bits)
        shifts = jnp.asarray(np.arange(p) * nb, jnp.uint32)
        digits = (c & jnp.uint32(base - 1)) << shifts[:, None]
    # Digits occupy disjoint positions, so the sum never carries (equals an OR for 2**k bases).
    return jnp.sum(digits, axis=-2, dtype=jnp.uint32)


def pack(codes: jax.Array, bits: float) -> jax.Array:
    """codes `[..., T, D]` → uint32 words `[..., ceil(T/P), D]`; the tail of the last word is zero."""
    codes = jnp.asarray(codes)
    _check_codes(codes, "codes")
    p = digits_per_word(bits)
    t = codes.shape[-2]
    pad = (-t) % p
    if pad:
        widths = [(0, 0)] * codes.ndim
        widths[-2] = (0, pad)
        codes = jnp.pad(codes, widths)
    return _pack_aligned(codes, bits)


def unpack(words: jax.Array, bits: float, dtype: Any = jnp.uint8) -> jax.Array:
    """uint32 words `[..., W, D]` → codes `[..., W*P, D]` in `dtype`."""
    words = jnp.asarray(words)
    _check_codes(words, "words")
    if words.dtype != jnp.uint32:
        raise KvqError(f"packed words must be uint32, got {words.dtype}")
    p, base = digits_per_word(bits), code_base(bits)
    *lead, w, d = words.shape
    x = words[..., :, None, :]
    if base == 3:
        # Integer division by constant powers of three (XLA lowers it to multiply-shift).
        div = jnp.asarray(_pow3(p))[:, None]
        q = x // div
        digits = q - (q // jnp.uint32(3)) * jnp.uint32(3)
    else:
        shifts = jnp.asarray(np.arange(p) * int(bits), jnp.uint32)[:, None]
        digits = (x >> shifts) & jnp.uint32(base - 1)
    digits = digits.reshape(*lead, w * p, d)
    if jnp.issubdtype(dtype, jnp.floating):
        # Digits fit in int32, whose conversion to float is one instruction; uint32's is not.
        digits = digits.astype(jnp.int32)
    return digits.astype(dtype)


def _block_geometry(words: jax.Array, codes: jax.Array, start: jax.Array | int, bits: float):
    """Validates a block write and returns `(words, codes, start, P, nw, w0, lead, D)`, or None for an
    empty block: nw = the words a G-token block can touch at any digit offset, w0 = its first word.
    Words past the storage are dropped by the callers' scatters: a block that fits never reaches them."""
    words = jnp.asarray(words)
    codes = jnp.asarray(codes)
    _check_codes(words, "words")
    _check_codes(codes, "codes")
    if words.dtype != jnp.uint32:
        raise KvqError(f"packed words must be uint32, got {words.dtype}")
    if codes.shape[:-2] != words.shape[:-2] or codes.shape[-1] != words.shape[-1]:
        raise KvqError(
            f"block codes {tuple(codes.shape)} do not match words {tuple(words.shape)} "
            "outside the token axis"
        )
    if isinstance(start, (int, np.integer)) and not isinstance(start, bool) and start < 0:
        raise KvqError(f"block start must be >= 0, got {start}")
    p = digits_per_word(bits)
    *lead, _, d = words.shape
    g = codes.shape[-2]
    if g == 0:
        return None
    nw = -(-(g + p - 1) // p)
    start = jnp.asarray(start, jnp.int32)
    return words, codes, start, p, nw, start // p, lead, d


def add_block(
    words: jax.Array,
    codes: jax.Array,
    start: jax.Array | int,
    bits: float,
    enabled: jax.Array | bool = True,
) -> jax.Array:
    """Adds G consecutive tokens `codes [..., G, D]` at token `start` into `words [..., W, D]`.

    The digits at tokens `start .. start+G-1` must still be zero. `start` (int32 scalar) need not be
    word-aligned; if `enabled` (bool scalar) is False the words come back unchanged. O(G) work: one
    scatter-add into the ceil((G+P-1)/P) words the block can span; words past the storage are dropped
    (so a block may run past the end if its codes there are zero). jit/vmap-able.
    """
    checked = _block_geometry(words, codes, start, bits)
    if checked is None:
        return jnp.asarray(words)
    words, codes, start, p, nw, w0, lead, d = checked
    zeros = (0,) * len(lead)
    local = jnp.zeros((*lead, nw * p, d), codes.dtype)
    local = lax.dynamic_update_slice(local, codes, (*zeros, start - w0 * p, 0))
    contrib = _pack_aligned(local, bits)
    contrib = jnp.where(jnp.asarray(enabled, jnp.bool_), contrib, jnp.uint32(0))
    return words.at[..., w0 + jnp.arange(nw), :].add(contrib, mode="drop")


def put_block(
    words: jax.Array,
    codes: jax.Array,
    start: jax.Array | int,
    bits: float,
    enabled: jax.Array | bool = True,
) -> jax.Array:
    """Overwrites G consecutive tokens at token `start` with `codes [..., G, D]` (a ring slot reused).

    Like `add_block`, but the old digits there may be anything: the words the block spans are
    unpacked, the block's digits replaced and the words repacked. Words past the storage are dropped.
    """
    checked = _block_geometry(words, codes, start, bits)
    if checked is None:
        return jnp.asarray(words)
    words, codes, start, p, nw, w0, lead, d = checked
    w = words.shape[-2]
    span = w0 + jnp.arange(nw)
    old = jnp.take(words, jnp.minimum(span, w - 1), axis=-2)
    local = unpack(old, bits, dtype=codes.dtype)  # [..., nw * P, D]
    zeros = (0,) * len(lead)
    local = lax.dynamic_update_slice(local, codes, (*zeros, start - w0 * p, 0))
    new = jnp.where(jnp.asarray(enabled, jnp.bool_), _pack_aligned(local, bits), old)
    return words.at[..., span, :].set(new, mode="drop")
