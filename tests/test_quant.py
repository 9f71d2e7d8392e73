"""Properties of the asymmetric min-max quantizer (kvq_jax.quant)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvq_jax.errors import KvqError
from kvq_jax.quant import QUANT_BITS, dequantize, qmax, quantize

SCALE_DTYPES = (jnp.bfloat16, jnp.float32)
GROUP = 8
# [B, H, T, D]: token axis groups D=32 in 4 groups, channel axis groups T=24 in 3 blocks.
SHAPE = (2, 3, 24, 32)
FAST = settings(max_examples=20, deadline=None)


@functools.partial(jax.jit, static_argnames=("bits", "axis", "group", "scale_dtype"))
def _roundtrip(x, valid, *, bits, axis, group, scale_dtype):
    c, s, z = quantize(x, bits, axis, group, scale_dtype, valid)
    return c, s, z, dequantize(c, s, z, axis, group)


def run(x, bits, axis, group=GROUP, scale_dtype=jnp.bfloat16, valid=None):
    # An all-true mask when none is given: every test then shares one compiled function per
    # (bits, axis, scale dtype), which keeps the suite fast; valid=None is covered by the others.
    shape = (*x.shape[:-1], 1)
    valid = jnp.ones(shape, bool) if valid is None else jnp.broadcast_to(valid, shape)
    out = _roundtrip(jnp.asarray(x), valid, bits=bits, axis=axis, group=group, scale_dtype=scale_dtype)
    return tuple(np.asarray(a) for a in out)


def expand(a: np.ndarray, axis: str, group: int = GROUP) -> np.ndarray:
    """scale/zero back to [..., T, D] (f32)."""
    return np.repeat(a.astype(np.float32), group, axis=-1 if axis == "token" else -2)


def grouped_minmax(x: np.ndarray, use: np.ndarray, axis: str, group: int = GROUP):
    """Reference per-group min/max over `use` entries (nan where a group has none)."""
    *lead, t, d = x.shape
    red = -1 if axis == "token" else -2
    shp = (*lead, t, d // group, group) if axis == "token" else (*lead, t // group, group, d)
    xg, ug = x.reshape(shp), use.reshape(shp)
    with np.errstate(invalid="ignore"):
        mn = np.where(ug, xg, np.inf).min(red)
        mx = np.where(ug, xg, -np.inf).max(red)
    none = ~ug.any(red)
    return np.where(none, np.nan, mn), np.where(none, np.nan, mx)


def covers(z, s, bits, mn, mx):
    """The stored grid [z, z + qmax·s] contains [mn, mx] (up to float32 rounding), groupwise."""
    zf, sf = z.astype(np.float64), s.astype(np.float64)
    slack = 4e-7 * np.maximum(np.abs(mx), np.abs(zf))
    return (zf <= mn) & (zf + qmax(bits) * sf >= mx - slack)


def assert_within_half_step(x, s, z, y, axis, group=GROUP, use=None):
    se, ze = expand(s, axis, group), expand(z, axis, group)
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    # Half a stored step, plus float32 rounding of the (x - zero) / scale and code·scale + zero arithmetic.
    with np.errstate(invalid="ignore"):
        tol = se / 2 * (1 + 1e-5) + 4e-7 * (np.abs(x) + np.abs(ze)) + 1e-30
    ok = err <= tol if use is None else (err <= tol) | ~use
    assert ok.all(), f"max excess {np.max(np.where(ok, 0, err - tol))}"


@st.composite
def data(draw):
    """Random [B, H, T, D] float32 data with varied magnitude, offset and an occasional outlier."""
    seed = draw(st.integers(0, 2**31 - 1))
    mag = draw(st.sampled_from([1e-3, 1.0, 37.0, 1e4]))
    off = draw(st.sampled_from([0.0, 1.0, -250.0]))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["normal", "uniform", "heavy", "few"]))
    if kind == "normal":
        x = rng.normal(size=SHAPE)
    elif kind == "uniform":
        x = rng.uniform(-1, 1, size=SHAPE)
    elif kind == "heavy":
        x = rng.standard_t(2, size=SHAPE)
    else:  # few distinct values: exercises ties and constant groups
        x = rng.integers(-2, 3, size=SHAPE).astype(np.float64)
    return (x * mag + off).astype(np.float32)


def test_qmax():
    assert [qmax(b) for b in QUANT_BITS] == [1, 2, 3, 7, 15, 31, 63, 255]
    for bad in (0, 7, 16, 1.5, True):
        with pytest.raises(KvqError, match="bits must be one of"):
            qmax(bad)


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("bits", QUANT_BITS)
@FAST
@given(x=data())
def test_roundtrip_within_half_step(bits, axis, scale_dtype, x):
    c, s, z, y = run(x, bits, axis, scale_dtype=scale_dtype)
    assert c.dtype == np.uint8 and c.shape == x.shape and c.max() <= qmax(bits)
    assert s.dtype == np.dtype(scale_dtype) and z.dtype == np.dtype(scale_dtype)
    assert (s.astype(np.float32) >= 0).all()
    assert_within_half_step(x, s, z, y, axis)
    # zero is the group min rounded down; the stored grid covers [min, max].
    mn, mx = grouped_minmax(x, np.ones(x.shape, bool), axis)
    assert covers(z, s, bits, mn, mx).all()
    # ... and is no wider than storage rounding requires.
    zf, sf = z.astype(np.float64), s.astype(np.float64)
    eps = 2.0**-7 if scale_dtype == jnp.bfloat16 else 2.0**-22
    assert (zf >= mn - eps * np.abs(mn) - 1e-30).all()
    slack = 4e-7 * np.maximum(np.abs(mx), np.abs(zf)) / qmax(bits)
    assert (sf <= (mx - zf) / qmax(bits) * (1 + eps) + slack + 1e-30).all()


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_shapes(axis):
    x = jax.ShapeDtypeStruct((2, 3, 128, 64), jnp.float32)
    c, s, z = jax.eval_shape(lambda a: quantize(a, 4, axis, 32), x)
    want = (2, 3, 128, 2) if axis == "token" else (2, 3, 4, 64)
    assert c.shape == x.shape and s.shape == want and z.shape == want
    assert c.dtype == jnp.uint8 and s.dtype == jnp.bfloat16 and z.dtype == jnp.bfloat16
    y = jax.eval_shape(lambda c, s, z: dequantize(c, s, z, axis, 32), c, s, z)
    assert y.shape == x.shape and y.dtype == jnp.float32
    y = jax.eval_shape(lambda c, s, z: dequantize(c, s, z, axis, 32, dtype=jnp.bfloat16), c, s, z)
    assert y.dtype == jnp.bfloat16
    x2 = jax.ShapeDtypeStruct((128, 64), jnp.float32)  # no leading dims
    _, s, z = jax.eval_shape(lambda a: quantize(a, 1.58, axis, 32, "float32"), x2)
    assert s.shape == want[2:] and s.dtype == jnp.float32 and z.dtype == jnp.float32


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("bits", QUANT_BITS)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_constant_groups_exact(bits, axis, scale_dtype, seed):
    rng = np.random.default_rng(seed)
    gshape = (2, 3, 24, 4) if axis == "token" else (2, 3, 3, 32)
    vals = rng.normal(size=gshape) * 10.0 ** rng.integers(-3, 6, size=gshape)
    # bf16 storage can only hold bf16 values exactly.
    vals = np.asarray(jnp.asarray(vals, scale_dtype).astype(jnp.float32))
    x = expand(vals, axis)
    c, s, z, y = run(x, bits, axis, scale_dtype=scale_dtype)
    assert (s.astype(np.float32) == 0).all() and (c == 0).all()
    np.testing.assert_array_equal(y, x)


def test_constant_non_representable_group_fp32_exact():
    x = np.full(SHAPE, 0.1, np.float32)
    for axis in ("token", "channel"):
        _, s, _, y = run(x, 2, axis, scale_dtype=jnp.float32)
        assert (s == 0).all()
        np.testing.assert_array_equal(y, x)
        _, s, z, y = run(x, 2, axis)  # bf16: still within half a step
        assert_within_half_step(x, s, z, y, axis)


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("bits", [1, 1.58, 4, 8])
@pytest.mark.parametrize("outlier", [1e30, -1e30, 3.3e38, -3.3e38])
def test_huge_outlier_finite(bits, axis, scale_dtype, outlier):
    rng = np.random.default_rng(0)
    x = rng.normal(size=SHAPE).astype(np.float32)
    x[0, 1, 5, 7] = outlier
    x[1, 2, 3, 9] = -outlier
    c, s, z, y = run(x, bits, axis, scale_dtype=scale_dtype)
    for a in (s, z, y):
        assert np.isfinite(a.astype(np.float32)).all()
    if abs(outlier) < 1e37:  # far from float max, the usual bound still holds
        assert_within_half_step(x, s, z, y, axis)


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("bits", QUANT_BITS)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), frac=st.sampled_from([0.05, 0.3, 0.9, 1.0]))
def test_non_finite_inputs(bits, axis, scale_dtype, seed, frac):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=SHAPE) * 5).astype(np.float32)
    bad = rng.random(SHAPE) < frac
    x[bad] = rng.choice(np.array([np.nan, np.inf, -np.inf], np.float32), size=int(bad.sum()))
    c, s, z, y = run(x, bits, axis, scale_dtype=scale_dtype)
    assert np.isfinite(y).all()
    assert np.isfinite(s.astype(np.float32)).all() and np.isfinite(z.astype(np.float32)).all()
    assert (c[x == np.inf] == qmax(bits)).all()
    assert (c[x == -np.inf] == 0).all() and (c[np.isnan(x)] == 0).all()
    fin = np.isfinite(x)
    assert_within_half_step(x, s, z, y, axis, use=fin)
    # Non-finite entries do not move the group min/max.
    mn, mx = grouped_minmax(x, fin, axis)
    zf, sf = z.astype(np.float64), s.astype(np.float64)
    has = ~np.isnan(mn)
    assert covers(z, s, bits, mn, mx)[has].all()
    # A group with no finite value: scale 0, zero 0; NaN / -inf decode to the group min.
    assert (sf[~has] == 0).all() and (zf[~has] == 0).all()
    ze = expand(z, axis)
    np.testing.assert_array_equal(y[np.isnan(x)], ze[np.isnan(x)])


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("bits", [1, 1.58, 2, 4, 8])
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(0, SHAPE[2]))
def test_valid_masks_padding(bits, axis, scale_dtype, seed, n):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=SHAPE).astype(np.float32)
    # Ragged rows: row b holds n - 5*b tokens (at least 0); padding is garbage.
    lengths = np.maximum(n - 5 * np.arange(SHAPE[0]), 0)
    valid = np.arange(SHAPE[2])[None, :] < lengths[:, None]  # [B, T]
    valid = valid[:, None, :, None]  # [B, 1, T, 1]
    x = np.where(valid, x, np.float32(1e6) * rng.choice([-1, 1], size=SHAPE)).astype(np.float32)
    c, s, z, y = run(x, bits, axis, scale_dtype=scale_dtype, valid=jnp.asarray(valid))
    use = np.broadcast_to(valid, x.shape)
    assert (c[~use] == 0).all()
    assert_within_half_step(x, s, z, y, axis, use=use)
    mn, mx = grouped_minmax(x, use, axis)
    has = ~np.isnan(mn)
    zf, sf = z.astype(np.float64), s.astype(np.float64)
    assert covers(z, s, bits, mn, mx)[has].all()
    # Padding left out of the range: steps stay those of N(0, 1) data, not of ±1e6.
    assert (sf < 100).all()
    assert (sf[~has] == 0).all() and (zf[~has] == 0).all()
    # Valid tokens quantize as if the padding were not there (token axis: groups never mix tokens).
    if axis == "token":
        c2, s2, z2, _ = run(x, bits, axis, scale_dtype=scale_dtype)
        np.testing.assert_array_equal(c[use], c2[use])


def test_valid_shapes_accepted():
    x = jax.ShapeDtypeStruct((2, 3, 16, 32), jnp.float32)
    for vshape in ((16, 1), (2, 1, 16, 1), (2, 3, 16, 1), (2, 3, 16, 32)):
        v = jax.ShapeDtypeStruct(vshape, jnp.bool_)
        jax.eval_shape(lambda a, m: quantize(a, 4, "channel", 16, valid=m), x, v)
    with pytest.raises(KvqError, match="does not broadcast"):
        v = jax.ShapeDtypeStruct((5, 1), jnp.bool_)
        jax.eval_shape(lambda a, m: quantize(a, 4, "channel", 16, valid=m), x, v)


def test_jit_and_vmap():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 2, 32, 32)), jnp.float32)
    f = jax.jit(quantize, static_argnums=(1, 2, 3, 4))
    c1, s1, z1 = f(x, 3, "channel", 32, jnp.bfloat16)
    c2, s2, z2 = jax.jit(jax.vmap(lambda a: quantize(a, 3, "channel", 32)))(x)
    np.testing.assert_array_equal(np.asarray(c1), np.asarray(c2))
    np.testing.assert_array_equal(np.asarray(s1, np.float32), np.asarray(s2, np.float32))
    np.testing.assert_array_equal(np.asarray(z1, np.float32), np.asarray(z2, np.float32))


def test_bf16_input():
    x = np.random.default_rng(3).normal(size=SHAPE).astype(jnp.bfloat16)
    c, s, z, y = run(x, 4, "token")
    assert_within_half_step(x.astype(np.float32), s, z, y, "token")


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(bits=9, axis="token", group=8), "bits must be one of"),
        (dict(bits=4, axis="head", group=8), "axis must be"),
        (dict(bits=4, axis="token", group=0), "group must be a positive int"),
        (dict(bits=4, axis="token", group=12), "head_dim 32 is not divisible"),
        (dict(bits=4, axis="channel", group=16), "token count 24 is not divisible"),
        (dict(bits=4, axis="token", group=8, scale_dtype=jnp.float16), "scale_dtype must be"),
    ],
)
def test_bad_arguments(kwargs, msg):
    with pytest.raises(KvqError, match=msg) as e:
        jax.eval_shape(lambda a: quantize(a, **kwargs), jax.ShapeDtypeStruct(SHAPE, jnp.float32))
    assert "\n" not in str(e.value)


def test_bad_dequantize_arguments():
    f32 = jax.ShapeDtypeStruct(SHAPE, jnp.float32)
    c, s, z = jax.eval_shape(lambda a: quantize(a, 4, "token", 8), f32)
    with pytest.raises(KvqError, match="do not match"):
        jax.eval_shape(lambda c, s, z: dequantize(c, s, z, "token", 16), c, s, z)
    with pytest.raises(KvqError, match="float array"):
        jax.eval_shape(lambda a: quantize(a, 4, "token", 8), jax.ShapeDtypeStruct(SHAPE, jnp.int32))
    with pytest.raises(KvqError, match=r"\[..., T, D\]"):
        jax.eval_shape(lambda a: quantize(a, 4, "token", 8), jax.ShapeDtypeStruct((8,), jnp.float32))


# ----------------------------------------------------------------------------- codebooks

from kvq_jax.quant import level_values, nearest_codes  # noqa: E402

BOOKS = {1.58: (0.0, 0.7, 2.0), 2: (0.0, 1.2, 1.8, 3.0), 3: (0.0, 0.5, 1.5, 3.2, 3.9, 5.1, 6.5, 7.0)}


@pytest.mark.parametrize("bits", sorted(BOOKS))
@pytest.mark.parametrize("axis", ("token", "channel"))
def test_codebook_codes_are_the_nearest_level(bits, axis):
    """Each code is the level nearest to the value's position in its group; the groups' scales and zeros
    are those of uniform codes (the ends stay the group's min and max), and the error is at most half
    the widest gap times the scale."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal(SHAPE), jnp.float32)
    lv = BOOKS[bits]
    c, s, z = quantize(x, bits, axis, GROUP, jnp.float32, levels=lv)
    cu, su, zu = quantize(x, bits, axis, GROUP, jnp.float32)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(su))
    np.testing.assert_array_equal(np.asarray(z), np.asarray(zu))
    se, ze = expand(np.asarray(s), axis), expand(np.asarray(z), axis)
    u = (np.asarray(x) - ze) / se
    dist = np.abs(u[..., None] - np.asarray(lv)[None])  # [..., levels]
    got = np.take_along_axis(dist, np.asarray(c)[..., None].astype(np.int64), -1)[..., 0]
    assert np.all(got <= dist.min(-1) + 1e-5)
    back = np.asarray(dequantize(c, s, z, axis, GROUP, levels=lv))
    np.testing.assert_allclose(back, np.asarray(lv)[np.asarray(c)] * se + ze, rtol=1e-6, atol=1e-6)
    assert np.all(np.abs(back - np.asarray(x)) <= se * np.max(np.diff(lv)) / 2 * (1 + 1e-5) + 1e-6)
    # ...and it is not the uniform quantizer
    assert not np.array_equal(np.asarray(c), np.asarray(cu))


def test_codebook_as_tuple_or_array_agree():
    """Static levels (select chain, as the kernels run it) and an array of levels (gather, as the
    analysis measures many codebooks) give the same codes and values."""
    x = jnp.asarray(np.random.default_rng(4).standard_normal(SHAPE), jnp.float32)
    lv = BOOKS[3]
    c1, s, z = quantize(x, 3, "channel", GROUP, levels=lv)
    c2, _, _ = jax.jit(lambda a, l: quantize(a, 3, "channel", GROUP, levels=l))(x, jnp.asarray(lv))
    np.testing.assert_array_equal(np.asarray(c1), np.asarray(c2))
    np.testing.assert_array_equal(np.asarray(level_values(c1, lv)), np.asarray(level_values(c1, jnp.asarray(lv))))
    codes = jnp.arange(8.0)
    np.testing.assert_array_equal(np.asarray(level_values(codes, lv)), np.asarray(lv, np.float32))
    np.testing.assert_array_equal(np.asarray(level_values(codes, None)), np.arange(8.0))
    np.testing.assert_array_equal(np.asarray(nearest_codes(jnp.asarray([0.2, 0.34, 1.01, 6.9]), lv)), [0, 1, 2, 7])


def test_codebook_non_finite_inputs_stay_finite():
    x = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
    x[0, 0, :3, :5] = np.nan
    x[1, 2, 4, 7] = np.inf
    c, s, z = quantize(jnp.asarray(x), 2, "token", GROUP, levels=BOOKS[2])
    assert np.all(np.isfinite(np.asarray(dequantize(c, s, z, "token", GROUP, levels=BOOKS[2]))))
    assert int(c[1, 2, 4, 7]) == 3 and int(c[0, 0, 0, 0]) == 0


def test_codebook_of_the_wrong_size_is_refused():
    with pytest.raises(KvqError, match="2-bit codebook has 4 levels"):
        quantize(jnp.zeros(SHAPE), 2, "token", GROUP, levels=(0.0, 1.0, 3.0))
