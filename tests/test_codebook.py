"""Learned key and value codebooks: Lloyd-Max levels, their Fisher errors in the analysis, and the
allocator's choice."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvq_jax import fisher
from kvq_jax.allocate import allocate_detailed
from kvq_jax.analysis import analyze
from kvq_jax.codebook import lloyd_levels, strict_levels
from kvq_jax.config import tiny_config
from kvq_jax.errors import KvqError
from kvq_jax.evaluate import bits_report
from kvq_jax.model import Transformer
from kvq_jax.plan import KVPlan
from kvq_jax.stats import KVStats, synthetic_stats

CFG = tiny_config(n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32, dim=64, vocab_size=61)
KW = dict(group_k=32, group_v=32, residual=32, sink=2)


@pytest.fixture(scope="module")
def stats():
    model = Transformer(CFG, rngs=nnx.Rngs(3))
    windows = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 128)).astype(np.int32)
    return analyze(model, windows, bits=(1, 2, 3, 4, 8), progress=False, **KW)


def _sq_err(x, levels, bits=2):
    return float(jnp.sum((fisher.qdq_body(x, bits, "channel", 32, 0, 32, jnp.bfloat16, levels) - x) ** 2))


def test_lloyd_levels_fix_the_ends_and_beat_uniform_codes():
    """On bell-shaped values inside each group the inner levels move toward the middle, the ends stay the
    group's min and max, and the squared error drops below that of uniform codes (learned and measured
    on different draws)."""
    rng = np.random.default_rng(0)
    draw = lambda: jnp.asarray(rng.standard_normal((2, 256, 2, 32)) * rng.uniform(0.5, 3, (1, 1, 2, 32)), jnp.float32)
    x, held_out = draw(), draw()
    lv = np.asarray(lloyd_levels(x, bits=2, axis="channel", group=32, sink=0))
    assert lv[0] == 0 and lv[-1] == 3 and np.all(np.diff(lv) > 0)
    assert 1.0 < lv[1] < lv[2] < 2.0  # pulled toward the middle, where the mass is
    book = strict_levels(lv)
    assert _sq_err(held_out, jnp.asarray(book)) < 0.97 * _sq_err(held_out, None)  # -6% here
    # uniform data keeps (nearly) uniform levels
    u = jnp.asarray(rng.uniform(-1, 1, (1, 512, 2, 32)), jnp.float32)
    np.testing.assert_allclose(np.asarray(lloyd_levels(u, bits=3, axis="channel", group=32, sink=0)), np.arange(8),
                               atol=0.15)


def test_strict_levels_makes_a_valid_table():
    assert strict_levels([0.001, 1.5, 1.5, 2.9999]) == (0.0, 1.5, 1.501, 3.0)
    assert strict_levels([0, 0, 0, 3]) == (0.0, 0.001, 0.002, 3.0)


def _uniform_levels_case(seed: int, **rotation):
    """Random q, k, v and gradients `[1, 128, 2, 32]`, `layer_fisher_errors` keywords at 2 and 3 bits
    with `rotation`, and a level table `[2, 16]` holding the uniform levels of both widths."""
    rng = np.random.default_rng(seed)
    qkvg = tuple(jnp.asarray(rng.standard_normal((1, 128, 2, 32)), jnp.float32) for _ in range(4))
    kw = dict(bits=(2.0, 3.0), key_axis="channel", value_axis="token", group_k=32, group_v=32, sink=0,
              residual=32, block=32, scale_dtype="float32", **rotation)
    flat = np.zeros((2, 16), np.float32)
    flat[0, :4], flat[1, :8] = np.arange(4), np.arange(8)
    return qkvg, kw, flat


def test_analysis_learns_a_codebook_per_layer_and_width(stats):
    """The stats hold each layer's pre-RoPE key levels at the widths that take a codebook (2, 3, 4
    here: zero rows at 1 and 8) and the Fisher errors measured with them; with uniform levels
    those errors are the plain pre-RoPE ones."""
    lv = stats.k_levels_prerope
    assert lv.shape == (3, 5, 16) and not lv[:, [0, 4]].any()
    for i in range(3):
        for j, b in enumerate((2, 3, 4)):
            book = stats.levels("k", i, b)
            assert len(book) == 2**b and book[0] == 0 and book[-1] == 2**b - 1 and np.all(np.diff(book) > 0)
            np.testing.assert_array_equal(book, lv[i, j + 1, :2**b])
            assert not np.array_equal(book, np.arange(2**b))
    assert stats.levels("k", 0, 8) is None and stats.levels("k", 0, 1) is None
    e_cb, e_pre = stats.k_fisher_err_prerope_codebook, stats.k_fisher_err_prerope
    assert np.all(np.isfinite(e_cb)) and not np.allclose(e_cb[:, 1:4], e_pre[:, 1:4])
    np.testing.assert_array_equal(e_cb[:, [0, 4]], e_pre[:, [0, 4]])  # no codebook: uniform codes
    # layer_fisher_errors with the uniform levels is the pre-RoPE measurement
    (q, k, v, g), kw, flat = _uniform_levels_case(1, rotate="prerope", rope=CFG.rope(0))
    ke, ve = fisher.layer_fisher_errors(q, k, v, g, k_levels=jnp.asarray(flat), **kw)
    want, _ = fisher.layer_fisher_errors(q, k, v, g, **kw)
    assert ve is None
    np.testing.assert_allclose(np.asarray(ke), np.asarray(want), rtol=1e-6)


def test_analysis_learns_value_codebooks_after_hadamard(stats):
    """Values: levels of the Hadamard-rotated values per layer and width, their Fisher errors (values
    only), uniform levels giving back the plain Hadamard measurement."""
    lv = stats.v_levels_hadamard
    assert lv.shape == (3, 5, 16) and not lv[:, [0, 4]].any()
    for i in range(3):
        for b in (2, 3, 4):
            book = stats.levels("v", i, b)
            assert len(book) == 2**b and book[0] == 0 and book[-1] == 2**b - 1 and np.all(np.diff(book) > 0)
            assert book != stats.levels("k", i, b)  # learned on other data
    e_cb, e_h = stats.v_fisher_err_hadamard_codebook, stats.v_fisher_err_hadamard
    assert np.all(np.isfinite(e_cb)) and not np.allclose(e_cb[:, 1:4], e_h[:, 1:4])
    np.testing.assert_array_equal(e_cb[:, [0, 4]], e_h[:, [0, 4]])
    assert stats.fisher_rotations("v") == ("none", "hadamard", "hadamard+codebook")
    (q, k, v, g), kw, flat = _uniform_levels_case(2, rotate="hadamard")
    ke, ve = fisher.layer_fisher_errors(q, k, v, g, v_levels=jnp.asarray(flat), **kw)
    _, want = fisher.layer_fisher_errors(q, k, v, g, **kw)
    assert ke is None
    np.testing.assert_allclose(np.asarray(ve), np.asarray(want), rtol=1e-6)
    with pytest.raises(ValueError, match="separate calls"):
        fisher.layer_fisher_errors(q, k, v, g, k_levels=jnp.asarray(flat), v_levels=jnp.asarray(flat), **kw)
    with pytest.raises(ValueError, match="keys only"):
        fisher.layer_fisher_errors(q, k, v, g, v_levels=jnp.asarray(flat), rope=CFG.rope(0),
                                   **dict(kw, rotate="prerope"))


def test_stats_with_codebooks_round_trip(stats, tmp_path):
    stats.save(tmp_path / "s.npz")
    back = KVStats.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.k_levels_prerope, stats.k_levels_prerope)
    np.testing.assert_array_equal(back.v_levels_hadamard, stats.v_levels_hadamard)
    assert back.fisher_rotations("k") == ("none", "hadamard", "prerope", "prerope+codebook")
    assert back.fisher_rotations("v") == ("none", "hadamard", "hadamard+codebook")
    with pytest.raises(KvqError, match="come together"):
        dataclasses.replace(stats, v_levels_hadamard=None)


def test_codebook_allocation_reads_the_learned_levels(stats):
    a = allocate_detailed(stats, 2.5, method="fisher", rotate="prerope", key_codebooks=True, **KW)
    for i, s in enumerate(a.plan.keys):
        assert s.levels == stats.levels("k", i, s.bits)
    idx = [stats.bit_index(b) for b in a.k_bits]
    np.testing.assert_allclose(a.k_err, stats.k_fisher_err_prerope_codebook[np.arange(3), idx])
    a.plan.validate(CFG)
    assert KVPlan.from_json(a.plan.to_json()) == a.plan
    plain = allocate_detailed(stats, 2.5, method="fisher", rotate="prerope", **KW)
    assert all(s.levels is None for s in plain.plan.keys)
    v = allocate_detailed(stats, 2.5, method="fisher", rotate="prerope/hadamard", key_codebooks=True,
                          value_codebooks=True, **KW)
    for i, s in enumerate(v.plan.values):
        assert s.levels == stats.levels("v", i, s.bits)
    idx = [stats.bit_index(b) for b in v.v_bits]
    np.testing.assert_allclose(v.v_err, stats.v_fisher_err_hadamard_codebook[np.arange(3), idx])
    assert KVPlan.from_json(v.plan.to_json()) == v.plan


def test_auto_chooses_codebooks_where_they_lower_the_error(stats):
    """rotate="auto" takes the codebook for a layer's keys exactly when its error is the lowest key
    option at the chosen width; key_codebooks=False keeps them out."""
    kw = dict(method="fisher", rotate="auto", **KW)
    cheap = dataclasses.replace(stats, k_fisher_err_prerope_codebook=stats.k_fisher_err_prerope_codebook * 0.01)
    a = allocate_detailed(cheap, 2.5, **kw)
    assert all(s.levels is not None for s in a.plan.keys if s.bits in (2, 3, 4))
    assert all(a.plan.key_rotation(i) == "prerope" for i in range(3))
    dear = dataclasses.replace(stats, k_fisher_err_prerope_codebook=stats.k_fisher_err_prerope_codebook * 100)
    assert all(s.levels is None for s in allocate_detailed(dear, 2.5, **kw).plan.keys)
    off = allocate_detailed(cheap, 2.5, key_codebooks=False, **kw)
    assert all(s.levels is None for s in off.plan.keys)
    best = allocate_detailed(stats, 2.5, **kw)
    assert best.total_err <= min(off.total_err, allocate_detailed(stats, 2.5, key_codebooks=False, **kw).total_err) + 1e-12


def test_auto_chooses_value_codebooks_where_they_lower_the_error(stats):
    """Values take the codebook (and so the Hadamard rotation) exactly where it is their lowest
    option; value_codebooks=False keeps them out and leaves the key codebooks alone."""
    kw = dict(method="fisher", rotate="auto", **KW)
    cheap = dataclasses.replace(stats, v_fisher_err_hadamard_codebook=stats.v_fisher_err_hadamard_codebook * 0.01)
    a = allocate_detailed(cheap, 2.5, **kw)
    assert all(s.levels is not None for s in a.plan.values if s.bits in (2, 3, 4))
    assert all(a.plan.value_rotation(i) == "hadamard" for i in range(3) if a.plan.values[i].levels)
    a.plan.validate(CFG)
    dear = dataclasses.replace(stats, v_fisher_err_hadamard_codebook=stats.v_fisher_err_hadamard_codebook * 100)
    assert all(s.levels is None for s in allocate_detailed(dear, 2.5, **kw).plan.values)
    off = allocate_detailed(cheap, 2.5, value_codebooks=False, **kw)
    assert all(s.levels is None for s in off.plan.values)
    keys_cheap = dataclasses.replace(cheap, k_fisher_err_prerope_codebook=stats.k_fisher_err_prerope_codebook * 0.01)
    assert any(s.levels for s in allocate_detailed(keys_cheap, 2.5, value_codebooks=False, **kw).plan.keys)


def test_codebook_allocation_errors(stats):
    with pytest.raises(KvqError, match="keys stored before RoPE"):
        allocate_detailed(stats, 2.5, method="fisher", rotate="hadamard", key_codebooks=True, **KW)
    with pytest.raises(KvqError, match="values stored after the Hadamard rotation"):
        allocate_detailed(stats, 2.5, method="fisher", rotate="prerope", value_codebooks=True, **KW)
    with pytest.raises(KvqError, match="no value codebooks"):
        allocate_detailed(synthetic_stats(L=3), 2.5, method="fisher", rotate="hadamard", value_codebooks=True)
    with pytest.raises(KvqError, match="no key codebooks"):
        allocate_detailed(synthetic_stats(L=3), 2.5, method="fisher", rotate="prerope", key_codebooks=True)
    with pytest.raises(KvqError, match="use method 'fisher'"):
        allocate_detailed(stats, 2.5, method="norm", rotate="prerope", key_codebooks=True, **KW)
    with pytest.raises(KvqError, match="has 2 flags"):
        allocate_detailed(stats, 2.5, method="fisher", rotate="prerope", key_codebooks=[True, False], **KW)


def test_stored_bits_count_the_codebooks(stats):
    a = allocate_detailed(stats, 2.5, method="fisher", rotate="prerope", key_codebooks=True, **KW)
    with_books = bits_report(CFG, a.plan, 1000, 1, 64)["stored_bits"]
    without = bits_report(CFG, a.plan.replace(keys=tuple(dataclasses.replace(s, levels=None) for s in a.plan.keys)),
                          1000, 1, 64)["stored_bits"]
    np.testing.assert_allclose((with_books - without) * 2 * 3 * 2 * 32 * 64 / 8, a.plan.codebook_bytes())
    assert a.plan.codebook_bytes() > 0


def test_auto_with_codebooks_under_a_memory_budget(stats):
    """The codebook choice works under the memory budget too (layers weighed by the tokens they hold)."""
    cheap = dataclasses.replace(stats, k_fisher_err_prerope_codebook=stats.k_fisher_err_prerope_codebook * 0.01)
    a = allocate_detailed(cheap, 2.5, method="fisher", rotate="auto", layer_tokens=(512, 4096, 4096), **KW)
    assert a.spent <= 2.5 + 1e-12 and "memory budget" in a.plan.note
    assert any(s.levels is not None for s in a.plan.keys)


def test_allocated_codebook_plan_drives_the_model(stats):
    """The allocator's plan with key and value codebooks runs the model: after a prompt the next
    token's logits agree between the XLA loop and the Pallas kernel (interpret), and differ from the
    same plan with uniform codes (the levels are read)."""
    from kvq_jax.cache import init_cache

    plan = allocate_detailed(stats, 2.5, method="fisher", rotate="prerope/hadamard", key_codebooks=True,
                             value_codebooks=True, **KW).plan
    assert any(s.levels for s in plan.keys) and any(s.levels for s in plan.values)
    uniform = plan.replace(keys=tuple(dataclasses.replace(s, levels=None) for s in plan.keys),
                           values=tuple(dataclasses.replace(s, levels=None) for s in plan.values))
    model = Transformer(CFG, rngs=nnx.Rngs(3))
    toks = jnp.asarray(np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 161)), jnp.int32)

    def next_logits(kv, impl):
        cache = init_cache(CFG, kv, 2, 192, jnp.float32)
        _, cache = model(toks[:, :160], cache, attention_impl="xla", last_only=True)
        return np.asarray(model(toks[:, 160:], cache, attention_impl=impl, last_only=True)[0])

    xla, pallas = next_logits(plan, "xla"), next_logits(plan, "pallas_interpret")
    np.testing.assert_allclose(pallas, xla, atol=2e-4, rtol=2e-4)
    assert np.max(np.abs(xla - next_logits(uniform, "xla"))) > 1e-4
