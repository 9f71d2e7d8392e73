"""Exact round trips and block-wise (additive) writes of packed codes (kvq_jax.packing)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvq_jax.errors import KvqError
from kvq_jax.packing import add_block, code_base, digits_per_word, num_words, pack, unpack

WIDTHS = (1, 1.58, 2, 3, 4, 5, 6, 8)
LEAD = (2, 3)  # [B, H]
D = 8
N = 230  # token capacity of the storage in the add_block tests: not a multiple of any P
FAST = settings(max_examples=25, deadline=None)
# Jitted once per (bits, shape): hypothesis draws shapes from small sets so compiles are reused.
_pack = jax.jit(pack, static_argnames=("bits",))
_unpack = jax.jit(unpack, static_argnames=("bits", "dtype"))


def random_codes(rng: np.random.Generator, bits: float, t: int, lead=LEAD) -> np.ndarray:
    return rng.integers(0, code_base(bits), size=(*lead, t, D)).astype(np.uint8)


@functools.partial(jax.jit, static_argnames=("bits",))
def _add(words, codes, start, enabled, *, bits):
    return add_block(words, codes, start, bits, enabled)


def test_tables():
    assert [digits_per_word(b) for b in WIDTHS] == [32, 20, 16, 10, 8, 6, 5, 4]
    assert [code_base(b) for b in WIDTHS] == [2, 3, 4, 8, 16, 32, 64, 256]
    for b in WIDTHS:
        p, base = digits_per_word(b), code_base(b)
        assert base**p <= 2**32 < base ** (p + 1)
    assert num_words(0, 4) == 0 and num_words(1, 4) == 1 and num_words(8, 4) == 1 and num_words(9, 4) == 2
    assert num_words(8, 4, spare=True) == 2 and num_words(21, 1.58) == 2
    for bad in (0, 7, 16, 1.5):
        with pytest.raises(KvqError, match="bits must be one of"):
            digits_per_word(bad)
    with pytest.raises(KvqError, match="non-negative"):
        num_words(-1, 4)


@pytest.mark.parametrize("bits", WIDTHS)
def test_word_layout(bits):
    """Token t is digit t % P of word t // P, word = Σ code_i · base**i."""
    p, base = digits_per_word(bits), code_base(bits)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, base, size=(2 * p + 3, 1)).astype(np.uint8)
    words = np.asarray(_pack(codes, bits=bits))
    assert words.dtype == np.uint32 and words.shape == (3, 1)
    padded = np.zeros((3 * p, 1), np.uint64)
    padded[: len(codes)] = codes
    want = (padded.reshape(3, p) * (base ** np.arange(p, dtype=np.uint64))).sum(1)
    np.testing.assert_array_equal(words[:, 0].astype(np.uint64), want)


@pytest.mark.parametrize("bits", WIDTHS)
@FAST
@given(data=st.data())
def test_pack_unpack_roundtrip(bits, data):
    p = digits_per_word(bits)
    # Lengths that are not multiples of P (1, 37 and 101 are prime, P+1, 2P-1) and one that is.
    t = data.draw(st.sampled_from([1, 37, 101, p + 1, 2 * p - 1, 3 * p]), label="T")
    codes = random_codes(np.random.default_rng(data.draw(st.integers(0, 2**31 - 1))), bits, t)
    words = _pack(codes, bits=bits)
    assert words.shape == (*LEAD, num_words(t, bits), D) and words.dtype == jnp.uint32
    back = np.asarray(_unpack(words, bits=bits))
    assert back.dtype == np.uint8 and back.shape == (*LEAD, words.shape[-2] * p, D)
    np.testing.assert_array_equal(back[..., :t, :], codes)
    assert (back[..., t:, :] == 0).all()  # zero-padded tail


@pytest.mark.parametrize("bits", WIDTHS)
def test_extreme_codes(bits):
    """All-max codes use the full word without overflow; all-zero codes give zero words."""
    p, base = digits_per_word(bits), code_base(bits)
    top = np.full((*LEAD, 3 * p, D), base - 1, np.uint8)
    words = _pack(top, bits=bits)
    assert (np.asarray(words) == np.uint32(base**p - 1)).all()
    np.testing.assert_array_equal(np.asarray(_unpack(words, bits=bits)), top)
    assert (np.asarray(_pack(np.zeros_like(top), bits=bits)) == 0).all()
    as_int = _unpack(words, bits=bits, dtype=jnp.int32)
    assert as_int.dtype == jnp.int32 and (np.asarray(as_int) == base - 1).all()


@pytest.mark.parametrize("bits", WIDTHS)
def test_packed_bits_per_value(bits):
    p = digits_per_word(bits)
    t = 3 * p
    words = _pack(np.zeros((*LEAD, t, D), np.uint8), bits=bits)
    per_value = words.nbytes * 8 / (np.prod(LEAD) * t * D)
    assert per_value == pytest.approx(32 / p)
    assert per_value <= {1: 1, 1.58: 1.6, 2: 2, 3: 3.2, 4: 4, 5: 5.34, 6: 6.4, 8: 8}[bits]


@pytest.mark.parametrize("bits", WIDTHS)
@FAST
@given(data=st.data())
def test_add_block_sequence_equals_pack(bits, data):
    """Blocks of G tokens written one after another from an unaligned start == pack of the whole."""
    p = digits_per_word(bits)
    g = data.draw(st.sampled_from([1, 7, 64]), label="G")
    s0 = data.draw(st.integers(0, 2 * p), label="first start")
    n_blocks = data.draw(st.integers(1, min(4, (N - s0) // g)), label="blocks")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    codes = random_codes(np.random.default_rng(seed), bits, N)
    codes[..., :s0, :] = 0  # tokens never written stay zero
    codes[..., s0 + n_blocks * g :, :] = 0
    words = jnp.zeros((*LEAD, num_words(N, bits), D), jnp.uint32)
    for i in range(n_blocks):
        start = s0 + i * g
        words = _add(words, codes[..., start : start + g, :], jnp.int32(start), True, bits=bits)
    np.testing.assert_array_equal(np.asarray(words), np.asarray(_pack(codes, bits=bits)))


@pytest.mark.parametrize("bits", WIDTHS)
@FAST
@given(data=st.data())
def test_add_block_into_live_words(bits, data):
    """A block lands in words that already hold other tokens' digits without disturbing them."""
    g = data.draw(st.sampled_from([1, 7, 64]), label="G")
    # Starts near the end exercise the clamped span (the storage has no spare word).
    start = data.draw(st.one_of(st.integers(0, N - g), st.integers(N - g - 12, N - g)), label="start")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    full = random_codes(np.random.default_rng(seed), bits, N)
    rest = full.copy()
    rest[..., start : start + g, :] = 0
    words = _pack(rest, bits=bits)
    block = full[..., start : start + g, :]
    got = _add(words, block, jnp.int32(start), True, bits=bits)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_pack(full, bits=bits)))
    same = _add(words, block, jnp.int32(start), False, bits=bits)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(words))


@pytest.mark.parametrize("bits", [1, 1.58, 3, 8])
def test_add_block_disabled_is_noop(bits):
    rng = np.random.default_rng(1)
    words = jnp.asarray(rng.integers(0, 2**32, size=(*LEAD, 9, D), dtype=np.uint64).astype(np.uint32))
    codes = random_codes(rng, bits, 16)
    out = _add(words, codes, jnp.int32(5), jnp.bool_(False), bits=bits)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(words))


@pytest.mark.parametrize("bits", WIDTHS)
def test_add_block_jit_vmap_per_row(bits):
    """vmap over the batch with a per-row start and enabled flag, as the cache flush does."""
    rng = np.random.default_rng(2)
    b, h, g, n = 4, 2, 16, 96
    full = random_codes(rng, bits, n, lead=(b, h))
    starts = np.array([0, 3, 37, 80], np.int32)
    enabled = np.array([True, True, False, True])
    rest = full.copy()
    for i in range(b):
        rest[i, :, starts[i] : starts[i] + g] = 0
    words = pack(rest, bits)
    blocks = np.stack([full[i, :, starts[i] : starts[i] + g] for i in range(b)])
    f = jax.jit(jax.vmap(lambda w, c, s, e: add_block(w, c, s, bits, e)))
    got = np.asarray(f(words, blocks, jnp.asarray(starts), jnp.asarray(enabled)))
    for i in range(b):
        want = pack(full[i] if enabled[i] else rest[i], bits)
        np.testing.assert_array_equal(got[i], np.asarray(want))


def test_add_block_is_local():
    """O(G) work: one scatter-add of the spanned words, whatever the storage size."""
    words = jax.ShapeDtypeStruct((2, 3, 100_000, 128), jnp.uint32)
    codes = jax.ShapeDtypeStruct((2, 3, 64, 128), jnp.uint8)
    jaxpr = jax.make_jaxpr(lambda w, c, s: add_block(w, c, s, 3))(words, codes, jnp.int32(5))
    # Nothing but the input and output has the storage's token extent.
    big = [v for eqn in jaxpr.eqns for v in eqn.outvars if 100_000 in getattr(v.aval, "shape", ())]
    assert len(big) == 1
    adds = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "scatter-add"]
    assert len(adds) == 1
    assert adds[0].invars[2].aval.shape == (2, 3, 8, 128)  # ceil((64 + 10 - 1) / 10) words


@pytest.mark.parametrize("bits", [1.58, 3, 8])
def test_add_block_past_the_storage_drops_only_zero_digits(bits):
    """A block whose span runs past the last word (its codes there zero) adds exactly its digits."""
    p = digits_per_word(bits)
    n = 5 * p
    full = random_codes(np.random.default_rng(4), bits, n)
    start = n - 3
    block = np.zeros((*LEAD, 40, D), np.uint8)
    block[..., :3, :] = full[..., start:, :]
    rest = full.copy()
    rest[..., start:, :] = 0
    got = _add(_pack(rest, bits=bits), block, jnp.int32(start), True, bits=bits)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_pack(full, bits=bits)))


def test_bad_arguments():
    w = jnp.zeros((2, 4, D), jnp.uint32)
    with pytest.raises(KvqError, match="do not match"):
        add_block(w, np.zeros((3, 5, D), np.uint8), 0, 4)
    with pytest.raises(KvqError, match="must be >= 0"):
        add_block(w, np.zeros((2, 5, D), np.uint8), -1, 4)
    with pytest.raises(KvqError, match="must be uint32"):
        unpack(w.astype(jnp.int32), 4)
    with pytest.raises(KvqError, match=r"\[\.\.\., T, D\]"):
        pack(np.zeros(5, np.uint8), 4)
    np.testing.assert_array_equal(np.asarray(add_block(w, np.zeros((2, 0, D), np.uint8), 3, 4)), 0)
