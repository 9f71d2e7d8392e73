"""Attention over the cache (kvq_jax.attention) and the model end to end.

- The decode read over a quantized layer (sink + packed body + recent ring, LSE-merged) equals plain
  softmax attention over the dense K/V a reader sees: the sink as is, the packed body dequantized with
  `packing.unpack` / `quant.dequantize`, the ring in body order. Anything outside the valid region is
  poisoned with garbage first, so the masks are checked too.
- The entry point `attention.attention` (prefill T > 1 and decode T == 1, GQA) against the same reference.
- The tiny model: 16-bit plans reproduce the dense cache; logit errors grow as bits shrink; the
  Hadamard rotation is orthonormal and leaves the fp-equivalent path unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvq_jax import attention, packing, quant, rotations
from kvq_jax.cache import DenseLayer, QuantLayer, init_cache
from kvq_jax.config import tiny_config
from kvq_jax.errors import KvqError
from kvq_jax.model import Transformer
from kvq_jax.plan import DenseKV, KVPlan, QuantSpec
from kvq_jax import cache as kvcache

S, R = 4, 32


def ch(bits, group=16):
    return QuantSpec(bits, "channel", group)


def tok(bits, group=32):
    return QuantSpec(bits, "token", group)


def build(keys, values, *, batch, d, capacity, hkv=2, residual=R, sink=S, chunk=None):
    cfg = tiny_config(n_layers=len(keys), n_heads=hkv, n_kv_heads=hkv, head_dim=d)
    plan = KVPlan(tuple(keys), tuple(values), residual=residual, sink=sink)
    return init_cache(cfg, plan, batch, capacity, chunk=chunk)


def counts(lay, n):
    m = max(0, n - lay.sink)
    g = lay.block
    return m, g * -(-max(0, m - lay.residual) // g)


@functools.partial(jax.jit, static_argnames=("axis", "group", "levels"))
def _dequantize(codes, scale, zero, *, axis, group, levels=None):
    return quant.dequantize(codes, scale, zero, axis, group, levels=levels)


@functools.partial(jax.jit, static_argnames=("bits",))
def _unpack(words, *, bits):
    return packing.unpack(words, bits)


def body_view(t, b: int, q: int) -> np.ndarray:
    """The first q body tokens of row b of a packed tensor, as a reader sees them: `[H, q, D]` f64."""
    spec = t.spec
    if spec.dense:
        return np.asarray(t.words[b], np.float64)[:, :q]
    codes = np.asarray(_unpack(jnp.asarray(t.words[b]), bits=spec.bits))
    # Dequantize the whole storage (one shape per layer), then keep the first q tokens.
    n = (t.scale.shape[2] * spec.group) if spec.axis == "channel" else t.scale.shape[2]
    full = np.zeros((codes.shape[0], n, codes.shape[2]), codes.dtype)
    k = min(n, codes.shape[1])
    full[:, :k] = codes[:, :k]
    x = _dequantize(jnp.asarray(full), jnp.asarray(t.scale[b]), jnp.asarray(t.zero[b]), axis=spec.axis,
                    group=spec.group, levels=spec.levels)
    return np.asarray(x, np.float64)[:, :q]


def reader_view(lay, b: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense K, V `[H, n, D]` of row b holding n positions: sink, dequantized body, ring in body order."""
    m, q = counts(lay, n)
    s, r = lay.sink, lay.residual
    slots = np.arange(q, m) % max(r, 1)
    out = []
    for sink, ring, t in ((lay.sink_k, lay.recent_k, lay.k), (lay.sink_v, lay.recent_v, lay.v)):
        parts = [np.asarray(sink[b], np.float64)[:, : min(n, s)], body_view(t, b, q),
                 np.asarray(ring[b], np.float64)[:, slots]]
        out.append(np.concatenate(parts, axis=1))
    assert out[0].shape[1] == n
    return out[0], out[1]


def softmax_attend(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """q `[..., D]` (pre-scaled), k/v `[N, D]` → `[..., D]`, in float64."""
    s = q @ k.T
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)) @ v


def poison(lay, lengths, rng):
    """A copy of a host layer with every slot outside each row's valid region set to garbage."""
    arrs = {name: np.array(getattr(lay, name)) for name in ("sink_k", "sink_v", "recent_k", "recent_v")}
    packed = {}
    for side in ("k", "v"):
        t = getattr(lay, side)
        packed[side] = [np.array(t.words), np.array(t.scale), np.array(t.zero)]
    for b, n in enumerate(lengths):
        m, q = counts(lay, int(n))
        valid_slots = set((np.arange(q, m) % lay.residual).tolist())
        bad_slots = [i for i in range(lay.residual) if i not in valid_slots]
        for name in ("sink_k", "sink_v"):
            arrs[name][b, :, int(n):] = rng.uniform(-1e3, 1e3, arrs[name][b, :, int(n):].shape)
        for name in ("recent_k", "recent_v"):
            arrs[name][b, :, bad_slots] = rng.uniform(-1e3, 1e3, arrs[name][b, :, bad_slots].shape)
        for side in ("k", "v"):
            spec = getattr(lay, side).spec
            words, scale, zero = packed[side]
            if spec.dense:
                words[b, :, q:] = rng.uniform(-1e3, 1e3, words[b, :, q:].shape)
                continue
            w0 = -(-q // packing.digits_per_word(spec.bits))  # words past the last one in use
            words[b, :, w0:] = rng.integers(0, 2**32, words[b, :, w0:].shape, dtype=np.uint64).astype(np.uint32)
            s0 = q // spec.group if spec.axis == "channel" else q
            scale[b, :, s0:] = 7.0
            zero[b, :, s0:] = -300.0
    out = lay.replace(**{k: jnp.asarray(v) for k, v in arrs.items()})
    for side in ("k", "v"):
        words, scale, zero = packed[side]
        t = getattr(lay, side)
        out = out.replace(**{side: t.replace(words=jnp.asarray(words), scale=jnp.asarray(scale, t.scale.dtype),
                                             zero=jnp.asarray(zero, t.zero.dtype))})
    return out


@jax.jit
def prefill_all(layers, k, v, n_new):
    return tuple(kvcache.write(lay, k[i], v[i], jnp.zeros_like(n_new), n_new) for i, lay in enumerate(layers))


@jax.jit
def read_all(q, layers, lengths):
    return tuple(attention.read_quantized(q, lay, lengths, "xla")[0] for lay in layers)


def kv_streams(rng, n_layers, b, h, n, d):
    def one():
        scale = np.exp(rng.normal(0.0, 0.5, (n_layers, 1, h, 1, d)))
        return (rng.standard_normal((n_layers, b, h, n, d)) * scale + rng.normal(0, 1, (n_layers, 1, h, 1, d))
                ).astype(np.float32)

    return one(), one()


# ----------------------------------------------------------------------------- read over the packed cache

WIDTHS = (1, 1.58, 2, 3, 4, 8)
# Each width on both axes (K channel/V token and K token/V channel), token groups 32 and 64, channel
# groups 16 and 32 (block 16 or 32 = R), and a 16-bit K or V (the dense body path).
READ_PAIRS = [
    (ch(1), tok(1.58, 64)), (tok(1), ch(1.58)), (ch(2, 32), tok(3)), (tok(2, 64), ch(3)),
    (ch(4), tok(8)), (tok(4), ch(8, 32)), (QuantSpec(16), ch(2)), (ch(8), QuantSpec(16)),
]


def test_read_pairs_cover_every_width_and_axis():
    seen = {(s.bits, s.axis, side) for k, v in READ_PAIRS for s, side in ((k, "K"), (v, "V"))}
    for b in WIDTHS:
        assert {(b, a) for a in ("token", "channel")} <= {(bb, a) for bb, a, _ in seen}
    for side in "KV":
        assert {"token", "channel"} <= {a for bb, a, sd in seen if sd == side and bb != 16}


@pytest.fixture(scope="module")
def prefilled():
    """An 8-layer cache, head_dim 64, rows of 760 (two body chunks, ring wrapped), 45 and 3 positions."""
    keys, values = zip(*READ_PAIRS)
    lengths = np.array([760, 45, 3])
    b, h, d, t = 3, 2, 64, 760
    cache = build(keys, values, batch=b, d=d, capacity=800, chunk=256)
    xk, xv = kv_streams(np.random.default_rng(0), len(keys), b, h, t, d)
    layers = prefill_all(cache.layers, jnp.asarray(xk), jnp.asarray(xv), jnp.asarray(lengths, jnp.int32))
    # Row 0 spans two chunks of every layer's body loop (XLA path).
    assert all(counts(lay, t)[1] > getattr(lay, "chunk", 0) for lay in layers)
    rng = np.random.default_rng(1)
    host = [poison(lay, lengths, rng) for lay in jax.device_get(layers)]
    return host, lengths


@pytest.mark.parametrize("rep", [1, 3])
def test_read_quantized_equals_attention_over_dequantized_cache(prefilled, rep):
    layers, lengths = prefilled
    if rep == 1:
        layers = layers[::3]  # a subset: the GQA axis is only a batch axis of the read
    b, h, d = len(lengths), 2, 64
    q = (np.random.default_rng(rep).standard_normal((b, h, rep, d)) * 0.3).astype(np.float32)
    outs = read_all(jnp.asarray(q), tuple(layers), jnp.asarray(lengths, jnp.int32))
    for lay, out in zip(layers, outs):
        out = np.asarray(out)
        assert out.shape == (b, h, rep, d)
        for row, n in enumerate(lengths):
            k, v = reader_view(lay, row, int(n))
            for hh in range(h):
                want = softmax_attend(q[row, hh].astype(np.float64), k[hh], v[hh])
                np.testing.assert_allclose(out[row, hh], want, atol=1e-5, rtol=1e-5,
                                           err_msg=f"K {lay.k.spec} V {lay.v.spec} row {row} n={n}")


@pytest.mark.parametrize("keys,values,chunk", [(ch(4, 64), tok(2, 64), 448), (tok(3), ch(1.58, 32), 700)])
def test_packed_loop_result_does_not_depend_on_its_chunk(keys, values, chunk):
    """Chunks that do not divide the body (the last one moved back, its overlap masked) give the same
    attention as one chunk over the whole body, for full, ragged and short rows."""
    b, h, d, cap = 3, 2, 64, 1540
    cache = build([keys], [values], batch=b, d=d, capacity=cap, chunk=chunk, residual=64)
    lay = cache.layers[0]
    assert lay.body_capacity % lay.chunk, (lay.body_capacity, lay.chunk)
    lengths = np.array([cap, lay.body_capacity - lay.chunk + S + 64 + 40, 90])
    xk, xv = kv_streams(np.random.default_rng(3), 1, b, h, cap, d)
    (lay,) = prefill_all((lay,), jnp.asarray(xk), jnp.asarray(xv), jnp.asarray(lengths, jnp.int32))
    q = jnp.asarray(np.random.default_rng(4).standard_normal((b, h, 3, d)) * 0.3, jnp.float32)
    n_quant = kvcache.quantized_count(lay, jnp.asarray(lengths, jnp.int32))
    assert int(n_quant[0]) > lay.body_capacity - lay.chunk  # row 0 reaches the moved-back chunk
    got = jax.jit(attention.packed_xla)(q, lay, n_quant)
    want = jax.jit(attention.packed_xla)(q, lay.replace(chunk=lay.body_capacity), n_quant)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)


def test_loop_chunk_follows_batch_and_fits_the_body():
    cfg = tiny_config(n_layers=1, n_heads=9, n_kv_heads=3, head_dim=64)
    plan = KVPlan((ch(4, 64),), (tok(2, 64),), residual=128, sink=4)
    chunks = {bsz: init_cache(cfg, plan, bsz, 8192).layers[0].chunk for bsz in (1, 8, 16)}
    assert chunks == {1: 2048, 8: 1024, 16: 512}
    small = init_cache(cfg, plan, 1, 300).layers[0]
    # never more than the body will hold packed: 300 - sink 4 - residual 128 = 168 -> 192 (unit 64)
    assert (small.chunk, small.body_capacity) == (192, 512)
    assert init_cache(cfg, plan, 1, 8192, chunk=100).layers[0].chunk == 128  # rounded to the unit
    with pytest.raises(KvqError, match="chunk must be a positive"):
        init_cache(cfg, plan, 1, 8192, chunk=0)


# ----------------------------------------------------------------------------- the entry point


@jax.jit
def attend_all(q, k, v, layers, lengths, n_new):
    outs, new = [], []
    for i, lay in enumerate(layers):
        o, lay = attention.attention(q[i], k[i], v[i], lay, lengths, n_new, "xla")
        outs.append(o)
        new.append(lay)
    return tuple(outs), tuple(new)


def test_attention_entry_prefill_and_decode_gqa():
    """Prefill (T=300 > the 256-query block) is causal fp attention; each decode step (GQA 3) equals
    attention over the reader's view of the cache before the step plus the new token itself at full
    precision (the entry point reads the old cache, then writes)."""
    pairs = [(ch(1.58), tok(3)), (tok(8), ch(2, 32))]
    keys, values = zip(*pairs)
    b, hkv, rep, d, t, steps = 2, 2, 3, 32, 300, 40
    n_prompt = np.array([300, 45])
    cache = build(keys, values, batch=b, d=d, capacity=t + steps)
    rng = np.random.default_rng(5)
    n_total = t + steps
    xk, xv = kv_streams(rng, 2, b, hkv, n_total, d)  # [L, B, Hkv, N, D]
    xq = rng.standard_normal((2, b, n_total, hkv * rep, d)).astype(np.float32) * 0.7
    as_bthd = lambda x: jnp.asarray(x.transpose(0, 1, 3, 2, 4))  # [L, B, N, H, D]
    kk, vv = as_bthd(xk), as_bthd(xv)

    outs, layers = attend_all(jnp.asarray(xq[:, :, :t]), kk[:, :, :t], vv[:, :, :t], cache.layers,
                              jnp.zeros(b, jnp.int32), jnp.asarray(n_prompt, jnp.int32))
    scale = 1 / np.sqrt(d)
    for i, out in enumerate(outs):
        out = np.asarray(out)
        for row, n in enumerate(n_prompt):
            for hq in range(hkv * rep):
                hh = hq // rep
                qs = xq[i, row, :n, hq].astype(np.float64) * scale
                s = qs @ xk[i, row, hh, :n].astype(np.float64).T
                s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
                p = np.exp(s - s.max(-1, keepdims=True))
                want = (p / p.sum(-1, keepdims=True)) @ xv[i, row, hh, :n]
                np.testing.assert_allclose(out[row, :n, hq], want, atol=1e-5, rtol=1e-5)

    n = n_prompt.copy()
    for _ in range(steps):
        before = jax.device_get(layers)
        idx = np.arange(b)
        q1 = jnp.asarray(xq[:, idx, n][:, :, None])  # [L, B, 1, Hq, D]
        k1 = kk[:, idx, n][:, :, None]
        v1 = vv[:, idx, n][:, :, None]
        outs, layers = attend_all(q1, k1, v1, layers, jnp.asarray(n, jnp.int32), jnp.ones(b, jnp.int32))
        for i, (lay, out) in enumerate(zip(before, outs)):
            out = np.asarray(out)[:, 0]  # [B, Hq, D]
            for row in range(b):
                k, v = reader_view(lay, row, int(n[row]))
                k = np.concatenate([k, xk[i, row, :, n[row]][:, None]], axis=1)
                v = np.concatenate([v, xv[i, row, :, n[row]][:, None]], axis=1)
                for hq in range(hkv * rep):
                    want = softmax_attend(xq[i, row, n[row], hq].astype(np.float64) * scale,
                                          k[hq // rep], v[hq // rep])
                    np.testing.assert_allclose(out[row, hq], want, atol=1e-5, rtol=1e-5)
        n = n + 1
    assert n.tolist() == [340, 85]


# ----------------------------------------------------------------------------- keys before RoPE


def test_prerope_layer_quantizes_keys_before_rope_and_reads_them_rotated():
    """A `prerope` layer stores its body keys rotated back by their position and quantized: the body
    is within half a quantization step of RoPE^-1(k), not of k. Its read (XLA loop and Pallas kernel)
    equals attention over [sink, RoPE(dequantized body) at positions S.., ring]."""
    cfg = tiny_config(n_layers=1, n_heads=2, n_kv_heads=2, head_dim=64)
    rope = cfg.rope(0)
    plan = KVPlan((ch(2, 32),), (tok(4),), residual=R, sink=S, rotate="prerope")
    lay = init_cache(cfg, plan, 3, 800, chunk=256).layers[0]
    assert lay.rope == rope and lay.rotate == "prerope"
    lengths = np.array([760, 45, 3])
    xk, xv = kv_streams(np.random.default_rng(2), 1, 3, 2, 760, 64)
    lay = jax.device_get(prefill_all((lay,), jnp.asarray(xk), jnp.asarray(xv), jnp.asarray(lengths, jnp.int32))[0])
    q = (np.random.default_rng(3).standard_normal((3, 2, 3, 64)) * 0.3).astype(np.float32)
    outs = {impl: np.asarray(jax.jit(lambda q, lay, n, impl=impl: attention.read_quantized(q, lay, n, impl)[0])(
        jnp.asarray(q), lay, jnp.asarray(lengths, jnp.int32))) for impl in ("xla", "pallas_interpret")}
    unrope = lambda x, pos: np.asarray(rotations.apply_rope(jnp.asarray(x), pos, rope, inverse=True), np.float64)
    for row, n in enumerate(lengths):
        m, qn = counts(lay, int(n))
        k, v = reader_view(lay, row, int(n))
        pos = S + np.arange(qn)
        body = k[:, S:S + qn]
        if qn:
            want = unrope(xk[0, row, :, S:S + qn], pos)
            step = np.ptp(want.reshape(2, qn // 32, 32, 64), axis=2) / 3  # [H, groups, D]
            err = np.abs(body - want).reshape(2, qn // 32, 32, 64).max(axis=2)
            assert (err <= 0.51 * step + 1e-4).all()
        if qn > 256:  # ...and far from the keys after RoPE (many positions: large angles)
            assert np.abs(body - xk[0, row, :, S:S + qn]).mean() > 2 * np.abs(body - want).mean()
        k[:, S:S + qn] = np.asarray(rotations.apply_rope(jnp.asarray(body, jnp.float32), pos, rope), np.float64)
        for impl, out in outs.items():
            for hh in range(2):
                want = softmax_attend(q[row, hh].astype(np.float64), k[hh], v[hh])
                np.testing.assert_allclose(out[row, hh], want, atol=1e-5, rtol=1e-5, err_msg=f"{impl} row {row}")


def test_codebook_layer_stores_nearest_levels_and_reads_them():
    """A layer whose specs carry codebooks (keys before RoPE, as the allocator makes them; values
    too) stores each body value within half the widest level gap (times the scale) of its input, and
    both readers (XLA loop, Pallas kernel) attend over levels[code] * scale + zero."""
    cfg = tiny_config(n_layers=1, n_heads=2, n_kv_heads=2, head_dim=64)
    rope = cfg.rope(0)
    kl, vl = (0.0, 1.25, 1.8, 3.0), (0.0, 0.6, 2.1, 3.4, 4.0, 5.2, 6.3, 7.0)
    plan = KVPlan((QuantSpec(2, "channel", 32, kl),), (QuantSpec(3, "token", 32, vl),), residual=R, sink=S,
                  rotate="prerope")
    lay = init_cache(cfg, plan, 2, 600, chunk=256).layers[0]
    lengths = np.array([560, 130])
    xk, xv = kv_streams(np.random.default_rng(4), 1, 2, 2, 560, 64)
    lay = jax.device_get(prefill_all((lay,), jnp.asarray(xk), jnp.asarray(xv), jnp.asarray(lengths, jnp.int32))[0])
    q = (np.random.default_rng(5).standard_normal((2, 2, 3, 64)) * 0.3).astype(np.float32)
    outs = {impl: np.asarray(jax.jit(lambda q, lay, n, impl=impl: attention.read_quantized(q, lay, n, impl)[0])(
        jnp.asarray(q), lay, jnp.asarray(lengths, jnp.int32))) for impl in ("xla", "pallas_interpret")}
    for row, n in enumerate(lengths):
        m, qn = counts(lay, int(n))
        k, v = reader_view(lay, row, int(n))
        pos = S + np.arange(qn)
        want = np.asarray(rotations.apply_rope(jnp.asarray(xk[0, row, :, S:S + qn]), pos, rope, inverse=True),
                          np.float64)
        half_gap = np.ptp(want.reshape(2, qn // 32, 32, 64), axis=2) / 3 * np.max(np.diff(kl)) / 2
        err = np.abs(k[:, S:S + qn] - want).reshape(2, qn // 32, 32, 64).max(axis=2)
        assert qn and (err <= 1.03 * half_gap + 1e-4).all()  # 3%: the bf16 scale and zero
        wv = xv[0, row, :, S:S + qn].astype(np.float64)
        vgap = np.ptp(wv.reshape(2, qn, 2, 32), axis=3) / 7 * np.max(np.diff(vl)) / 2
        assert (np.abs(v[:, S:S + qn] - wv).reshape(2, qn, 2, 32).max(axis=3) <= 1.03 * vgap + 1e-4).all()
        k[:, S:S + qn] = np.asarray(rotations.apply_rope(jnp.asarray(k[:, S:S + qn], jnp.float32), pos, rope),
                                    np.float64)
        for impl, out in outs.items():
            for hh in range(2):
                want_o = softmax_attend(q[row, hh].astype(np.float64), k[hh], v[hh])
                np.testing.assert_allclose(out[row, hh], want_o, atol=1e-5, rtol=1e-5, err_msg=f"{impl} row {row}")


# ----------------------------------------------------------------------------- hadamard


@pytest.mark.parametrize("d", [1, 2, 16, 32, 64, 128])
def test_hadamard_is_orthonormal(d):
    h = rotations.hadamard(d).astype(np.float64)
    assert h.shape == (d, d)
    np.testing.assert_allclose(h @ h.T, np.eye(d), atol=1e-6)
    np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(d), rtol=1e-6)
    rng = np.random.default_rng(d)
    q, k = rng.standard_normal((2, 5, d))
    np.testing.assert_allclose((q @ h) @ (k @ h).T, q @ k.T, atol=1e-9 * d + 1e-6)


def test_hadamard_needs_power_of_two():
    with pytest.raises(KvqError, match="power-of-two"):
        rotations.hadamard(48)


# ----------------------------------------------------------------------------- the tiny model

MODEL_CFG = tiny_config(head_dim=32)  # 2 layers, 4 query heads, 2 KV heads (GQA 2), head_dim 32
PROMPT, DECODE = 50, 70
CAP = 128


def kivi(k_bits, v_bits, **kw):
    return KVPlan.uniform(MODEL_CFG.n_layers, k_bits, v_bits, group_k=16, group_v=32, residual=R, sink=S, **kw)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _run(graphdef, state, prompt, rest, cache):
    """Prefill `prompt`, then decode `rest` one token per step; logits of every step `[1 + N, B, V]`."""
    model = nnx.merge(graphdef, state)
    logits, cache = model(prompt, cache, attention_impl="xla", last_only=True)

    def step(cache, tok):
        lg, cache = model(tok[:, None], cache, attention_impl="xla", last_only=True)
        return cache, lg

    cache, more = jax.lax.scan(step, cache, rest.T)
    return jnp.concatenate([logits[None], more]), cache


@pytest.fixture(scope="module")
def model_runs():
    """name → (logits, cache) of the same teacher-forced stream, computed once per plan."""
    model = Transformer(MODEL_CFG, rngs=nnx.Rngs(3))
    graphdef, state = nnx.split(model)
    toks = jnp.asarray(np.random.default_rng(4).integers(3, MODEL_CFG.vocab_size, (2, PROMPT + DECODE)), jnp.int32)
    done = {}

    def get(name, kv):
        if name not in done:
            cache = init_cache(MODEL_CFG, kv, 2, CAP)
            logits, cache = _run(graphdef, state, toks[:, :PROMPT], toks[:, PROMPT:], cache)
            done[name] = (np.asarray(logits), jax.device_get(cache))
        return done[name]

    return get


def test_16bit_plan_reproduces_dense_cache_exactly(model_runs):
    fp_logits, fp_cache = model_runs("fp", DenseKV("float32"))
    logits, cache = model_runs("K16V16", KVPlan.uniform(MODEL_CFG.n_layers, 16, 16, sink=S))
    assert all(isinstance(lay, DenseLayer) for lay in cache.layers)
    np.testing.assert_array_equal(logits, fp_logits)
    for a, b in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(fp_cache)):
        np.testing.assert_array_equal(a, b)


def test_mixed_16bit_plan_stores_its_16bit_side_dense(model_runs):
    fp_logits, fp_cache = model_runs("fp", DenseKV("float32"))
    plan = KVPlan((QuantSpec(16), ch(4)), (ch(4), QuantSpec(16)), residual=R, sink=S)  # K16V4, then K4V16
    logits, cache = model_runs("K16V4/K4V16", plan)
    assert np.isfinite(logits).all()
    assert 0 < np.abs(logits - fp_logits).max() < 0.2
    n = PROMPT + DECODE
    lay0, lay1 = cache.layers
    assert isinstance(lay0, QuantLayer) and isinstance(lay1, QuantLayer)
    assert lay0.k.spec.dense and not lay0.v.spec.dense and lay1.v.spec.dense and not lay1.k.spec.dense
    m, q = counts(lay0, n)
    assert q > PROMPT  # part of the packed body was written by decode steps
    tol = dict(atol=1e-6, rtol=1e-6)
    # Layer 0's keys depend only on the tokens: the dense side holds exactly the fp cache's keys.
    fk = np.asarray(fp_cache.layers[0].k)[:, :, :n]
    assert lay0.k.words.dtype == np.float32 and lay0.k.scale.size == 0
    np.testing.assert_allclose(np.asarray(lay0.k.words)[:, :, :q], fk[:, :, S: S + q], **tol)
    np.testing.assert_allclose(np.asarray(lay0.sink_k), fk[:, :, :S], **tol)
    np.testing.assert_allclose(np.asarray(lay0.recent_k)[:, :, np.arange(q, m) % R], fk[:, :, S + np.arange(q, m)], **tol)
    # Layer 1's values of prompt positions come from the (full precision) prefill in both runs; its
    # input went through layer 0's segment-merged attention, which sums in another order (~1e-6).
    fv = np.asarray(fp_cache.layers[1].v)
    tol = dict(atol=1e-5, rtol=1e-5)
    assert lay1.v.words.dtype == np.float32 and lay1.v.scale.size == 0
    np.testing.assert_allclose(np.asarray(lay1.v.words)[:, :, : PROMPT - S], fv[:, :, S:PROMPT], **tol)
    np.testing.assert_allclose(np.asarray(lay1.sink_v), fv[:, :, :S], **tol)


def test_logit_error_shrinks_with_bits(model_runs):
    fp_logits, _ = model_runs("fp", DenseKV("float32"))
    err = {}
    for bits in (8, 2):
        logits, cache = model_runs(f"K{bits}V{bits}", kivi(bits, bits))
        assert all(isinstance(lay, QuantLayer) for lay in cache.layers)
        err[bits] = np.abs(logits - fp_logits).max()
    scale = np.abs(fp_logits).max()
    assert err[8] < 0.02 * scale, err
    assert err[2] > 5 * err[8], err
    assert err[2] < 2 * scale, err  # degraded, not broken


@pytest.mark.parametrize("rotate", ["hadamard", "none/hadamard", "hadamard/none", "prerope/hadamard"])
def test_rotations_keep_the_fp_path(model_runs, rotate):
    """Keys and values rotated each their own way, at 16 bits: the fp model's logits, and the sink
    holds k @ H and v @ H where the plan says so (the query and the output are rotated to match)."""
    fp_logits, fp_cache = model_runs("fp", DenseKV("float32"))
    # residual 64: an all-16-bit layer still has block 64 (see test_cache.py)
    plan = KVPlan.uniform(MODEL_CFG.n_layers, 16, 16, residual=64, sink=S, rotate=rotate)
    logits, cache = model_runs(f"K16V16-{rotate}", plan)
    assert all(isinstance(lay, QuantLayer) and lay.rotate == rotate for lay in cache.layers)
    np.testing.assert_allclose(logits, fp_logits, atol=1e-4, rtol=0)
    # Layer 0's keys and values match the fp run's: each side is stored rotated exactly when its
    # rotation is Hadamard, and really changed by it.
    hm = rotations.hadamard(MODEL_CFG.head_dim)
    lay = cache.layers[0]
    for stored, fp, side in ((lay.sink_k, fp_cache.layers[0].k, plan.key_rotation(0)),
                             (lay.sink_v, fp_cache.layers[0].v, plan.value_rotation(0))):
        fp = np.asarray(fp)[:, :, :S]
        np.testing.assert_allclose(np.asarray(stored), fp @ hm if side == "hadamard" else fp, atol=1e-5)
        assert side != "hadamard" or np.abs(np.asarray(stored) - fp).max() > 0.1
