"""Sliding-window (local) layers: Gemma 3's block on a tiny random model, and the local rings."""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvq_jax import attention
from kvq_jax import cache as kvcache
from kvq_jax.cache import DenseLayer, QuantLayer, init_cache
from kvq_jax.config import tiny_config
from kvq_jax.model import Transformer
from kvq_jax.plan import DenseKV, KVPlan, QuantSpec

W = 16
CFG = tiny_config("gemma3", n_layers=3, sliding_window=W, local_layers=(0, 1), head_dim=32, n_heads=4,
                  n_kv_heads=1, max_seq_len=256)
T = 60  # well past the window


@pytest.fixture(scope="module")
def gemma() -> Transformer:
    return Transformer(CFG, rngs=nnx.Rngs(1))


def _reference(m: Transformer, toks: jax.Array) -> jax.Array:
    """No cache: the Gemma 3 block written out with an explicit causal + sliding-window mask."""
    b, t = toks.shape
    c = m.cfg
    x = jnp.take(m.embed.get_value(), toks, axis=0) * jnp.sqrt(float(c.dim))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    qi, ki = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    for i, blk in enumerate(m.layers):
        q, k, v = blk.attn.qkv(blk.attn_norm(x), pos)
        rep = c.n_heads // c.n_kv_heads
        s = jnp.einsum("bthd,bshd->bhts", q, jnp.repeat(k, rep, 2)) * c.scale
        mask = (ki <= qi) & ((qi - ki < c.window(i)) if c.window(i) else True)
        p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), -1)
        o = jnp.einsum("bhts,bshd->bthd", p, jnp.repeat(v, rep, 2)).reshape(b, t, -1)
        x = x + blk.post_attn_norm(blk.attn.wo(o))
        x = x + blk.post_mlp_norm(blk.mlp(blk.mlp_norm(x)))
    return m.logits(m.final_norm(x))


def _feed(m: Transformer, cache, toks: np.ndarray, chunks: list[np.ndarray]) -> tuple[np.ndarray, object]:
    """Feeds `toks [B, T]` in calls of `chunks[i][b]` tokens per row (ragged); returns logits `[B, T, V]`."""
    b = toks.shape[0]
    done = np.zeros(b, int)
    out = np.zeros((b, toks.shape[1], m.cfg.vocab_size), np.float32)
    step = jax.jit(lambda st, x, c, n: nnx.merge(gd, st)(x, c, n))
    gd, st = nnx.split(m)
    for n in chunks:
        width = max(1, int(n.max()))
        x = np.zeros((b, width), np.int32)
        for r in range(b):
            x[r, : n[r]] = toks[r, done[r]: done[r] + n[r]]
        logits, cache = step(st, jnp.asarray(x), cache, jnp.asarray(n, jnp.int32))
        for r in range(b):
            out[r, done[r]: done[r] + n[r]] = np.asarray(logits[r, : n[r]])
        done += n
    return out, cache


def test_full_forward_matches_the_masked_reference(gemma):
    toks = jax.random.randint(jax.random.key(0), (2, T), 0, CFG.vocab_size)
    got, cache = gemma(toks, init_cache(CFG, DenseKV(), 2, 64))
    np.testing.assert_allclose(np.asarray(got), np.asarray(_reference(gemma, toks)), atol=1e-4)
    # The local layers' rings hold exactly W positions; the global layer the whole capacity.
    assert [lay.k.shape[2] for lay in cache.layers] == [W, W, 64]


def test_step_by_step_and_ragged_chunks_equal_one_shot(gemma):
    toks = np.asarray(jax.random.randint(jax.random.key(1), (2, T), 0, CFG.vocab_size))
    full, _ = _feed(gemma, init_cache(CFG, DenseKV(), 2, 64), toks, [np.array([T, T])])
    steps, cache = _feed(gemma, init_cache(CFG, DenseKV(), 2, 64), toks, [np.array([1, 1])] * T)
    np.testing.assert_allclose(steps, full, atol=1e-4)
    # Ragged: rows advance by different amounts, including 0, and by more than the window at once.
    plan = [np.array([7, 0]), np.array([20, 3]), np.array([0, 30]), np.array([33, 27])]
    ragged, _ = _feed(gemma, init_cache(CFG, DenseKV(), 2, 64), toks, plan)
    np.testing.assert_allclose(ragged, full, atol=1e-4)
    # Slot p % W of a local ring holds position p's key: the last W positions, nothing older.
    lay = cache.layers[0]
    _, k, _ = gemma.layers[0].attn.qkv(gemma.layers[0].attn_norm(
        jnp.take(gemma.embed.get_value(), jnp.asarray(toks[:1]), axis=0) * jnp.sqrt(float(CFG.dim))),
        jnp.arange(T)[None])
    k = np.asarray(k[0, :, 0])  # [T, D] of layer 0 (its input is the embedding)
    ring = np.asarray(lay.k[0, 0])
    np.testing.assert_allclose(ring[np.arange(T - W, T) % W], k[T - W:], atol=1e-5)


def _write(layer, k, v, chunks):
    lengths = jnp.zeros((1,), jnp.int32)
    p = 0
    for n in chunks:
        layer = jax.jit(kvcache.write)(layer, k[:, :, p:p + n], v[:, :, p:p + n], lengths, jnp.asarray([n], jnp.int32))
        lengths, p = lengths + n, p + n
    return layer


@pytest.mark.parametrize("bits", [(4, 2), (3, 3)])
def test_quantized_ring_stores_the_same_blocks_as_a_global_layer(bits):
    """A local body ring, fed in any chunking, holds the last blocks exactly as a global layer stores
    them, and `read_window` equals attention over those dequantized values with the window mask."""
    w, t, d = 96, 300, 32
    cfg = tiny_config("gemma3", n_layers=2, sliding_window=w, local_layers=(0,), head_dim=d, n_heads=2, n_kv_heads=1)
    plan = KVPlan.uniform(2, *bits, residual=32, group_k=32, group_v=32, sink=0)
    key = jax.random.key(3)
    k = jax.random.normal(key, (1, 1, t, d)) * 2
    v = jax.random.normal(jax.random.fold_in(key, 1), (1, 1, t, d))
    c = init_cache(cfg, plan, 1, 512)
    local, glob = c.layers
    assert local.window == w and local.sink == 0 and glob.window == 0
    assert local.body_capacity < 512 and local.body_capacity >= w + local.block
    rings = [_write(local, k, v, ch) for ch in ([t], [1] * t, [7, 64, 229], [100, 200])]
    for r in rings[1:]:
        for a, b in zip(jax.tree_util.tree_leaves(rings[0]), jax.tree_util.tree_leaves(r)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ring = rings[0]
    glob = _write(glob, k, v, [t])
    n = jnp.asarray([t], jnp.int32)
    q_body = int(kvcache.quantized_count(ring, n)[0])
    nb = ring.body_capacity
    # Dequantized values the global layer holds for every body token < q_body, then the ring tail.
    gk = np.asarray(attention.dequant_chunk(glob.k, jnp.int32(0), glob.body_capacity))[0, 0]
    gv = np.asarray(attention.dequant_chunk(glob.v, jnp.int32(0), glob.body_capacity))[0, 0]
    lk = np.asarray(attention.dequant_chunk(ring.k, jnp.int32(0), nb))[0, 0]
    lv = np.asarray(attention.dequant_chunk(ring.v, jnp.int32(0), nb))[0, 0]
    live = np.arange(max(0, q_body - nb), q_body)
    np.testing.assert_array_equal(lk[live % nb], gk[live])
    np.testing.assert_array_equal(lv[live % nb], gv[live])
    # read_window for a query at position t (the next token) over [t - w + 1, t).
    q = jax.random.normal(jax.random.fold_in(key, 2), (1, 1, 2, d)) * d ** -0.5
    lo = jnp.full((1, 2), t - w + 1, jnp.int32)
    out, _ = attention.read_window(q, ring, n, lo)
    keys = np.concatenate([gk[:q_body], np.asarray(k[0, 0, q_body:t])])
    vals = np.concatenate([gv[:q_body], np.asarray(v[0, 0, q_body:t])])
    keys, vals = keys[t - w + 1:], vals[t - w + 1:]
    s = np.asarray(q[0, 0]) @ keys.T
    p = np.exp(s - s.max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ vals
    np.testing.assert_allclose(np.asarray(out[0, 0]), want, atol=1e-5)


@pytest.mark.parametrize("kv", [DenseKV(), KVPlan.uniform(3, 4, 2, residual=64, group_k=32, group_v=32, sink=4)])
def test_local_layer_bytes_do_not_grow_with_the_capacity(kv):
    cfg = CFG.replace(max_seq_len=1 << 15)
    small, large = init_cache(cfg, kv, 1, 1024), init_cache(cfg, kv, 1, 16384)
    nbytes = lambda lay: sum(x.nbytes for x in jax.tree_util.tree_leaves(lay))
    for i in cfg.local_layers:
        assert nbytes(small.layers[i]) == nbytes(large.layers[i])
    assert nbytes(large.layers[2]) > 8 * nbytes(small.layers[2])
    if isinstance(kv, KVPlan):  # a local layer has no sink: the window has long left it
        assert isinstance(large.layers[0], QuantLayer) and large.layers[0].sink == 0 and large.layers[2].sink == 4
    else:
        assert isinstance(large.layers[0], DenseLayer) and large.layers[0].k.shape[2] == W


@pytest.mark.parametrize("plan", [KVPlan.uniform(3, 4, 2, residual=32, group_k=32, group_v=32, sink=4),
                                  KVPlan.uniform(3, 8, 8, residual=32, group_k=32, group_v=32, rotate="hadamard")])
def test_quantized_local_model_decodes_past_the_window(plan):
    """A quantized cache on the tiny Gemma, token by token and chunked, past the window: finite, and
    K8V8 close to full precision."""
    cfg = CFG.replace(sliding_window=48)
    m = Transformer(cfg, rngs=nnx.Rngs(1))
    toks = np.asarray(jax.random.randint(jax.random.key(5), (1, 120), 0, cfg.vocab_size))
    full, _ = _feed(m, init_cache(cfg, DenseKV(), 1, 128), toks, [np.array([120])])
    for chunks in ([np.array([1])] * 120, [np.array([50]), np.array([70])]):
        got, cache = _feed(m, init_cache(cfg, plan, 1, 128), toks, chunks)
        assert np.isfinite(got).all() and int(cache.lengths[0]) == 120
        tol = 0.02 if plan.keys[0].bits == 8 else 0.5
        assert np.abs(got - full).max() <= tol * np.abs(full).max()


def test_prerope_keys_are_rotated_by_the_positions_they_hold():
    """Keys kept before RoPE (16-bit, so only the rotation differs; values quantized, so the layers
    are packed ones) read back rotated by the positions each slot holds: local rings wrapped past the
    window and the global layer alike give the plain plan's logits, token by token and in ragged
    chunks."""
    cfg = CFG.replace(sliding_window=80)
    m = Transformer(cfg, rngs=nnx.Rngs(2))
    # 8-bit values: a value that sits on a rounding boundary may take the neighbouring code when the
    # keys differ in their last bit (rotated back and forth), a small step at 8 bits.
    plain = KVPlan((QuantSpec(16),) * 3, (QuantSpec(8, "token", 32),) * 3, residual=64, sink=4)
    toks = np.asarray(jax.random.randint(jax.random.key(6), (2, 230), 0, cfg.vocab_size))
    for chunks in ([np.array([1, 1])] * 230, [np.array([150, 33]), np.array([80, 197])]):
        want, _ = _feed(m, init_cache(cfg, plain, 2, 240), toks, chunks)
        got, cache = _feed(m, init_cache(cfg, plain.replace(rotate="prerope"), 2, 240), toks, chunks)
        assert all(lay.rope == cfg.rope(i) for i, lay in enumerate(cache.layers))
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_analysis_observes_the_gemma_forward(gemma):
    """The analysis captures through the model's own forward: on the tiny Gemma (QK-norm, local
    layers) its attention, with the layer's scale and window, is the model's attention output; the
    stats and a Fisher plan come out finite and valid."""
    from kvq_jax.allocate import allocate_detailed
    from kvq_jax.analysis import analyze, capture
    from kvq_jax.fisher import mixed_attention

    attend = lambda tap, window=0: mixed_attention(tap.q, tap.k, tap.v, tap.k, tap.v, None, CFG.scale, window)

    toks = np.asarray(jax.random.randint(jax.random.key(7), (2, 64), 0, CFG.vocab_size), np.int32)
    gd, st = nnx.split(gemma)
    for i, tap in enumerate(capture(gd, st, jnp.asarray(toks))):
        got = attend(tap, CFG.window(i))
        np.testing.assert_allclose(np.asarray(got), np.asarray(tap.out), atol=1e-5, err_msg=f"layer {i}")
        if CFG.window(i):  # the window matters: full causal attention differs
            assert np.abs(np.asarray(attend(tap)) - np.asarray(tap.out)).max() > 1e-3
    stats = analyze(gemma, toks, bits=(2, 4, 8), group_k=32, group_v=32, residual=32, sink=4, progress=False)
    for e in (stats.k_fisher_err, stats.v_fisher_err, stats.k_attn_err, stats.v_attn_err):
        assert np.isfinite(e).all() and (e >= 0).all()
    plan = allocate_detailed(stats, 3.0, method="fisher", group_k=32, group_v=32, residual=32, sink=4).plan
    plan.validate(CFG)
    assert plan.mean_data_bits() <= 3.0 + 1e-12


def test_stored_bits_count_what_local_layers_hold():
    """A local layer holds its window only: stored bits divide by the elements really held, effective
    bits by those of a cache where every layer held every position."""
    from kvq_jax.evaluate import bits_report, elements_held
    from kvq_jax.plan import DenseKV, parse_kv

    cfg = tiny_config("gemma3", n_layers=3, n_kv_heads=1, sliding_window=64, local_layers=(0, 1))
    held = elements_held(cfg, 2, 1000)
    assert held == 2 * 2 * cfg.head_dim * (64 + 64 + 1000)
    fp = init_cache(cfg, DenseKV("float32"), 2, 1000)
    r = bits_report(cfg, DenseKV("float32"), fp.nbytes(), 2, 1000)
    assert r["data_bits"] == 32.0 and r["stored_bits"] == pytest.approx(32.0, rel=1e-4)
    assert r["effective_bits"] == pytest.approx(32.0 * held / (2 * 3 * 2 * cfg.head_dim * 1000), rel=1e-4)
    plan = parse_kv("K4V2", 3, residual=64)
    q = init_cache(cfg, plan, 2, 1000)
    r = bits_report(cfg, plan, q.nbytes(), 2, 1000)
    assert r["data_bits"] == r["data_bits_held"] == 3.0 and r["effective_bits"] < r["stored_bits"] < 32.0
    # Widths that differ by layer: the held average weighs the global layer by its 1000 tokens.
    k8, k2 = (dataclasses.replace(plan.keys[0], bits=b) for b in (8, 2))
    mixed = plan.replace(keys=(k8, k8, k2))
    r = bits_report(cfg, mixed, init_cache(cfg, mixed, 2, 1000).nbytes(), 2, 1000)
    assert r["data_bits"] == pytest.approx((8 + 8 + 2 + 3 * 2) / 6)
    assert r["data_bits_held"] == pytest.approx(((8 + 2) * 64 * 2 + (2 + 2) * 1000) / (2 * (64 + 64 + 1000)))
