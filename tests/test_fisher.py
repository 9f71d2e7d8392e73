"""Loss-aware (Fisher-weighted) sensitivity: protocol mask, mixed attention, gradients, allocation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvq_jax import fisher, quant
from kvq_jax.allocate import allocate_detailed
from kvq_jax.analysis import analyze
from kvq_jax.cache import init_cache, quantized_count
from kvq_jax.config import tiny_config
from kvq_jax.errors import KvqError
from kvq_jax.model import Transformer
from kvq_jax.plan import KVPlan
from kvq_jax.stats import KVStats

CFG = tiny_config(n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32, dim=64, vocab_size=61)


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def windows():
    return np.random.default_rng(0).integers(0, CFG.vocab_size, (3, 128)).astype(np.int32)


@pytest.fixture(scope="module")
def stats(model, windows):
    return analyze(model, windows, bits=(1, 2, 3, 4, 8), key_axis="channel", group_k=32, group_v=32,
                   residual=32, sink=2, progress=False)


def protocol_mask(t: int, sink: int, residual: int, block: int) -> np.ndarray:
    """`[T, T]` bool: key s is quantized for query t."""
    lo, hi = fisher.protocol_span(t, sink, residual, block)
    s = np.arange(t)[None, :]
    return (s >= lo[:, None]) & (s < hi[:, None])


@pytest.mark.parametrize("sink,residual,block", [(4, 128, 64), (0, 32, 32), (3, 64, 16)])
def test_protocol_matches_the_cache_flush_rule(sink, residual, block):
    plan = KVPlan.uniform(1, 4, 2, group_k=block, residual=residual, sink=sink)
    layer = init_cache(tiny_config(n_layers=1), plan, 1, 512).layers[0]
    t = 400
    # The query at position p reads the cache as it holds p positions (read before its own write).
    want = np.asarray(quantized_count(layer, jnp.arange(t)))
    np.testing.assert_array_equal(fisher.quantized_prefix(t, sink, residual, block), want)
    mask = protocol_mask(t, sink, residual, block)
    assert not mask[:, :sink].any() and not np.triu(mask).any()  # sink and the causal future: never
    np.testing.assert_array_equal(mask.sum(1), want)


def test_qdq_body_keeps_the_sink_and_quantizes_blocks():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 70, 2, 32)), jnp.float32)
    out = np.asarray(fisher.qdq_body(x, 2, "channel", 16, 6, 16, jnp.float32))
    np.testing.assert_array_equal(out[:, :6], np.asarray(x[:, :6]))
    body = x[:, 6:70].transpose(0, 2, 1, 3)  # 64 tokens = 4 whole blocks of 16
    c, s, z = quant.quantize(body, 2, "channel", 16, scale_dtype=jnp.float32)
    want = np.asarray(quant.dequantize(c, s, z, "channel", 16)).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(out[:, 6:], want, atol=1e-6)


def dense_mixed(q, k, v, kh, vh, mask, scale, window=0) -> np.ndarray:
    """The mixed attention as one `[T, T]` formula in numpy (query t reads kh/vh where mask[t])."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    visible = (j <= i) & ((i - j < window) if window else True)
    qh = np.asarray(q).reshape(b, t, hkv, hq // hkv, d) * scale
    s = np.where(mask, np.einsum("bqhrd,bkhd->bhrqk", qh, kh), np.einsum("bqhrd,bkhd->bhrqk", qh, k))
    s = np.where(visible, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (np.einsum("bhrqk,bkhd->bqhrd", np.where(mask, p, 0), vh)
            + np.einsum("bhrqk,bkhd->bqhrd", np.where(mask, 0, p), v)).reshape(b, t, hq, d)


def test_mixed_attention_limits():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((2, 40, 4, 32)), jnp.float32)
    k, v, kh, vh = (jnp.asarray(rng.standard_normal((2, 40, 2, 32)), jnp.float32) for _ in range(4))
    for span, mask in ((None, np.zeros((40, 40), bool)), ((np.zeros(40), np.full(40, 40)), np.ones((40, 40), bool))):
        want = dense_mixed(q, k, v, kh, vh, mask, 32 ** -0.5)
        np.testing.assert_allclose(fisher.mixed_attention(q, k, v, kh, vh, span), want, atol=1e-5)


@pytest.mark.parametrize("window", [0, 40, 400])
def test_mixed_attention_in_query_blocks_is_the_dense_formula(window):
    # 300 queries: 5 blocks of 64, the last one padded; a global layer's blocks go in 4 bands that
    # see the keys up to their band's end; a window layer's blocks see a slice of the keys; a window
    # longer than the text is a global layer
    rng = np.random.default_rng(5)
    t, scale = 300, 0.3
    q = jnp.asarray(rng.standard_normal((1, t, 4, 16)), jnp.float32)
    k, v, kh, vh = (jnp.asarray(rng.standard_normal((1, t, 2, 16)), jnp.float32) for _ in range(4))
    span = fisher.protocol_span(t, 0 if window else 4, 32, 16)
    mask = protocol_mask(t, 0 if window else 4, 32, 16)
    want = dense_mixed(q, k, v, kh, vh, mask, scale, window)
    got = fisher.mixed_attention(q, k, v, kh, vh, span, scale, window)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
    # keys alone, values alone, neither (each its own shortcut): the same formula with the others exact
    variants = [(kh, None), (None, vh), (None, None), (kh, vh)]
    outs = fisher.attention_variants(q, k, v, variants, span, scale, window, lambda a, fp, o: (fp, o))
    merge = lambda x: np.asarray(x).swapaxes(0, 1).reshape(1, -1, *q.shape[2:])[:, :t]  # [nb, 1, bq, ...] -> [1, T, ...]
    np.testing.assert_allclose(merge(outs[0]), dense_mixed(q, k, v, k, v, mask, scale, window), atol=2e-5)
    for n, (a, b) in enumerate(variants):
        ref = dense_mixed(q, k, v, k if a is None else a, v if b is None else b, mask, scale, window)
        np.testing.assert_allclose(merge(outs[1][:, n]), ref, atol=2e-5, err_msg=str(n))


def test_fisher_pass_is_the_model_and_its_gradient(model, windows):
    gd, state = nnx.split(model)
    toks = jnp.asarray(windows[:2, :64])
    value, grads, (q, k, v) = fisher.fisher_pass(gd, state, toks)
    # the same NLL as the model's own forward
    logits, _ = model(toks, init_cache(CFG, KVPlan.uniform(CFG.n_layers, 16, 16), 2, 64))
    lp = jax.nn.log_softmax(logits[:, :-1], -1)
    want = -np.take_along_axis(np.asarray(lp), np.asarray(toks)[:, 1:, None], -1).sum()
    assert float(value) == pytest.approx(float(want), rel=1e-5)
    assert grads.shape == (CFG.n_layers, 2, 64, CFG.n_heads, CFG.head_dim) and k.shape[0] == CFG.n_layers
    # directional finite difference of the NLL along a random probe direction
    u = jnp.asarray(np.random.default_rng(4).standard_normal(grads.shape), jnp.float32)
    eps = 1e-2
    f = lambda p: float(fisher.nll(gd, state, toks, tuple(p))[0])
    fd = (f(eps * u) - f(-eps * u)) / (2 * eps)
    assert fd == pytest.approx(float(jnp.sum(grads * u)), rel=2e-2)


def test_fisher_pass_gradient_over_several_query_blocks():
    # 300 tokens: the attention goes in rematerialised blocks of 256 queries; a window layer too
    cfg = tiny_config("gemma3", n_layers=2, head_dim=16, dim=32, hidden_dim=64, sliding_window=40, local_layers=(0,),
                      max_seq_len=512)
    gd, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(7)))
    toks = jnp.asarray(np.random.default_rng(8).integers(0, cfg.vocab_size, (1, 300)), jnp.int32)
    value, grads, _ = fisher.fisher_pass(gd, state, toks)
    u = jnp.asarray(np.random.default_rng(9).standard_normal(grads.shape), jnp.float32)
    eps = 1e-2
    f = lambda p: float(fisher.nll(gd, state, toks, tuple(p))[0])
    assert f(0 * u) == pytest.approx(float(value), rel=1e-6)
    fd = (f(eps * u) - f(-eps * u)) / (2 * eps)
    assert fd == pytest.approx(float(jnp.sum(grads * u)), rel=2e-2)


def test_fisher_errors_shape_order_and_round_trip(stats, tmp_path):
    for e in (stats.k_fisher_err, stats.v_fisher_err):
        assert e.shape == (CFG.n_layers, 5) and np.all(np.isfinite(e)) and np.all(e >= 0)
        assert np.all(e[:, 0] > e[:, -1])  # 1 bit hurts more than 8 bits, every layer
        assert np.all(e[:, -1] < 1e-2 * e[:, 0])
    path = tmp_path / "s.npz"
    stats.save(path)
    back = KVStats.load(path)
    np.testing.assert_array_equal(back.k_fisher_err, stats.k_fisher_err)
    assert back.meta["residual"] == 32 and back.meta["sink"] == 2


def test_short_windows_measure_no_fisher_errors(model):
    # windows no longer than sink + residual never read a quantized token: nothing to measure
    w = np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 32)).astype(np.int32)
    st = analyze(model, w, bits=(2, 4), group_k=32, group_v=32, residual=32, sink=0, progress=False)
    assert st.k_fisher_err is None and st.v_fisher_err is None
    with pytest.raises(KvqError, match="longer than sink \\+ residual"):
        allocate_detailed(st, 3.0, method="fisher")


@pytest.mark.parametrize("budget", [1.5, 2.5, 3.0, 4.0])
def test_fisher_allocation_respects_the_budget(stats, budget):
    a = allocate_detailed(stats, budget, method="fisher", group_k=32, group_v=32, residual=32, sink=2)
    assert a.spent <= budget + 1e-12 and a.plan.mean_data_bits() <= budget + 1e-12
    a.plan.validate(CFG)
    again = allocate_detailed(stats, budget, method="fisher", group_k=32, group_v=32, residual=32, sink=2)
    assert a.plan == again.plan


def test_fisher_allocation_needs_fisher_stats(stats):
    import dataclasses

    old = dataclasses.replace(stats, k_fisher_err=None, v_fisher_err=None)
    with pytest.raises(KvqError, match="no Fisher errors"):
        allocate_detailed(old, 3.0, method="fisher")
    with pytest.raises(KvqError, match="per layer"):
        allocate_detailed(stats, 3.0, method="fisher", per_head=True)


def test_analyze_rejects_a_window_protocol_it_cannot_mimic(model, windows):
    with pytest.raises(KvqError, match="residual"):
        analyze(model, windows, bits=(2,), group_k=32, group_v=32, residual=48, progress=False)


def test_hadamard_errors_are_those_of_the_rotated_cache(stats):
    # analyze measures both rotations (head_dim 32 is a power of two)
    for e, ref in ((stats.k_fisher_err_hadamard, stats.k_fisher_err), (stats.v_fisher_err_hadamard, stats.v_fisher_err)):
        assert e.shape == ref.shape and np.all(np.isfinite(e)) and np.all(e[:, 0] > e[:, -1])
        assert not np.allclose(e, ref)
    # keys with one outlier channel, quantized per token: the rotation spreads the outlier over all
    # channels, so the rotated cache's key error is far smaller; at 8 bits both are negligible
    rng = np.random.default_rng(0)
    b, t, h, d = 1, 96, 1, 32
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    k = rng.standard_normal((b, t, h, d))
    k[..., 3] *= 40.0
    k, v = jnp.asarray(k, jnp.float32), jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    grad = jnp.ones((b, t, h, d), jnp.float32)
    kw = dict(bits=(2.0, 8.0), key_axis="token", value_axis="token", group_k=32, group_v=32, sink=0,
              residual=32, block=32, scale_dtype="float32")
    ke_none, _ = fisher.layer_fisher_errors(q, k, v, grad, **kw)
    ke_rot, _ = fisher.layer_fisher_errors(q, k, v, grad, rotate="hadamard", **kw)
    assert float(ke_rot[0]) < 0.5 * float(ke_none[0])
    assert float(ke_rot[1]) < 1e-3 * float(ke_rot[0])


def test_prerope_errors_are_those_of_keys_quantized_before_rope(stats):
    """analyze measures keys stored before RoPE: values keep their unrotated errors; the key errors
    are those of RoPE(qdq(RoPE^-1(k))). Keys whose per-channel structure RoPE smears (a channel pair
    with a constant offset, fast rotation) quantize far better before RoPE."""
    from kvq_jax.rotations import apply_rope

    assert np.all(np.isfinite(stats.k_fisher_err_prerope)) and not np.allclose(stats.k_fisher_err_prerope,
                                                                                stats.k_fisher_err)
    assert stats.fisher_rotations("k") == ("none", "hadamard", "prerope", "prerope+codebook")
    assert stats.fisher_rotations("v") == ("none", "hadamard", "hadamard+codebook")
    rng = np.random.default_rng(1)
    b, t, h, d = 1, 256, 1, 32
    rope = (10000.0, None)
    pos = jnp.arange(t)[None, :, None]
    k_pre = rng.standard_normal((b, t, h, d)) * 0.1
    k_pre[..., 0] += 8.0  # a large steady channel: before RoPE one narrow range per group
    k = apply_rope(jnp.asarray(k_pre, jnp.float32), pos, rope)
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    grad = jnp.ones((b, t, h, d), jnp.float32)
    kw = dict(bits=(2.0,), key_axis="channel", value_axis="token", group_k=32, group_v=32, sink=0,
              residual=32, block=32, scale_dtype="float32")
    ke_post, ve = fisher.layer_fisher_errors(q, k, v, grad, **kw)
    ke_pre, ve_pre = fisher.layer_fisher_errors(q, k, v, grad, rotate="prerope", rope=rope, **kw)
    assert ve_pre is None and float(ke_pre[0]) < 0.2 * float(ke_post[0])
    # the same as quantizing k_pre directly, then rotating
    q_pre = fisher.qdq_body(jnp.asarray(k_pre, jnp.float32), 2.0, "channel", 32, 0, 32, jnp.float32)
    k_hat = apply_rope(q_pre, pos, rope)
    ref = fisher.mixed_attention(q, k, v, k, v, None)
    want = 0.5 * jnp.sum((fisher.mixed_attention(q, k, v, k_hat, v, fisher.protocol_span(t, 0, 32, 32)) - ref) ** 2)
    np.testing.assert_allclose(float(ke_pre[0]), float(want), rtol=1e-3)


def test_analyze_measures_only_the_rotations_asked(model, windows):
    s = analyze(model, windows[:1], bits=(2, 4), group_k=32, group_v=32, residual=32, sink=2, progress=False,
                rotations=("prerope",))
    assert s.fisher_rotations("k") == ("none", "prerope", "prerope+codebook") and s.fisher_rotations("v") == ("none",)
    assert s.k_fisher_err_hadamard is None
    with pytest.raises(KvqError, match="cannot measure rotation 'spin'"):
        analyze(model, windows[:1], bits=(2,), group_k=32, group_v=32, residual=32, progress=False,
                rotations=("spin",))


def test_auto_rotation_allocates_with_the_rotated_errors(stats):
    kw = dict(group_k=32, group_v=32, residual=32, sink=2)
    a = allocate_detailed(stats, 3.0, method="fisher", rotate="auto", **kw)
    plain = allocate_detailed(stats, 3.0, method="fisher", **kw)
    rotated = allocate_detailed(stats, 3.0, method="fisher", rotate="hadamard", **kw)
    pre = allocate_detailed(stats, 3.0, method="fisher", rotate="prerope", **kw)
    assert a.total_err <= min(plain.total_err, rotated.total_err, pre.total_err) + 1e-12
    assert a.spent <= 3.0 + 1e-12 and "rotations chosen per layer" in a.plan.note
    a.plan.validate(CFG)
    # an all-rotated allocation's predicted errors are read from the Hadamard tables
    idx = [list(stats.bits).index(b) for b in rotated.k_bits]
    np.testing.assert_allclose(rotated.k_err, stats.k_fisher_err_hadamard[np.arange(CFG.n_layers), idx])


@pytest.mark.parametrize("window,score_from", [(0, 100), (0, 128), (48, 100), (48, 0)])
def test_score_from_counts_only_the_tail_queries(window, score_from):
    """`score_from` s: the error is the Fisher-weighted squared error of queries at positions >= s only
    (the dense formula over those rows; the query blocks before s are skipped, in global and sliding
    layers)."""
    rng = np.random.default_rng(2)
    b, t, h, d = 1, 160, 1, 32
    q, k, v, grad = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for _ in range(4))
    kw = dict(bits=(2.0,), key_axis="channel", value_axis="token", group_k=32, group_v=32, sink=0,
              residual=32, block=32, scale_dtype="float32", window=window)
    span = fisher.protocol_span(t, 0, 32, 32)
    k_hat = fisher.qdq_body(k, 2.0, "channel", 32, 0, 32, jnp.float32)
    err = (fisher.mixed_attention(q, k, v, k_hat, v, span, window=window)
           - fisher.mixed_attention(q, k, v, k, v, None, window=window)) ** 2
    per_row = 0.5 * jnp.sum(grad ** 2 * err, axis=(0, 2, 3))  # [T]
    whole, _ = fisher.layer_fisher_errors(q, k, v, grad, **kw)
    tail, _ = fisher.layer_fisher_errors(q, k, v, grad, score_from=score_from, **kw)
    np.testing.assert_allclose(float(whole[0]), float(per_row.sum()), rtol=1e-4)
    np.testing.assert_allclose(float(tail[0]), float(per_row[score_from:].sum()), rtol=1e-4)
    assert 0 < float(tail[0]) <= float(whole[0])


def test_analyze_records_score_from_and_checks_its_range(model, windows):
    st = analyze(model, windows, bits=(2, 4), group_k=32, group_v=32, residual=32, sink=2, progress=False,
                 rotations=("none",), score_from=96)
    assert st.meta["score_from"] == 96 and np.all(st.k_fisher_err > 0)
    with pytest.raises(KvqError, match="--score-from must be in"):
        analyze(model, windows, bits=(2,), group_k=32, group_v=32, residual=32, progress=False, score_from=128)
