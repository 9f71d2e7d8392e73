"""The quantized KV cache (kvq_jax.cache) against its layout contract (docs/architecture.md).

Every state the cache reaches is checked against an independent reference built from the raw K/V
stream: the sink holds positions [0, S) as is, body blocks [kG, (k+1)G) are quantized exactly once
(quant.quantize on that block alone) and packed with a numpy packer, and the recent ring holds the last
m - Q body tokens, token j in slot j % R. Prefill-then-append, append-only, ragged batches and single
rows must all reach that same state.

Many per-layer specs share one compiled function: a cache is built from a per-layer plan (one layer per
spec pair) and every layer is prefilled/appended inside one `jax.jit`.
"""

from __future__ import annotations

import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvq_jax import attention, packing, quant
from kvq_jax import cache as kvcache
from kvq_jax.cache import DenseLayer, QuantLayer, init_cache, quantized_count
from kvq_jax.config import tiny_config
from kvq_jax.errors import KvqError
from kvq_jax.plan import DenseKV, KVPlan, QuantSpec

S, R = 4, 32  # sink and residual window of every test cache here


def ch(bits, group=16):
    return QuantSpec(bits, "channel", group)


def tok(bits, group=32):
    return QuantSpec(bits, "token", group)


def build(keys, values, *, batch, d, capacity, hkv=2, sink=S, residual=R, scale_dtype="bfloat16"):
    """A cache with one layer per (key spec, value spec) pair."""
    cfg = tiny_config(n_layers=len(keys), n_heads=hkv, n_kv_heads=hkv, head_dim=d)
    plan = KVPlan(tuple(keys), tuple(values), residual=residual, sink=sink, scale_dtype=scale_dtype)
    return init_cache(cfg, plan, batch, capacity)


@jax.jit
def prefill_all(layers, k, v, n_new):
    """k, v `[L, B, H, T, D]`: layer i gets its own stream."""
    return tuple(kvcache.write(lay, k[i], v[i], jnp.zeros_like(n_new), n_new) for i, lay in enumerate(layers))


@jax.jit
def append_all(layers, k, v, lengths):
    """k, v `[L, B, H, 1, D]`."""
    return tuple(kvcache.write(lay, k[i], v[i], lengths, jnp.ones_like(lengths)) for i, lay in enumerate(layers))


@jax.jit
def read_all(q, layers, lengths):
    return tuple(attention.read_quantized(q, lay, lengths, "xla")[0] for lay in layers)


def streams(rng, n_layers, batch, hkv, n, d):
    """Random K/V streams `[L, B, H, N, D]` with per-channel scales and offsets (outlier channels)."""

    def one():
        scale = np.exp(rng.normal(0.0, 0.8, (n_layers, 1, hkv, 1, d)))
        shift = rng.normal(0.0, 1.0, (n_layers, 1, hkv, 1, d))
        return (rng.standard_normal((n_layers, batch, hkv, n, d)) * scale + shift).astype(np.float32)

    return one(), one()


def token_at(x, lengths):
    """Per row b the stream token at position lengths[b]: `[L, B, H, 1, D]`."""
    return jnp.asarray(np.stack([x[:, i, :, n] for i, n in enumerate(lengths)], axis=1)[:, :, :, None, :])


def eq(actual, desired, err_msg=""):
    """assert_array_equal, with a fast path (the checks below run thousands of times)."""
    if not np.array_equal(actual, desired):
        np.testing.assert_array_equal(actual, desired, err_msg=err_msg)


def counts(layer, n):
    """(m, Q) of the contract for a row holding n positions."""
    m = max(0, n - layer.sink)
    g = layer.block
    return m, g * -(-max(0, m - layer.residual) // g)


# ----------------------------------------------------------------------------- reference


def np_pack(codes: np.ndarray, bits, n_words: int) -> np.ndarray:
    """Independent packer: codes `[H, T, D]` → uint32 `[H, n_words, D]`, token t = digit t % P of word t // P."""
    p, base = packing.digits_per_word(bits), packing.code_base(bits)
    h, t, d = codes.shape
    padded = np.zeros((h, n_words * p, d), np.uint64)
    padded[:, :t] = codes
    weights = np.array([base**i for i in range(p)], np.uint64)[None, None, :, None]
    words = (padded.reshape(h, n_words, p, d) * weights).sum(axis=2)
    assert words.max(initial=0) < 2**32
    return words.astype(np.uint32)


@functools.partial(jax.jit, static_argnames=("bits", "axis", "group", "scale_dtype"))
def _quantize(x, *, bits, axis, group, scale_dtype):
    return quant.quantize(x, bits, axis, group, scale_dtype=scale_dtype)


class RowRef:
    """Expected packed body of one row of one layer: every body block quantized once, on its own."""

    def __init__(self, layer: QuantLayer, xk: np.ndarray, xv: np.ndarray, scale_dtype):
        self.xk, self.xv = xk, xv  # [H, N, D]
        self.k = self._blocks(layer.k.spec, layer.block, xk[:, layer.sink:], scale_dtype)
        self.v = self._blocks(layer.v.spec, layer.block, xv[:, layer.sink:], scale_dtype)

    @staticmethod
    def _blocks(spec, g, body, scale_dtype):
        if spec.dense:
            return None
        h, n, d = body.shape
        nblk = n // g
        blocks = body[:, : nblk * g].reshape(h, nblk, g, d)  # leading dims: each block on its own
        codes, s, z = _quantize(jnp.asarray(blocks), bits=spec.bits, axis=spec.axis, group=spec.group,
                                scale_dtype=jnp.dtype(scale_dtype).name)
        codes = np.asarray(codes).reshape(h, nblk * g, d)
        per = g // spec.group if spec.axis == "channel" else g  # scale rows per block
        s = np.asarray(s.astype(jnp.float32)).reshape(h, nblk * per, -1)
        z = np.asarray(z.astype(jnp.float32)).reshape(h, nblk * per, -1)
        return codes, s, z


def visible(t, b: int, q: int) -> list[np.ndarray]:
    """What the contract fixes in row b of a host PackedTensor holding q body tokens: all the words
    (digits past Q must stay zero, flushes add into them), the scale/zero rows of the first q tokens;
    for a 16-bit spec the first q tokens."""
    spec = t.spec
    if spec.dense:
        return [np.asarray(t.words[b])[:, :q]]
    nq = q // spec.group if spec.axis == "channel" else q
    return [np.asarray(t.words[b]), np.asarray(t.scale[b], np.float32)[:, :nq],
            np.asarray(t.zero[b], np.float32)[:, :nq]]


def check_packed(t, b: int, q: int, body: np.ndarray, ref) -> None:
    """Row b of a host PackedTensor holds exactly the first q body tokens, quantized block by block."""
    spec = t.spec
    got = visible(t, b, q)
    if spec.dense:
        eq(got[0], body[:, :q])
        assert t.scale.size == 0 and t.zero.size == 0
        return
    codes, s, z = ref
    assert q <= codes.shape[1], "reference stream too short"
    nq = q // spec.group if spec.axis == "channel" else q
    eq(got[0], np_pack(codes[:, :q], spec.bits, got[0].shape[1]), err_msg=f"{spec}: packed words at Q={q}")
    eq(got[1], s[:, :nq], err_msg=f"{spec}: scale at Q={q}")
    eq(got[2], z[:, :nq], err_msg=f"{spec}: zero at Q={q}")


def check_row(lay, b: int, n: int, ref: RowRef) -> None:
    """Row b of a host layer holding n positions equals the reference state."""
    m, q = counts(lay, n)
    s, r, g = lay.sink, lay.residual, lay.block
    # The recent window never exceeds R, and a block is flushed only once the ring is full.
    assert 0 <= m - q <= r
    assert q == 0 or m - q > r - g
    j = np.arange(q, m)
    for x, sink, ring, t, blocks in ((ref.xk, lay.sink_k, lay.recent_k, lay.k, ref.k),
                                     (ref.xv, lay.sink_v, lay.recent_v, lay.v, ref.v)):
        eq(np.asarray(sink[b])[:, : min(n, s)], x[:, : min(n, s)])
        eq(np.asarray(ring[b])[:, j % r], x[:, s + j], err_msg=f"ring at n={n} (m={m}, Q={q})")
        check_packed(t, b, q, x[:, s:], blocks)


def check_all(layers, lengths, refs) -> None:
    """refs[i][b]: RowRef of layer i, row b. Also checks `quantized_count` against the contract."""
    host = jax.device_get(layers)
    for i, lay in enumerate(host):
        want_q = [counts(lay, int(n))[1] for n in lengths]
        got_q = np.asarray(quantized_count(layers[i], jnp.asarray(lengths, jnp.int32)))
        assert got_q.tolist() == want_q
        for b, n in enumerate(lengths):
            check_row(lay, b, int(n), refs[i][b])


def row_packed(lay, b, n):
    """The contract-visible packed state of row b of a host layer holding n positions."""
    q = counts(lay, n)[1]
    return visible(lay.k, b, q) + visible(lay.v, b, q)


def assert_rows_equal(lay_a, a, lay_b, b, n):
    """Rows a and b of two host layers hold the same visible state for n positions."""
    m, q = counts(lay_a, n)
    s, r = lay_a.sink, lay_a.residual
    slots = np.arange(q, m) % r
    for name in ("sink_k", "sink_v"):
        eq(np.asarray(getattr(lay_a, name)[a])[:, : min(n, s)], np.asarray(getattr(lay_b, name)[b])[:, : min(n, s)])
    for name in ("recent_k", "recent_v"):
        eq(np.asarray(getattr(lay_a, name)[a])[:, slots], np.asarray(getattr(lay_b, name)[b])[:, slots])
    for x, y in zip(row_packed(lay_a, a, n), row_packed(lay_b, b, n)):
        eq(x, y)


# ----------------------------------------------------------------------------- quantized_count


@settings(max_examples=60, deadline=None)
@given(sink=st.integers(0, 8), g=st.sampled_from([16, 32, 64]), mult=st.integers(1, 4),
       n=st.lists(st.integers(0, 600), min_size=1, max_size=8))
def test_quantized_count_formula(sink, g, mult, n):
    layer = types.SimpleNamespace(sink=sink, residual=g * mult, block=g)
    got = np.asarray(quantized_count(layer, jnp.asarray(n, jnp.int32))).tolist()
    want = []
    for x in n:
        m = max(0, x - sink)
        want.append(g * math.ceil(max(0, m - g * mult) / g))
    assert got == want


# ----------------------------------------------------------------------------- incremental decoding

# One layer per pair. Digits per word P vs block G: 1-bit P=32 > G (two blocks share a word), 1.58-bit
# P=20 and 3-bit P=10 (blocks start mid-word), 2/4/8-bit P | G. Channel groups 16 and 32: G = 16, or
# G = R = 32 (the ring is one block), with a 16-group channel spec inside a 32-token block. A 16-bit
# K (the dense body path; a 16-bit V is covered in test_attention.py).
_PAIRS_32 = [(ch(1), tok(1.58)), (tok(3), ch(2)), (ch(4, 32), ch(8)), (QuantSpec(16), ch(3, 32))]


def test_incremental_decoding_matches_blockwise_reference():
    """append-only and prefill-then-append reach the reference state at every step, and each other."""
    keys, values = zip(*_PAIRS_32)
    b, h, d, n_total = 2, 2, 32, 140
    prefill_len = np.array([37, 70])  # one token past S+R; S+R+2G+2 (two blocks already packed)
    cache = build(keys, values, batch=b, d=d, capacity=160, hkv=h)
    xk, xv = streams(np.random.default_rng(7), len(keys), b, h, n_total, d)
    refs = [[RowRef(lay, xk[i, r], xv[i, r], "bfloat16") for r in range(b)] for i, lay in enumerate(cache.layers)]

    # Append only, from an empty cache.
    seen = {}
    layers, n = cache.layers, np.zeros(b, np.int64)
    for _ in range(n_total):
        layers = append_all(layers, token_at(xk, n), token_at(xv, n), jnp.asarray(n, jnp.int32))
        n = n + 1
        check_all(layers, n, refs)
        host = jax.device_get(layers)
        for r in range(b):
            seen[r, int(n[r])] = [row_packed(lay, r, int(n[r])) for lay in host]

    # Prefill then append: the same blocks, bit for bit.
    t = int(prefill_len.max())
    layers = prefill_all(cache.layers, jnp.asarray(xk[..., :t, :]), jnp.asarray(xv[..., :t, :]),
                         jnp.asarray(prefill_len, jnp.int32))
    n = prefill_len.copy()
    check_all(layers, n, refs)
    while n.max() < n_total:
        layers = append_all(layers, token_at(xk, n), token_at(xv, n), jnp.asarray(n, jnp.int32))
        n = n + 1
        check_all(layers, n, refs)
        host = jax.device_get(layers)
        for r in range(b):
            for got, want in zip((row_packed(lay, r, int(n[r])) for lay in host), seen[r, int(n[r])]):
                for x, y in zip(got, want):
                    eq(x, y)


# ----------------------------------------------------------------------------- flush boundaries

# G = 16 (layer 0) and G = R = 32 (layer 1): the ring is two blocks, or exactly one. head_dim 64 with
# token groups 64 and fp32 scales (the incremental test above covers head_dim 32 and bf16 scales).
_BOUNDARY_KEYS = (ch(2, 16), tok(1.58, 64))
_BOUNDARY_VALUES = (tok(4, 64), ch(3, 32))
BOUNDARY_D = 64
BOUNDARY_T = 72  # padded prompt length shared by the batched prefills here (one compile)


def _boundary_cache(batch, capacity=128, **kw):
    return build(_BOUNDARY_KEYS, _BOUNDARY_VALUES, batch=batch, d=BOUNDARY_D, capacity=capacity,
                 scale_dtype="float32", **kw)


# Prefill lengths straddling S+R = 36, S+R+16 = 52, S+R+32 = 68, multiples of 16 and the sink.
_PREFILLS = [1, 3, 4, 5, 35, 36, 37, 51, 52, 53, 63, 64, 65, 68, 69]


@pytest.mark.parametrize("start", range(0, len(_PREFILLS), 3), ids=lambda i: f"prefill{_PREFILLS[i:i + 3]}")
def test_flush_boundaries(start):
    """From prefills around every boundary, append to 100: the state matches the contract at every length."""
    plens = np.array(_PREFILLS[start: start + 3])
    b, end = len(plens), 100
    cache = _boundary_cache(b)
    xk, xv = streams(np.random.default_rng(start), 2, b, 2, end + int(plens.max() - plens.min()), BOUNDARY_D)
    refs = [[RowRef(lay, xk[i, r], xv[i, r], "float32") for r in range(b)] for i, lay in enumerate(cache.layers)]
    layers = prefill_all(cache.layers, jnp.asarray(xk[..., :BOUNDARY_T, :]), jnp.asarray(xv[..., :BOUNDARY_T, :]),
                         jnp.asarray(plens, jnp.int32))
    n = plens.copy()
    check_all(layers, n, refs)
    flushes = 0
    while n.min() < end:
        layers = append_all(layers, token_at(xk, n), token_at(xv, n), jnp.asarray(n, jnp.int32))
        n = n + 1
        check_all(layers, n, refs)
        # A step packs at most one block, and only when the ring was full before it.
        for lay in cache.layers:
            for x in n.tolist():
                (m0, q0), (_, q1) = counts(lay, x - 1), counts(lay, x)
                assert q1 - q0 in (0, lay.block)
                assert (q1 != q0) == (x - 1 >= lay.sink and m0 - q0 == lay.residual)
                flushes += q1 != q0
    assert flushes >= 10


def test_flush_lengths_exact():
    """The first flushes happen on the token after S+R, then every G tokens."""
    lay = _boundary_cache(1).layers[0]  # G = 16
    q = [counts(lay, n)[1] for n in range(0, 90)]
    assert q[: S + R + 1] == [0] * (S + R + 1)  # up to S+R: ring not yet overfull
    assert q[S + R + 1] == 16 and q[S + R + 16] == 16 and q[S + R + 17] == 32
    np.testing.assert_array_equal(np.asarray(quantized_count(lay, jnp.arange(90))), q)


# ----------------------------------------------------------------------------- ragged batches


def test_ragged_batch_rows_equal_single_rows():
    """Rows of different prompt lengths (inside the sink, at a flush boundary, past one) decode token by
    token; each row's cache state and attention equal that row run alone."""
    plens = np.array([2, S + R + 16, 37])  # 52: ring full, the next token flushes
    b, steps = len(plens), 40
    cache = _boundary_cache(b)
    end = int(plens.max()) + steps
    xk, xv = streams(np.random.default_rng(11), 2, b, 2, end, BOUNDARY_D)
    q_all = np.random.default_rng(12).standard_normal((steps + 1, b, 2, 2, BOUNDARY_D)).astype(np.float32) / 8

    def run(rows, t):
        c = _boundary_cache(len(rows))
        kx, vx = xk[:, rows], xv[:, rows]
        ls = prefill_all(c.layers, jnp.asarray(kx[..., :t, :]), jnp.asarray(vx[..., :t, :]),
                         jnp.asarray(plens[rows], jnp.int32))
        n = plens[rows].copy()
        states, outs = [], []
        for step in range(steps + 1):
            if step:
                ls = append_all(ls, token_at(kx, n), token_at(vx, n), jnp.asarray(n, jnp.int32))
                n = n + 1
            states.append((jax.device_get(ls), n.copy()))
            outs.append([np.asarray(o) for o in read_all(jnp.asarray(q_all[step][rows]), ls, jnp.asarray(n, jnp.int32))])
        return states, outs

    batch_states, batch_outs = run(np.arange(b), BOUNDARY_T)
    refs = [[RowRef(lay, xk[i, r], xv[i, r], "float32") for r in range(b)] for i, lay in enumerate(cache.layers)]
    for r in range(b):
        one_states, one_outs = run(np.array([r]), int(plens[r]))  # its own prompt length, no padding
        for (bl, bn), (ol, on), bo, oo in zip(batch_states, one_states, batch_outs, one_outs):
            assert int(bn[r]) == int(on[0])
            for lay_b, lay_o, ref in zip(bl, ol, [refs[i][r] for i in range(2)]):
                assert_rows_equal(lay_b, r, lay_o, 0, int(bn[r]))
                check_row(lay_o, 0, int(on[0]), ref)
            for x, y in zip(bo, oo):
                np.testing.assert_allclose(x[r], y[0], atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- 16-bit specs


def test_sixteen_bit_layers_are_dense():
    cfg = tiny_config(head_dim=32)
    plan16 = KVPlan.uniform(cfg.n_layers, 16, 16, sink=S)
    c16 = init_cache(cfg, plan16, 2, 50)
    cfp = init_cache(cfg, DenseKV("float32"), 2, 50)
    assert all(isinstance(lay, DenseLayer) for lay in c16.layers)
    assert jax.tree_util.tree_structure(c16) == jax.tree_util.tree_structure(cfp)
    assert [x.shape for x in jax.tree_util.tree_leaves(c16)] == [x.shape for x in jax.tree_util.tree_leaves(cfp)]
    mixed = KVPlan((QuantSpec(16), ch(4)), (ch(4), QuantSpec(16)), residual=R, sink=S)
    cm = init_cache(cfg, mixed, 2, 50)
    for lay, dense_side in zip(cm.layers, ("k", "v")):
        assert isinstance(lay, QuantLayer)
        t = getattr(lay, dense_side)
        assert t.spec.dense and t.words.dtype == jnp.float32 and t.words.shape == (2, 2, lay.body_capacity, 32)
        assert t.scale.size == 0 and t.zero.size == 0
        other = lay.v if dense_side == "k" else lay.k
        assert other.words.dtype == jnp.uint32


# ----------------------------------------------------------------------------- bad specs and plans


def _err(fn) -> str:
    with pytest.raises(KvqError) as e:
        fn()
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def test_bad_plans_rejected_with_one_line_errors():
    cfg = tiny_config(head_dim=32)  # 2 layers, name "tiny-llama"
    ok = KVPlan.uniform(2, 4, 2, group_k=16, group_v=32, residual=32, sink=4)
    init_cache(cfg, ok, 1, 64)  # the baseline is fine

    assert "3 layers" in _err(lambda: init_cache(cfg, KVPlan.uniform(3, 4, 2, group_k=16, group_v=32,
                                                                        residual=32), 1, 64))
    msg = _err(lambda: init_cache(tiny_config(head_dim=16), ok, 1, 64))  # token group 32 on head_dim 16
    assert "head_dim 16" in msg and "group 32" in msg
    msg = _err(lambda: init_cache(cfg, ok.replace(residual=40), 1, 64))
    assert "residual 40" in msg and "multiple" in msg and "16" in msg
    msg = _err(lambda: init_cache(cfg, ok.replace(residual=0), 1, 64))
    assert "residual 0" in msg
    msg = _err(lambda: init_cache(cfg, KVPlan.uniform(2, 4, 2, group_k=64, group_v=32, residual=32), 1, 64))
    assert "residual 32" in msg and "64" in msg
    msg = _err(lambda: init_cache(cfg, ok.replace(model="SmolLM2-135M"), 1, 64))
    assert "SmolLM2-135M" in msg and "tiny-llama" in msg
    msg = _err(lambda: init_cache(cfg, ok.replace(model_layers=30), 1, 64))
    assert "30-layer" in msg
    init_cache(cfg, ok.replace(model="tiny-llama", model_layers=2), 1, 64)  # the right model is fine
    msg = _err(lambda: init_cache(tiny_config(head_dim=48), KVPlan.uniform(
        2, 4, 4, key_axis="channel", value_axis="channel", group_k=16, group_v=16, residual=32,
        rotate="hadamard"), 1, 64))
    assert "power-of-two" in msg and "48" in msg
    for kv in (ok, DenseKV()):
        assert "capacity" in _err(lambda: init_cache(cfg, kv, 1, 0))
        assert "batch" in _err(lambda: init_cache(cfg, kv, 0, 64))
    assert "bits must be one of" in _err(lambda: QuantSpec(7))
    assert "group" in _err(lambda: QuantSpec(4, "token", 16))


# ----------------------------------------------------------------------------- bytes


def test_nbytes_is_leaf_sum_and_k4v2_is_small(capsys):
    cfg = tiny_config(head_dim=64)
    cap = 32768
    plan = KVPlan.uniform(cfg.n_layers, 4, 2)  # KIVI defaults: K per-channel, V per-token, group 64
    c = init_cache(cfg, plan, 1, cap)
    # Every array the cache holds, enumerated by hand.
    arrays = [c.lengths]
    for lay in c.layers:
        arrays += [lay.sink_k, lay.sink_v, lay.recent_k, lay.recent_v]
        for t in (lay.k, lay.v):
            arrays += [t.words, t.scale, t.zero]
    assert c.nbytes() == sum(a.nbytes for a in arrays) == sum(x.nbytes for x in jax.tree_util.tree_leaves(c))
    bf16 = init_cache(cfg, DenseKV("bfloat16"), 1, cap)
    dense_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cap * cfg.head_dim * 2
    assert bf16.nbytes() == dense_bytes + bf16.lengths.nbytes
    ratio = c.nbytes() / dense_bytes
    # 4 + 2 data bits, 0.5 + 0.5 scale/zero bits per value → 3.5 / 16 ≈ 0.22, plus sink and window.
    expect = plan.mean_storage_bits() / 16
    assert expect == pytest.approx(3.5 / 16)
    assert expect <= ratio < expect + 0.01, ratio
    assert ratio < 0.25
    # A 16-bit plan costs what the fp32 dense cache costs.
    c16 = init_cache(cfg, KVPlan.uniform(cfg.n_layers, 16, 16), 1, 256)
    assert c16.nbytes() == init_cache(cfg, DenseKV("float32"), 1, 256).nbytes()
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


# ----------------------------------------------------------------------------- regressions


def test_plan_without_sink_decodes():
    cache = build((ch(2),), (tok(4),), batch=2, d=32, capacity=96, sink=0)
    xk, xv = streams(np.random.default_rng(3), 1, 2, 2, 90, 32)
    refs = [[RowRef(cache.layers[0], xk[0, r], xv[0, r], "bfloat16") for r in range(2)]]
    layers, n = cache.layers, np.array([0, 20])
    layers = prefill_all(layers, jnp.asarray(xk[..., :20, :]), jnp.asarray(xv[..., :20, :]),
                         jnp.asarray(n, jnp.int32))
    for _ in range(70):
        layers = append_all(layers, token_at(xk, n), token_at(xv, n), jnp.asarray(n, jnp.int32))
        n = n + 1
        check_all(layers, n, refs)


def test_all_dense_hadamard_plan_without_window():
    cfg = tiny_config(n_layers=1, n_heads=2, n_kv_heads=2, head_dim=32)
    try:
        cache = init_cache(cfg, KVPlan.uniform(1, 16, 16, residual=0, rotate="hadamard"), 1, 96)
    except KvqError as e:  # rejecting the plan up front is a fix too
        assert "\n" not in str(e)
        return
    x = np.random.default_rng(0).standard_normal((2, 1, 1, 2, 90, 32)).astype(np.float32)
    layers = prefill_all(cache.layers, jnp.asarray(x[0, :, :, :, :10]), jnp.asarray(x[1, :, :, :, :10]),
                         jnp.asarray([10], jnp.int32))
    n = np.array([10])
    for _ in range(80):
        layers = append_all(layers, token_at(x[0], n), token_at(x[1], n), jnp.asarray(n, jnp.int32))
        n = n + 1
    q = np.random.default_rng(1).standard_normal((1, 2, 1, 32)).astype(np.float32) / 6
    out = np.asarray(read_all(jnp.asarray(q), layers, jnp.asarray(n, jnp.int32))[0])
    for h in range(2):
        s = x[0, 0, 0, h] @ q[0, h, 0]
        p = np.exp(s - s.max())
        np.testing.assert_allclose(out[0, h, 0], (p / p.sum()) @ x[1, 0, 0, h], atol=1e-5)


def test_all_dense_layer_does_not_constrain_residual():
    cfg = tiny_config(head_dim=32)
    plan = KVPlan((QuantSpec(16), ch(4, 32)), (QuantSpec(16), tok(2)), residual=32, sink=S)
    cache = init_cache(cfg, plan, 1, 64)
    assert isinstance(cache.layers[0], DenseLayer) and isinstance(cache.layers[1], QuantLayer)


@pytest.mark.parametrize("kv", ["fp", "bf16", "K4V2", "K1.58V3"])
def test_cache_bytes_plans_what_init_cache_allocates(kv):
    from kvq_jax.plan import parse_kv

    for cfg in (tiny_config(), tiny_config("gemma3", n_layers=3, n_kv_heads=1, sliding_window=64, local_layers=(0, 1))):
        plan = parse_kv(kv, cfg.n_layers, residual=64)
        for batch, capacity in ((1, 100), (3, 1000)):
            assert kvcache.cache_bytes(cfg, plan, batch, capacity) == init_cache(cfg, plan, batch, capacity).nbytes()
    with pytest.raises(KvqError, match="capacity >= 1"):
        kvcache.cache_bytes(tiny_config(), DenseKV(), 1, 0)
