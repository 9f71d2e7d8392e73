"""The fused packed decode-attention kernel against the pure-jnp reference (CPU, interpret modes)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from kvq_jax import packing, quant
from kvq_jax.config import RopeScaling
from pallas_kernels import (
    default_block,
    packed_decode_attention,
    reference_packed_attention,
    tpu_block_unit,
)
from pallas_kernels import _common as C

TOL = 1e-5


def _has_tpu_interpret() -> bool:
    try:
        from jax.experimental.pallas import tpu as pltpu
    except ImportError:
        return False
    return hasattr(pltpu, "InterpretParams")


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _quantized(x, junk, bits, axis, group, scale_dtype):
    """Quantize + pack `x [B, H, N, D]`. Tokens whose `junk [B, N]` code is > 0 (past n_valid) get
    that nonzero code and NaN scales on rows holding no valid token, so masking is really tested."""
    codes, scale, zero = quant.quantize(x, bits, axis, group, scale_dtype)
    dead = junk > 0
    codes = jnp.where(dead[:, None, :, None], junk[:, None, :, None].astype(codes.dtype), codes)
    first = jnp.arange(scale.shape[2]) * (group if axis == "channel" else 1)
    dead_rows = jnp.take(dead, jnp.minimum(first, x.shape[2] - 1), axis=1)  # [B, rows]
    scale = jnp.where(dead_rows[:, None, :, None], jnp.nan, scale)
    zero = jnp.where(dead_rows[:, None, :, None], jnp.nan, zero)
    return packing.pack(codes, bits), scale, zero


def _junk(shape, n_valid, bits, rng) -> jax.Array:
    """Random nonzero codes `[B, N]` at tokens >= n_valid, 0 elsewhere."""
    junk = rng.integers(1, quant.qmax(bits) + 1, size=shape, dtype=np.int32)
    return jnp.asarray(np.where(np.arange(shape[1])[None] >= np.asarray(n_valid)[:, None], junk, 0))


def _case(b, h, r, d, n, n_valid, kspec, vspec, scale_dtype=jnp.bfloat16, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, h, r, d)) * 0.25, jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, h, n, d)) + 0.5, jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, h, n, d)), jnp.float32)
    nv = np.asarray(n_valid, np.int32)
    kw, ks, kz = _quantized(k, _junk((b, n), nv, kspec[0], rng), *kspec, scale_dtype)
    vw, vs, vz = _quantized(v, _junk((b, n), nv, vspec[0], rng), *vspec, scale_dtype)
    static = dict(k_bits=kspec[0], k_axis=kspec[1], k_group=kspec[2],
                  v_bits=vspec[0], v_axis=vspec[1], v_group=vspec[2])
    return (q, kw, ks, kz, vw, vs, vz, jnp.asarray(nv)), static


@functools.lru_cache(maxsize=None)
def _jitted(backend: str, block, splits, static_items):
    static = dict(static_items)
    return jax.jit(functools.partial(packed_decode_attention, backend=backend, block_tokens=block,
                                     num_splits=splits, **static))


@functools.lru_cache(maxsize=None)
def _reference(static_items):
    return jax.jit(functools.partial(reference_packed_attention, **dict(static_items)))


def _check(args, static, backend="interpret", block=None, splits=None):
    out, lse = _jitted(backend, block, splits, tuple(sorted(static.items())))(*args)
    ref_out, ref_lse = _reference(tuple(sorted(static.items())))(*args)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert not np.isnan(np.asarray(out)).any() and not np.isnan(np.asarray(lse)).any()
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=TOL, atol=TOL)
    return out, lse


# (K spec, V spec, n_rep, head_dim): every width, both groupings on each side, GQA 1/3/7, D 64/128.
CASES = [
    ((1, "channel", 32), (1.58, "token", 64), 1, 64),
    ((1.58, "channel", 32), (2, "token", 32), 3, 128),
    ((2, "channel", 64), (4, "channel", 32), 7, 64),
    ((3, "token", 32), (3, "channel", 32), 3, 64),
    ((4, "channel", 128), (8, "token", 128), 7, 128),
    ((8, "token", 64), (1, "channel", 32), 1, 128),
    ((4, "token", 16), (1.58, "channel", 64), 3, 64),
    ((5, "channel", 32), (6, "token", 32), 3, 64),
    ((6, "token", 64), (5, "channel", 64), 1, 64),
]


@pytest.mark.parametrize("kspec,vspec,r,d", CASES, ids=lambda x: str(x))
def test_interpret_matches_reference(kspec, vspec, r, d):
    # Ragged rows, lengths off the block grid (block 64), one row past a split boundary.
    args, static = _case(3, 2, r, d, 384, [301, 37, 130], kspec, vspec)
    _check(args, static)


def test_empty_rows_give_zero_and_neg_inf():
    args, static = _case(3, 2, 3, 64, 128, [0, 77, 0], (2, "channel", 32), (4, "token", 64))
    out, lse = _check(args, static)
    assert np.all(np.asarray(out)[[0, 2]] == 0.0)
    assert np.all(np.isneginf(np.asarray(lse)[[0, 2]]))
    assert np.all(np.isfinite(np.asarray(lse)[1]))


def test_all_rows_empty():
    args, static = _case(2, 1, 7, 64, 64, [0, 0], (1.58, "token", 64), (3, "channel", 32))
    out, lse = _check(args, static)
    assert np.all(np.asarray(out) == 0.0) and np.all(np.isneginf(np.asarray(lse)))


@pytest.mark.parametrize("n_valid", [[1, 64], [65, 128], [127, 2]])
def test_block_edges_and_f32_scales(n_valid):
    args, static = _case(2, 1, 3, 64, 128, n_valid, (2, "channel", 32), (2, "token", 32),
                         scale_dtype=jnp.float32, seed=1)
    _check(args, static, splits=1)


def test_block_and_split_choices_agree():
    args, static = _case(2, 2, 3, 64, 512, [500, 200], (4, "channel", 32), (2, "token", 64))
    a = _check(args, static, block=32, splits=3)
    b = _check(args, static, block=128, splits=1)
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=TOL, atol=TOL)


def test_spare_word_and_longer_scales():
    # W includes a spare word and the scale arrays carry the architecture's spare block.
    args, static = _case(2, 1, 3, 64, 200, [190, 41], (3, "channel", 40), (1, "token", 64))
    q, kw, ks, kz, vw, vs, vz, nv = args
    kw = jnp.pad(kw, [(0, 0), (0, 0), (0, 1), (0, 0)])
    vw = jnp.pad(vw, [(0, 0), (0, 0), (0, 1), (0, 0)])
    ks, kz = (jnp.pad(x, [(0, 0), (0, 0), (0, 1), (0, 0)]) for x in (ks, kz))
    vs, vz = (jnp.pad(x, [(0, 0), (0, 0), (0, 40), (0, 0)]) for x in (vs, vz))
    _check((q, kw, ks, kz, vw, vs, vz, nv), static, block=40)


# (K spec, V spec, n_rep, head_dim, n_valid, block in TPU units). Covers the scale fold (<= 4
# groups per block) and in-VMEM dequantization (more), per-channel scale rows fetched whole, in
# tiles with an offset, and in tiles of exactly one block's rows; a partial last words block.
TPU_CASES = [
    ((1.58, "channel", 32), (2, "token", 64), 3, 64, [611, 1000], 1),
    ((2, "channel", 32), (4, "channel", 64), 7, 128, [900, 0], 1),
    ((1, "token", 32), (8, "channel", 128), 1, 64, [1, 700], 1),
    ((3, "channel", 16), (5, "token", 32), 3, 64, [1000, 237], 1),
    ((4, "channel", 32), (2, "token", 64), 3, 128, [1500, 1100], 4),
]


@pytest.mark.skipif(not _has_tpu_interpret(), reason="jax has no pltpu.InterpretParams")
@pytest.mark.parametrize("kspec,vspec,r,d,n_valid,mult", TPU_CASES, ids=lambda x: str(x))
def test_tpu_interpret_matches_reference(kspec, vspec, r, d, n_valid, mult):
    klay = C.Layout.make(*kspec, d)
    vlay = C.Layout.make(*vspec, d)
    block = tpu_block_unit(klay, vlay) * mult
    groups = math.lcm(*(s[2] for s in (kspec, vspec) if s[1] == "channel"))
    n = -(-max(max(n_valid) + 1, 2 * block + 7) // groups) * groups
    args, static = _case(2, 2, r, d, n, n_valid, kspec, vspec, seed=2)
    _check(args, static, backend="tpu_interpret", block=block, splits=2)


def test_default_blocks():
    k = C.Layout.make(1.58, "channel", 32, 128)
    v = C.Layout.make(2, "token", 128, 128)
    unit = tpu_block_unit(k, v)
    assert unit % (8 * 20) == 0 and unit % (8 * 16) == 0 and unit % 32 == 0
    assert default_block(k, v, "tpu") % unit == 0
    blk = default_block(k, v, "gpu")
    assert blk & (blk - 1) == 0 and blk % 32 == 0


def test_inside_while_loop():
    args, static = _case(2, 1, 3, 64, 128, [100, 9], (2, "channel", 32), (4, "token", 64))
    q, *rest = args
    fn = functools.partial(packed_decode_attention, backend="interpret", **static)

    @jax.jit
    def run(q):
        def body(c):
            i, acc = c
            out, _ = fn(q * (1.0 + i.astype(jnp.float32)), *rest)
            return i + 1, acc + out
        return lax.while_loop(lambda c: c[0] < 2, body, (jnp.int32(0), jnp.zeros_like(q)))[1]

    ref_fn = _reference(tuple(sorted(static.items())))
    ref = sum(ref_fn(q * s, *rest)[0] for s in (1.0, 2.0))
    np.testing.assert_allclose(np.asarray(run(q)), np.asarray(ref), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("bits", [1, 1.58, 2, 3, 4, 5, 6, 8])
def test_on_chip_digit_extraction(bits):
    base, p = C.WIDTHS[bits]
    assert (packing.digits_per_word(bits), packing.code_base(bits)) == (p, base)
    rng = np.random.default_rng(3)
    codes = rng.integers(0, base, size=(8 * p, 16), dtype=np.uint8)
    codes[:p] = base - 1  # the largest word
    words = packing.pack(jnp.asarray(codes), bits)
    w = lax.bitcast_convert_type(words, jnp.int32)
    lay = C.Layout.make(bits, "token", 16, 16)
    planes = jnp.stack(C.digit_planes(w, lay), axis=1).reshape(8 * p, 16)
    np.testing.assert_array_equal(np.asarray(planes), codes)
    tok = jnp.arange(8 * p, dtype=jnp.int32)[:, None]
    at = C.digits_at(w[tok[:, 0] // p], tok % p, lay)
    np.testing.assert_array_equal(np.asarray(at), codes)


def _lower(platform: str, args, static, backend: str) -> str:
    """Cross-lowers the jitted kernel for `platform` (no compile: this machine has no such device)."""
    fn = jax.jit(functools.partial(packed_decode_attention, backend=backend, **static))
    try:
        return fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()
    except (ImportError, NotImplementedError) as e:  # this jaxlib cannot lower for the platform
        pytest.skip(f"cannot lower for {platform}: {e}")


@pytest.mark.parametrize("kspec,vspec,r,d", CASES, ids=lambda x: str(x))
def test_lowers_for_triton(kspec, vspec, r, d):
    # Catches what the Pallas Triton lowering rejects (non power-of-two tiles, unsupported ops);
    # Triton's own compilation to PTX still needs a GPU.
    args, static = _case(1, 2, r, d, 512, [500], kspec, vspec)
    assert "triton" in _lower("cuda", args, static, "gpu")


def _mosaic_case(kspec, vspec, r: int, d: int, monkeypatch) -> tuple[tuple, dict]:
    """A case of two TPU blocks (the last token masked), with the lowering pretending a v5e: Mosaic
    asks for the chip's tiling."""
    try:
        from jax._src.pallas.mosaic import tpu_info
        chip = tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1)
        monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind, lambda: chip)
    except (ImportError, AttributeError) as e:
        pytest.skip(f"jax internals moved: {e}")
    klay, vlay = C.Layout.make(*kspec, d), C.Layout.make(*vspec, d)
    groups = math.lcm(*(s[2] for s in (kspec, vspec) if s[1] == "channel"))
    n = -(-2 * tpu_block_unit(klay, vlay) // groups) * groups
    return _case(1, 2, r, d, n, [n - 3], kspec, vspec)


@pytest.mark.parametrize("kspec,vspec,r,d", CASES, ids=lambda x: str(x))
def test_lowers_for_mosaic(kspec, vspec, r, d, monkeypatch):
    # Pallas → Mosaic MLIR (block-shape rules, supported primitives); Mosaic's layout passes run
    # only inside the TPU compiler.
    args, static = _mosaic_case(kspec, vspec, r, d, monkeypatch)
    assert "tpu_custom_call" in _lower("tpu", args, static, "tpu")


def test_argument_checks():
    from kvq_jax.errors import KvqError
    from pallas_kernels import resolve_backend

    assert resolve_backend("auto") == "interpret"  # this CPU machine
    args, static = _case(1, 1, 3, 64, 128, [100], (2, "channel", 32), (4, "token", 64))
    with pytest.raises(KvqError, match="backend"):
        packed_decode_attention(*args, backend="cuda", **static)
    with pytest.raises(KvqError, match="multiple of"):
        packed_decode_attention(*args, backend="tpu", block_tokens=100, **static)
    with pytest.raises(KvqError, match="power-of-two"):
        packed_decode_attention(*args, backend="gpu", block_tokens=96, **static)
    with pytest.raises(KvqError, match="widths"):
        packed_decode_attention(*args, backend="interpret", **{**static, "k_bits": 7})
    with pytest.raises(KvqError, match="v_scale"):
        bad = jnp.concatenate([args[5]] * 2, axis=-1)  # two channel groups, the spec says one
        packed_decode_attention(*args[:5], bad, *args[6:], backend="interpret", **static)


# Keys stored before RoPE (rotate="prerope"): each key block is dequantized and rotated on chip by
# position pos0 + t. (K spec, V spec, n_rep, head_dim, RoPE, pos0): plain, Llama 3 and linear scaling.
ROPE_CASES = [
    ((2, "channel", 64), (2, "token", 64), 3, 64, (10000.0, None), 4),
    ((4, "channel", 32), (1.58, "channel", 32), 7, 128,
     (500000.0, RopeScaling("llama3", factor=8.0, original_max_position=64)), 1000),
    ((3, "token", 32), (4, "token", 64), 1, 64, (1e6, RopeScaling("linear", factor=2.0)), 0),
]


@pytest.mark.parametrize("kspec,vspec,r,d,rope,pos0", ROPE_CASES, ids=lambda x: str(x))
def test_prerope_keys_match_reference(kspec, vspec, r, d, rope, pos0):
    args, static = _case(3, 2, r, d, 384, [301, 37, 130], kspec, vspec, seed=4)
    static = dict(static, k_rope=rope, pos0=pos0)
    out, _ = _check(args, static)
    # ...and the reference really rotates: the same codes read after RoPE give another result.
    plain, _ = _reference(tuple(sorted(dict(static, k_rope=None).items())))(*args)
    assert float(jnp.max(jnp.abs(out - plain))) > 1e-3


@pytest.mark.skipif(not _has_tpu_interpret(), reason="jax has no pltpu.InterpretParams")
@pytest.mark.parametrize("kspec,vspec,r,d,rope,pos0", ROPE_CASES[:2], ids=lambda x: str(x))
def test_prerope_keys_tpu_interpret(kspec, vspec, r, d, rope, pos0):
    klay, vlay = C.Layout.make(*kspec, d), C.Layout.make(*vspec, d)
    block = tpu_block_unit(klay, vlay)
    args, static = _case(2, 2, r, d, 2 * block + 64, [2 * block + 5, 77], kspec, vspec, seed=5)
    _check(args, dict(static, k_rope=rope, pos0=pos0), backend="tpu_interpret", block=block, splits=2)


def test_rope_block_is_apply_rope():
    from kvq_jax.rotations import apply_rope, rope_frequencies

    rng = np.random.default_rng(6)
    k = jnp.asarray(rng.normal(size=(64, 128)), jnp.float32)
    pos = jnp.arange(64)[:, None] + 3000
    rope = (10000.0, RopeScaling("linear", factor=4.0))
    inv = rope_frequencies(128, *rope)
    got = C.rope_block(k, pos.astype(jnp.float32), jnp.asarray(np.concatenate([inv, inv])[None]))
    np.testing.assert_allclose(np.asarray(got), np.asarray(apply_rope(k, pos[:, 0], rope)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kspec,vspec,r,d,rope,pos0", ROPE_CASES, ids=lambda x: str(x))
def test_prerope_lowers_for_triton(kspec, vspec, r, d, rope, pos0):
    args, static = _case(1, 2, r, d, 512, [500], kspec, vspec)
    assert "triton" in _lower("cuda", args, dict(static, k_rope=rope, pos0=pos0), "gpu")


@pytest.mark.parametrize("kspec,vspec,r,d,rope,pos0", ROPE_CASES, ids=lambda x: str(x))
def test_prerope_lowers_for_mosaic(kspec, vspec, r, d, rope, pos0, monkeypatch):
    args, static = _mosaic_case(kspec, vspec, r, d, monkeypatch)
    assert "tpu_custom_call" in _lower("tpu", args, dict(static, k_rope=rope, pos0=pos0), "tpu")


# Learned codebooks (QuantSpec.levels): digit c reads as levels[c] before the scale, on every backend.
def _book(bits: float, seed: int) -> tuple[float, ...]:
    qm = quant.qmax(bits)
    inner = np.sort(np.random.default_rng(seed).uniform(0.2, qm - 0.2, qm - 1))
    return (0.0, *map(float, inner), float(qm))


CODEBOOK_CASES = [  # (K spec, V spec, n_rep, head_dim, keys have a codebook, values have one)
    ((2, "channel", 64), (3, "token", 32), 3, 64, True, True),
    ((1.58, "channel", 32), (4, "channel", 32), 7, 128, True, True),  # folded per-channel values
    ((4, "token", 64), (2, "token", 64), 1, 64, True, False),
    ((3, "channel", 16), (2, "channel", 64), 3, 64, False, True),
]


def _codebook_static(static, kspec, vspec, kb, vb):
    return dict(static, k_levels=_book(kspec[0], 1) if kb else None, v_levels=_book(vspec[0], 2) if vb else None)


@pytest.mark.parametrize("kspec,vspec,r,d,kb,vb", CODEBOOK_CASES, ids=lambda x: str(x))
def test_codebooks_match_reference(kspec, vspec, r, d, kb, vb):
    args, static = _case(3, 2, r, d, 384, [301, 37, 130], kspec, vspec, seed=7)
    out, _ = _check(args, _codebook_static(static, kspec, vspec, kb, vb))
    uniform, _ = _reference(tuple(sorted(static.items())))(*args)
    assert float(jnp.max(jnp.abs(out - uniform))) > 1e-3  # the levels are really read


@pytest.mark.skipif(not _has_tpu_interpret(), reason="jax has no pltpu.InterpretParams")
@pytest.mark.parametrize("kspec,vspec,r,d,kb,vb", CODEBOOK_CASES[::3], ids=lambda x: str(x))
def test_codebooks_tpu_interpret(kspec, vspec, r, d, kb, vb):
    klay, vlay = C.Layout.make(*kspec, d), C.Layout.make(*vspec, d)
    block = tpu_block_unit(klay, vlay)
    args, static = _case(2, 2, r, d, 2 * block + 64, [2 * block + 5, 77], kspec, vspec, seed=8)
    _check(args, _codebook_static(static, kspec, vspec, kb, vb), backend="tpu_interpret", block=block, splits=2)


def test_codebook_with_prerope_keys():
    kspec, vspec = (2, "channel", 64), (2, "token", 64)
    args, static = _case(2, 2, 3, 64, 256, [200, 70], kspec, vspec, seed=9)
    _check(args, dict(_codebook_static(static, kspec, vspec, True, False), k_rope=(10000.0, None), pos0=4))


@pytest.mark.parametrize("kspec,vspec,r,d,kb,vb", CODEBOOK_CASES[:2], ids=lambda x: str(x))
def test_codebooks_lower_for_triton_and_mosaic(kspec, vspec, r, d, kb, vb, monkeypatch):
    args, static = _case(1, 2, r, d, 512, [500], kspec, vspec)
    assert "triton" in _lower("cuda", args, _codebook_static(static, kspec, vspec, kb, vb), "gpu")
    args, static = _mosaic_case(kspec, vspec, r, d, monkeypatch)
    assert "tpu_custom_call" in _lower("tpu", args, _codebook_static(static, kspec, vspec, kb, vb), "tpu")


def test_codebook_of_the_wrong_size_is_refused():
    from kvq_jax.errors import KvqError

    args, static = _case(1, 1, 3, 64, 128, [100], (2, "channel", 32), (4, "token", 64))
    with pytest.raises(KvqError, match="2-bit codebook has 4 levels"):
        packed_decode_attention(*args, backend="interpret", **static, k_levels=(0.0, 1.0, 3.0))
