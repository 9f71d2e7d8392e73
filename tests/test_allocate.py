"""Budgeted greedy bit allocation (kvq_jax.allocate) on synthetic statistics."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvq_jax.allocate import METHODS, allocate, allocate_detailed, cache_geometry
from kvq_jax.errors import KvqError
from kvq_jax.plan import KVPlan, QuantSpec
from kvq_jax.stats import KVStats, synthetic_stats

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STATS = synthetic_stats(6, 2, 16, seed=0)


def _cost(spec: QuantSpec, overhead: bool, scale_dtype: str = "bfloat16") -> float:
    return spec.storage_bits + spec.overhead_bits(scale_dtype) if overhead else float(spec.bits)


def _mean_cost(plan: KVPlan, overhead: bool) -> float:
    specs = plan.keys + plan.values
    return sum(_cost(s, overhead) for s in specs) / len(specs)


def _with(stats: KVStats, **arrays) -> KVStats:
    return dataclasses.replace(stats, **arrays)


def _uniform_stats(L: int, bits=(2, 4)) -> KVStats:
    """Every layer, K and V identical: every greedy choice is a tie."""
    s = synthetic_stats(L, 1, 8, seed=3, bits=bits)
    e = np.tile(s.k_attn_err[:1], (L, 1))
    return _with(s, k_fro=np.ones((L, 1)), v_fro=np.ones((L, 1)), k_attn_err=e, v_attn_err=e.copy(),
                 k_fisher_err=e.copy(), v_fisher_err=e.copy())


# ------------------------------------------------------------------------------------------ budget
@SETTINGS
@given(budget=st.floats(1.0, 17.0), method=st.sampled_from(METHODS), overhead=st.booleans(),
       per_head=st.booleans())
def test_budget_never_exceeded(budget, method, overhead, per_head):
    if method == "fisher" and per_head:  # Fisher errors are measured per layer only
        with pytest.raises(KvqError, match="per layer"):
            allocate(STATS, budget, method=method, count_overhead=overhead, per_head=per_head)
        return
    cheapest = 1.0 + (32 / 64 if overhead else 0.0)
    if budget < cheapest:
        with pytest.raises(KvqError, match="below the cheapest"):
            allocate(STATS, budget, method=method, count_overhead=overhead, per_head=per_head)
        return
    a = allocate_detailed(STATS, budget, method=method, count_overhead=overhead, per_head=per_head)
    assert a.spent <= budget + 1e-12
    assert a.plan_spent <= a.spent + 1e-12
    assert _mean_cost(a.plan, overhead) <= budget + 1e-9
    assert all(float(s.bits) in STATS.bits_tuple for s in a.plan.keys + a.plan.values)


@SETTINGS
@given(budget=st.floats(1.0, 9.0), overhead=st.booleans())
def test_norm_rule_spends_budget_until_no_upgrade_fits(budget, overhead):
    """Every norm-rule upgrade reduces distortion, so the greedy stops only when none fits."""
    if overhead and budget < 1.5:
        return
    a = allocate_detailed(STATS, budget, method="norm", count_overhead=overhead)
    left = (budget - a.spent) * 2 * STATS.n_layers
    widths = list(STATS.bits_tuple)
    for spec in a.plan.keys + a.plan.values:
        i = widths.index(spec.bits)
        if i + 1 < len(widths):
            nxt = QuantSpec(widths[i + 1], spec.axis, spec.group)
            assert _cost(nxt, overhead) - _cost(spec, overhead) > left - 1e-9


def test_budget_decimal_is_exact():
    """1.58 or 2.3 bits are meant as decimals: float rounding must not make them infeasible."""
    s = synthetic_stats(3, 1, 8, seed=1, bits=(1.58, 2, 3))
    plan = allocate(s, 1.58, method="norm")
    assert all(spec.bits == 1.58 for spec in plan.keys + plan.values)
    a = allocate_detailed(synthetic_stats(5, 1, 8, seed=1), 2.3, method="norm")
    assert a.spent <= 2.3 + 1e-12


def test_infeasible_budget_and_bad_options_rejected():
    with pytest.raises(KvqError, match="below the cheapest"):
        allocate(STATS, 0.99)
    with pytest.raises(KvqError, match="below the cheapest"):
        allocate(STATS, 1.2, count_overhead=True)  # 1 bit + 0.5 bit of bf16 scales/zeros
    for bad in (0, -1, float("nan"), float("inf"), "x"):
        with pytest.raises(KvqError):
            allocate(STATS, bad)
    with pytest.raises(KvqError, match="bits must be one of"):
        allocate(STATS, 4.0, method="norm", bits=(2, 7))
    with pytest.raises(KvqError, match="not measured"):
        allocate(STATS, 4.0, method="sensitivity", bits=(2, 5))  # 5 bits is valid but not in the stats
    with pytest.raises(KvqError):
        allocate(STATS, 4.0, bits=())
    with pytest.raises(KvqError, match="unknown allocation method"):
        allocate(STATS, 4.0, method="magic")
    with pytest.raises(KvqError, match="unknown norm"):
        allocate(STATS, 4.0, method="norm", norm="l1")
    with pytest.raises(KvqError, match="group"):
        allocate(STATS, 4.0, group_k=48)


def test_geometry_comes_from_the_statistics_and_measured_rules_refuse_another():
    """Errors measured with 32-token key groups describe that cache: a plan drawn from them takes
    those groups by default, and the measured-error rules refuse a geometry they were not measured
    under (a silent mismatch would allocate by another cache's errors); the norm rule may choose."""
    meta = {**STATS.meta, "group_k": 32, "sink": 4, "residual": 128, "scale_dtype": "bfloat16"}
    s = dataclasses.replace(STATS, meta=meta)
    for method in ("fisher", "sensitivity", "norm"):
        plan = allocate(s, 3.0, method=method)
        assert {k.group for k in plan.keys} == {32} and {v.group for v in plan.values} == {64}
        assert (plan.sink, plan.residual) == (4, 128)
    assert allocate(s, 3.0, method="fisher", group_k=32).keys == allocate(s, 3.0, method="fisher").keys
    for method in ("fisher", "sensitivity"):
        with pytest.raises(KvqError, match="measured with group_k 32, not 64"):
            allocate(s, 3.0, method=method, group_k=64)
    with pytest.raises(KvqError, match="residual 128, not 256"):
        allocate(s, 3.0, method="fisher", residual=256)
    # the attention-output errors do not depend on which tokens the cache keeps exact
    assert allocate(s, 3.0, method="sensitivity", residual=256).residual == 256
    assert {k.group for k in allocate(s, 3.0, method="norm", group_k=128).keys} == {128}
    # one geometry for plans of several rules: any rule that reads measured errors refuses
    assert cache_geometry(s, ("norm", "weight-norm"), group_k=64)["group_k"] == 64
    with pytest.raises(KvqError, match="the sensitivity rule's errors"):
        cache_geometry(s, ("norm", "sensitivity"), group_k=64)
    assert cache_geometry(s, ["norm", "sensitivity"], residual=256)["residual"] == 256
    with pytest.raises(KvqError, match="the fisher rule's errors"):
        cache_geometry(s, ["norm", "sensitivity", "fisher"], residual=256)


def test_unmeasured_widths_allowed_for_norm_rule_and_16_bits_for_sensitivity():
    plan = allocate(STATS, 5.0, method="norm", bits=(2, 5))
    assert {s.bits for s in plan.keys + plan.values} <= {2, 5}
    a = allocate_detailed(STATS, 16.0, method="sensitivity", bits=(2, 4, 16))
    assert np.all(a.k_bits == 16) and np.all(a.v_bits == 16)  # 16 bits = dense: zero error
    assert a.total_err == 0.0


# ------------------------------------------------------------------------------------------ rule
@SETTINGS
@given(data=st.data(), overhead=st.booleans(), norm=st.sampled_from(("fro", "spec")))
def test_norm_rule_monotone(data, overhead, norm):
    """A larger norm never gets fewer bits, keys and values pooled (H = 1: c = norm^2)."""
    L = data.draw(st.integers(1, 6))
    vals = data.draw(st.lists(st.integers(1, 10_000), min_size=2 * L, max_size=2 * L, unique=True))
    budget = data.draw(st.floats(1.625 if overhead else 1.0, 9.0))  # 1 + (1 + 0.25) / 2 with overhead
    norms = np.asarray(vals, dtype=np.float64) / 100.0
    s = synthetic_stats(L, 1, 8, seed=L)
    s = _with(s, **{f"k_{norm}": norms[:L, None], f"v_{norm}": norms[L:, None]})
    # different groups: the scale overhead differs between K and V but not the cost of an upgrade
    a = allocate_detailed(s, budget, method="norm", norm=norm, count_overhead=overhead,
                          group_k=32, group_v=128)
    got = np.concatenate([a.k_bits, a.v_bits])
    for i, j in itertools.permutations(range(2 * L), 2):
        if norms[i] > norms[j]:
            assert got[i] >= got[j], (norms, got)


def test_weight_norm_rule_uses_weights():
    L = 4
    s = synthetic_stats(L, 2, 8, seed=2)
    wk = np.array([1.0, 8.0, 1.0, 1.0])
    s = _with(s, wk_fro_layer=wk, wv_fro_layer=np.ones(L))
    a = allocate_detailed(s, 1.5, method="weight-norm", bits=(1, 2, 3, 4))
    assert a.k_bits[1] == a.k_bits.max() > a.k_bits[0]


def test_deterministic():
    s2 = dataclasses.replace(STATS)
    for method in METHODS:
        p1 = allocate(STATS, 3.3, method=method, count_overhead=True)
        p2 = allocate(s2, 3.3, method=method, count_overhead=True)
        assert p1 == p2 and p1.to_json() == p2.to_json()


@pytest.mark.parametrize("method", METHODS)
def test_ties_favour_keys_then_lower_layer(method):
    s = _uniform_stats(3)
    s = _with(s, wk_fro_layer=np.ones(3), wv_fro_layer=np.ones(3))
    # 6 tensors at 2 bits = 12; budget for exactly one 2 -> 4 upgrade: (12 + 2) / 6
    a = allocate_detailed(s, 14 / 6, method=method)
    assert a.k_bits.tolist() == [4, 2, 2] and a.v_bits.tolist() == [2, 2, 2]
    # two upgrades: the key of layer 1 beats the value of layer 0
    a = allocate_detailed(s, 16 / 6, method=method)
    assert a.k_bits.tolist() == [4, 4, 2] and a.v_bits.tolist() == [2, 2, 2]
    # four upgrades: all keys, then the value of layer 0
    a = allocate_detailed(s, 20 / 6, method=method)
    assert a.k_bits.tolist() == [4, 4, 4] and a.v_bits.tolist() == [4, 2, 2]


@pytest.mark.parametrize("method", ("norm", "sensitivity"))
def test_keys_get_more_bits_when_key_norms_are_larger(method):
    s = synthetic_stats(8, 2, 16, seed=5, key_scale=8.0)
    assert np.all(s.k_fro_layer > s.v_fro_layer)
    for budget in (2.0, 3.0, 4.0):
        a = allocate_detailed(s, budget, method=method)
        assert a.k_bits.mean() > a.v_bits.mean()
        if method == "norm":
            assert np.all(a.k_bits >= a.v_bits)


def test_sensitivity_follows_measured_errors_not_norms():
    """Layer 0's keys have the largest norm but barely matter; layer 1's values are small but matter."""
    L = 2
    s = synthetic_stats(L, 1, 8, seed=4, bits=(1, 2, 3, 4))
    g = 4.0 ** -np.asarray([1.0, 2.0, 3.0, 4.0])
    s = _with(s, k_fro=np.array([[50.0], [5.0]]), v_fro=np.array([[2.0], [1.0]]),
              k_attn_err=np.stack([1e-4 * g, 0.5 * g]), v_attn_err=np.stack([0.1 * g, 5.0 * g]))
    sens = allocate_detailed(s, 2.5, method="sensitivity")
    norm = allocate_detailed(s, 2.5, method="norm")
    assert norm.k_bits[0] == norm.k_bits.max() and norm.k_bits[0] > sens.k_bits[0]
    assert sens.v_bits[1] > norm.v_bits[1]
    # on the measured errors the sensitivity plan is no worse than the norm plan
    idx = {b: i for i, b in enumerate(s.bits_tuple)}

    def measured(a):
        return sum(s.k_attn_err[l, idx[a.k_bits[l]]] + s.v_attn_err[l, idx[a.v_bits[l]]] for l in range(L))

    assert measured(sens) < measured(norm)
    assert np.isclose(sens.total_err, measured(sens))


def test_sensitivity_jumps_over_non_convex_plateau():
    """K error is flat from 2 to 3 bits and drops at 4: a one-step greedy would never upgrade it."""
    s = synthetic_stats(1, 1, 8, seed=6, bits=(2, 3, 4))
    s = _with(s, k_attn_err=np.array([[1.0, 1.0, 0.0]]), v_attn_err=np.array([[0.10, 0.09, 0.08]]))
    a = allocate_detailed(s, 3.0, method="sensitivity")  # room for +2 bits on one tensor
    assert a.k_bits.tolist() == [4] and a.v_bits.tolist() == [2]


def test_no_upgrade_without_error_reduction():
    s = synthetic_stats(2, 1, 8, seed=7, bits=(2, 4))
    flat = np.ones((2, 2))
    a = allocate_detailed(_with(s, k_attn_err=flat, v_attn_err=flat), 4.0, method="sensitivity")
    assert a.steps == 0 and np.all(a.k_bits == 2) and a.spent == 2.0


# ------------------------------------------------------------------------------------------ per head
@pytest.mark.parametrize("method", [m for m in METHODS if m != "fisher"])
def test_per_head(method):
    L, H = 4, 3
    s = synthetic_stats(L, H, 8, seed=8)
    a = allocate_detailed(s, 2.7, method=method, per_head=True, count_overhead=True)
    assert a.k_bits_head.shape == (L, H) and a.v_bits_head.shape == (L, H)
    assert a.spent <= 2.7 + 1e-12 and _mean_cost(a.plan, True) <= a.spent + 1e-9
    widths = list(s.bits_tuple)
    for bh, b in zip(a.k_bits_head, a.k_bits):
        # the layer width: the widest one costing no more than the mean over its heads
        assert min(bh) <= b <= max(bh)
        i = widths.index(b)
        cost = [QuantSpec(w, "channel", 64) for w in widths]
        mean = np.mean([_cost(cost[widths.index(x)], True) for x in bh])
        assert _cost(cost[i], True) <= mean + 1e-9
        assert i + 1 == len(widths) or _cost(cost[i + 1], True) > mean + 1e-9
    assert allocate_detailed(s, 2.7, method=method).k_bits_head is None


def test_per_head_sensitivity_needs_head_errors():
    s = _with(STATS, k_attn_err_head=None, v_attn_err_head=None)
    with pytest.raises(KvqError, match="per-head"):
        allocate(s, 3.0, per_head=True)


# ------------------------------------------------------------------------------------------ plan
def test_plan_fields_and_json_round_trip(tmp_path):
    plan = allocate(STATS, 3.0, method="norm", key_axis="channel", value_axis="token", group_k=32,
                    group_v=128, residual=256, sink=8, rotate="hadamard", scale_dtype="float32")
    assert plan.model == "synthetic" and plan.model_layers == STATS.n_layers
    assert "norm" in plan.note and "budget=3" in plan.note
    assert all(s.axis == "channel" and s.group == 32 for s in plan.keys)
    assert all(s.axis == "token" and s.group == 128 for s in plan.values)
    assert (plan.residual, plan.sink, plan.rotate, plan.scale_dtype) == (256, 8, "hadamard", "float32")
    assert KVPlan.from_json(plan.to_json()) == plan
    path = tmp_path / "plan.json"
    plan.save(path)
    assert KVPlan.load(path) == plan
    assert allocate(STATS, 3.0, model_name="other").model == "other"


# ------------------------------------------------------------------------------------ memory budget
@pytest.mark.parametrize("method", ["fisher", "sensitivity", "norm"])
def test_memory_budget_weighs_layers_by_the_tokens_they_hold(method):
    """With `layer_tokens` the budget is the mean over the elements the cache holds: equal tokens is
    the element budget; short (local) layers are cheap, so they get at least the bits they got."""
    from kvq_jax.allocate import layer_tokens_at
    from kvq_jax.config import tiny_config

    stats = _with(STATS, k_fisher_err=STATS.k_attn_err, v_fisher_err=STATS.v_attn_err)
    plain = allocate_detailed(stats, 3.0, method=method)
    same = allocate_detailed(stats, 3.0, method=method, layer_tokens=[7] * 6)
    assert (same.plan.keys, same.plan.values) == (plain.plan.keys, plain.plan.values)
    cfg = tiny_config("gemma3", n_layers=6, sliding_window=512, local_layers=(0, 1, 2, 3, 4))
    tokens = layer_tokens_at(cfg, 8192)
    assert tokens == (512,) * 5 + (8192,) and layer_tokens_at(cfg, 100) == (100,) * 6
    mem = allocate_detailed(stats, 3.0, method=method, layer_tokens=tokens)
    bits = (mem.k_bits + mem.v_bits) / 2
    held = float((bits * np.asarray(tokens)).sum() / np.sum(tokens))
    assert held <= 3.0 + 1e-12 and mem.plan_spent == pytest.approx(held)
    assert mem.plan_element_bits == pytest.approx(float(bits.mean()))
    assert all(mem.k_bits[:5] >= plain.k_bits[:5]) and all(mem.v_bits[:5] >= plain.v_bits[:5])
    assert "memory budget" in mem.plan.note
    with pytest.raises(KvqError, match="layer_tokens must be 6 positive integers"):
        allocate_detailed(stats, 3.0, method=method, layer_tokens=[1, 2])


def test_auto_rotation_picks_the_better_rotation_per_layer():
    s = synthetic_stats(4, 2, 16, seed=1)
    kh, vh = s.k_fisher_err.copy(), s.v_fisher_err.copy()
    kh[1] *= 0.05  # layer 1 quantizes far better rotated, layer 2 far worse
    vh[1] *= 0.05
    kh[2] *= 20.0
    vh[2] *= 20.0
    s = dataclasses.replace(s, k_fisher_err_hadamard=kh, v_fisher_err_hadamard=vh)
    a = allocate_detailed(s, 3.0, method="fisher", rotate="auto")
    rot = [a.plan.rotation(i) for i in range(4)]
    assert rot[1] == "hadamard" and rot[2] == "none" and rot[0] == rot[3] == "none"  # ties stay unrotated
    assert a.plan.rotate == ("none", "hadamard", "none", "none")
    for other in ("none", "hadamard"):
        assert a.total_err <= allocate_detailed(s, 3.0, method="fisher", rotate=other).total_err
    assert a.spent <= 3.0 and KVPlan.from_json(a.plan.to_json()) == a.plan
    # an explicit per-layer rotation allocates with those tables
    fixed = allocate_detailed(s, 3.0, method="fisher", rotate=("none", "hadamard", "none", "none"))
    assert fixed.plan.rotate == a.plan.rotate
    with pytest.raises(KvqError, match="use method 'fisher'"):
        allocate_detailed(s, 3.0, method="norm", rotate="auto")
    with pytest.raises(KvqError, match="no rotated Fisher errors"):
        allocate_detailed(synthetic_stats(4, 2, 16, seed=1), 3.0, method="fisher", rotate="auto")
    with pytest.raises(KvqError, match="no Fisher errors of hadamard keys"):
        allocate_detailed(synthetic_stats(4, 2, 16, seed=1), 3.0, method="fisher", rotate="hadamard")
    with pytest.raises(KvqError, match="no Fisher errors of prerope keys"):
        allocate_detailed(s, 3.0, method="fisher", rotate="prerope")
    # a third choice for keys: before RoPE, far better on layer 3; and keys and values choose apart:
    # layer 0's values quantize far better rotated, its keys do not
    kp = s.k_fisher_err.copy()
    kp[3] *= 0.01
    vh2 = vh.copy()
    vh2[0] *= 0.01
    s3 = dataclasses.replace(s, k_fisher_err_prerope=kp, v_fisher_err_hadamard=vh2)
    a3 = allocate_detailed(s3, 3.0, method="fisher", rotate="auto")
    assert a3.plan.rotate == ("none/hadamard", "hadamard", "none", "prerope")
    assert [a3.plan.key_rotation(i) for i in range(4)] == ["none", "hadamard", "none", "prerope"]
    assert [a3.plan.value_rotation(i) for i in range(4)] == ["hadamard", "hadamard", "none", "none"]
    assert a3.total_err <= allocate_detailed(s3, 3.0, method="fisher", rotate=a.plan.rotate).total_err
    with pytest.raises(KvqError, match="4 layers but 3 rotations"):
        allocate_detailed(s, 3.0, method="fisher", rotate=("none",) * 3)
