"""K/V analysis (kvq_jax.analysis) on the tiny random model, checked against numpy; then the stats
file, the allocation of a plan from them, and the report.

The reference activations are recomputed here with numpy from the model's weights (RMSNorm, the
K/V/Q projections, rotate-half RoPE, causal GQA attention); the residual stream between layers comes
from the model's own `Block.__call__` (prefill into a dense cache), not from `analysis.capture`.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvq_jax import quant
from kvq_jax.allocate import allocate, allocate_detailed
from kvq_jax.analysis import analyze, capture
from kvq_jax.fisher import mixed_attention
from kvq_jax.cache import init_cache
from kvq_jax.errors import KvqError
from kvq_jax.plan import KVPlan, parse_kv
from kvq_jax.report import MARKER, write_report
from kvq_jax.stats import KVStats

W, T = 3, 96  # 3 windows with batch=2: the last batch is partial; 96 tokens: two query blocks, one padded
BITS = (1, 1.58, 2, 3, 4, 6, 8)
GROUP = 16  # channel-axis groups: valid in a plan whatever the tiny model's head_dim
KW = dict(key_axis="channel", value_axis="channel", group_k=GROUP, group_v=GROUP)
PNG = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ reference
def _rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, theta: float) -> np.ndarray:
    """Rotate-half RoPE of x `[B, T, H, D]` at positions 0..T-1."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = np.arange(x.shape[1])[:, None] * inv  # [T, D/2]
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    a, b = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal GQA attention in float64: q `[B, T, Hq, D]`, k/v `[B, T, Hkv, D]` → `[B, T, Hq, D]`.

    Query head i reads KV head i // (Hq / Hkv)."""
    hq, hkv, d = q.shape[2], k.shape[2], q.shape[3]
    kk = np.repeat(k, hq // hkv, axis=2)
    vv = np.repeat(v, hq // hkv, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, kk) / np.sqrt(d)
    t = q.shape[1]
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, vv)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _qdq_jit(xt, bits, axis, group):
    codes, s, z = quant.quantize(xt, bits, axis, group, scale_dtype=jnp.bfloat16)
    return quant.dequantize(codes, s, z, axis, group)


def _qdq(x: np.ndarray, bits: float, axis: str, group: int) -> np.ndarray:
    """The library's quantizer applied in the cache layout `[B, H, T, D]` (x is `[B, T, H, D]`)."""
    xt = jnp.asarray(x.transpose(0, 2, 1, 3), jnp.float32)
    return np.asarray(_qdq_jit(xt, bits, axis, group), np.float64).transpose(0, 2, 1, 3)


@functools.partial(jax.jit, static_argnums=0)
def _block_forward(graphdef, state, x, layer_cache, lengths, n_new):
    """The model's own decoder block (prefill into an empty dense layer cache)."""
    from flax import nnx

    return nnx.merge(graphdef, state)(x, layer_cache, lengths, n_new, "xla")[0]


def _capture(model, windows: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Per layer: q, k_pre (before RoPE), k (after RoPE), v `[W, T, H, D]` in float64 and the
    block's input x, recomputed from the weights."""
    from flax import nnx

    from kvq_jax.plan import DenseKV

    cfg = model.cfg
    b, t = windows.shape
    x = jnp.take(model.embed.get_value(), jnp.asarray(windows), axis=0)
    cache = init_cache(cfg, DenseKV(), b, t)
    lengths = jnp.zeros((b,), jnp.int32)
    n_new = jnp.full((b,), t, jnp.int32)
    out = []
    for i, blk in enumerate(model.layers):
        xn = np.asarray(x, np.float64)
        h = _rmsnorm(xn, np.asarray(blk.attn_norm.weight.get_value(), np.float64), cfg.norm_eps)
        w = {n: np.asarray(getattr(blk.attn, n).w.get_value(), np.float64) for n in ("wq", "wk", "wv")}
        q_pre = (h @ w["wq"]).reshape(b, t, cfg.n_heads, cfg.head_dim)
        k_pre = (h @ w["wk"]).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        v = (h @ w["wv"]).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        out.append(dict(x=xn, q=_rope(q_pre, cfg.rope_theta), k_pre=k_pre,
                        k=_rope(k_pre, cfg.rope_theta), v=v))
        graphdef, state = nnx.split(blk)
        x = _block_forward(graphdef, state, x, cache.layers[i], lengths, n_new)
    return out


def _heads(x: np.ndarray) -> np.ndarray:
    """`[W, T, H, D]` → `[H, W*T, D]`: each head's activations as one matrix."""
    return x.transpose(2, 0, 1, 3).reshape(x.shape[2], -1, x.shape[3])


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def windows(tiny_model) -> np.ndarray:
    return np.random.default_rng(0).integers(0, tiny_model.cfg.vocab_size, (W, T)).astype(np.int32)


@pytest.fixture(scope="module")
def stats(tiny_model, windows) -> KVStats:
    return analyze(tiny_model, windows, bits=BITS, progress=False, meta={"calib_file": "random"}, **KW)


@pytest.fixture(scope="module")
def ref(tiny_model, windows) -> list[dict[str, np.ndarray]]:
    return _capture(tiny_model, windows)


# ------------------------------------------------------------------------------------ capture
def test_capture_is_the_models_forward(tiny_model, windows, ref):
    """`capture` (the model's own forward) returns the q/k/v the numpy reference computes, and the
    analysis' attention reproduces the model's attention output layer by layer."""
    from flax import nnx

    graphdef, state = nnx.split(tiny_model)
    taps = capture(graphdef, state, jnp.asarray(windows))
    assert len(taps) == tiny_model.cfg.n_layers
    for i, tap in enumerate(taps):
        for name in ("q", "k_pre", "k", "v"):
            np.testing.assert_allclose(np.asarray(getattr(tap, name)), ref[i][name], rtol=1e-4, atol=1e-4,
                                       err_msg=f"layer {i} {name}")
        got = mixed_attention(tap.q, tap.k, tap.v, tap.k, tap.v, None)
        np.testing.assert_allclose(np.asarray(got), np.asarray(tap.out), atol=1e-5)


# ------------------------------------------------------------------------------------ norms
def test_shapes_and_meta(stats, tiny_model):
    cfg = tiny_model.cfg
    L, H, D = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
    assert (stats.n_layers, stats.n_heads, stats.head_dim) == (L, H, D)
    assert stats.bits_tuple == BITS
    assert stats.k_sv.shape == stats.v_sv.shape == stats.k_sv_prerope.shape == (L, H, D)
    assert stats.k_attn_err.shape == (L, len(BITS)) and stats.k_attn_err_head.shape == (L, H, len(BITS))
    m = stats.meta
    assert m["model"] == cfg.name == stats.model_name
    assert (m["calib_windows"], m["calib_tokens"], m["calib_file"]) == (W, W * T, "random")
    assert (m["key_axis"], m["value_axis"], m["group_k"], m["group_v"]) == ("channel", "channel", GROUP, GROUP)


def test_activation_norms_and_spectra_match_numpy(stats, ref):
    for layer, r in enumerate(ref):
        for name, x, fro, spec, sv in (
            ("K", r["k"], stats.k_fro, stats.k_spec, stats.k_sv),
            ("K pre-RoPE", r["k_pre"], stats.k_fro_prerope, stats.k_spec_prerope, stats.k_sv_prerope),
            ("V", r["v"], stats.v_fro, stats.v_spec, stats.v_sv),
        ):
            for h, mat in enumerate(_heads(x)):  # [W*T, D]
                msg = f"layer {layer} head {h} {name}"
                want_sv = np.linalg.svd(mat, compute_uv=False)
                np.testing.assert_allclose(fro[layer, h], np.linalg.norm(mat), rtol=1e-4, err_msg=msg)
                np.testing.assert_allclose(spec[layer, h], np.linalg.norm(mat, 2), rtol=1e-4, err_msg=msg)
                # from a float32 Gram matrix: small singular values carry ~sqrt(eps)·||X|| error
                np.testing.assert_allclose(sv[layer, h], want_sv, rtol=1e-3, atol=2e-3 * want_sv[0],
                                           err_msg=msg)
                assert np.all(np.diff(sv[layer, h]) <= 1e-6 * sv[layer, h, 0]), msg


def test_rope_is_a_rotation(stats):
    """RoPE rotates each token's key: Frobenius norms are unchanged, spectra are not."""
    np.testing.assert_allclose(stats.k_fro, stats.k_fro_prerope, rtol=1e-5)
    assert not np.allclose(stats.k_spec, stats.k_spec_prerope, rtol=1e-3)


def test_weight_norms_match_numpy(stats, tiny_model):
    cfg = tiny_model.cfg
    D = cfg.head_dim
    for layer, blk in enumerate(tiny_model.layers):
        for w, fro, spec, fro_l, spec_l in (
            (blk.attn.wk.w, stats.wk_fro, stats.wk_spec, stats.wk_fro_layer, stats.wk_spec_layer),
            (blk.attn.wv.w, stats.wv_fro, stats.wv_spec, stats.wv_fro_layer, stats.wv_spec_layer),
        ):
            w = np.asarray(w.get_value(), np.float64)  # [dim, Hkv*D]
            for h in range(cfg.n_kv_heads):
                sl = w[:, h * D:(h + 1) * D]
                np.testing.assert_allclose(fro[layer, h], np.linalg.norm(sl), rtol=1e-6)
                np.testing.assert_allclose(spec[layer, h], np.linalg.svd(sl, compute_uv=False)[0], rtol=1e-6)
            np.testing.assert_allclose(fro_l[layer], np.linalg.norm(w), rtol=1e-6)
            np.testing.assert_allclose(spec_l[layer], np.linalg.norm(w, 2), rtol=1e-6)


# ------------------------------------------------------------------------------------ errors
def test_quantization_errors_match_numpy(stats, ref):
    """k_qerr / v_qerr = ||Q(X) - X||² / ||X||² per head, summed over all windows."""
    for layer, r in enumerate(ref):
        for j, b in enumerate(BITS):
            for name, x, got in (("K", r["k"], stats.k_qerr), ("V", r["v"], stats.v_qerr)):
                err = (_qdq(x, b, "channel", GROUP) - x) ** 2
                want = err.sum(axis=(0, 1, 3)) / (x**2).sum(axis=(0, 1, 3))
                np.testing.assert_allclose(got[layer, :, j], want, rtol=2e-2,
                                           err_msg=f"layer {layer} {name} {b} bits")


def test_attention_errors_match_numpy(stats, ref, tiny_model):
    """k_attn_err: normalised MSE of the layer's attention output with only K quantized (V alike);
    per layer summed over heads, per head over that KV head's query heads."""
    hkv = tiny_model.cfg.n_kv_heads
    for layer, r in enumerate(ref):
        out = _attention(r["q"], r["k"], r["v"])
        per_head = lambda e: e.reshape(e.shape[:2] + (hkv, -1, e.shape[3])).sum(axis=(0, 1, 3, 4))
        base = per_head(out**2)
        for j, b in enumerate(BITS[1:6], start=1):  # the extremes behave alike; keep it quick
            ek = per_head((_attention(r["q"], _qdq(r["k"], b, "channel", GROUP), r["v"]) - out) ** 2)
            ev = per_head((_attention(r["q"], r["k"], _qdq(r["v"], b, "channel", GROUP)) - out) ** 2)
            msg = f"layer {layer} {b} bits"
            np.testing.assert_allclose(stats.k_attn_err_head[layer, :, j], ek / base, rtol=5e-2, err_msg=msg)
            np.testing.assert_allclose(stats.v_attn_err_head[layer, :, j], ev / base, rtol=5e-2, err_msg=msg)
            np.testing.assert_allclose(stats.k_attn_err[layer, j], ek.sum() / base.sum(), rtol=5e-2, err_msg=msg)
            np.testing.assert_allclose(stats.v_attn_err[layer, j], ev.sum() / base.sum(), rtol=5e-2, err_msg=msg)


def test_quantization_errors_decrease_with_width(stats):
    for e in (stats.k_qerr, stats.v_qerr):
        assert np.all(np.isfinite(e)) and np.all(e > 0)
        assert np.all(np.diff(e, axis=-1) < 0), e
    assert np.all(stats.k_qerr[..., -1] < 1e-3) and np.all(stats.v_qerr[..., -1] < 1e-3)


def test_attention_errors_finite_and_decrease_on_average(stats):
    for e in (stats.k_attn_err, stats.v_attn_err, stats.k_attn_err_head, stats.v_attn_err_head):
        assert np.all(np.isfinite(e)) and np.all(e >= 0)
    for e in (stats.k_attn_err, stats.v_attn_err):
        mean = e.mean(axis=0)  # over layers
        assert np.all(np.diff(mean) < 0), mean
        assert np.all(e[:, -1] < e[:, 0])


@pytest.mark.parametrize("axis,group", [("token", 8), ("channel", 32)])
def test_quantization_errors_decrease_other_groupings(tiny_model, windows, axis, group):
    s = analyze(tiny_model, windows, bits=(2, 4, 8), key_axis=axis, value_axis=axis, group_k=group,
                group_v=group, progress=False, batch=4)
    assert s.meta["key_axis"] == axis and s.meta["group_v"] == group
    for e in (s.k_qerr, s.v_qerr):
        assert np.all(np.diff(e, axis=-1) < 0)
    for e in (s.k_attn_err, s.v_attn_err):
        assert np.all(np.isfinite(e)) and np.all(np.diff(e.mean(axis=0)) < 0)


def test_batching_does_not_change_the_stats(tiny_model, windows, stats):
    """Sums over windows do not depend on how the windows are batched."""
    one = analyze(tiny_model, windows, bits=BITS, progress=False, batch=1, **KW)
    for f in dataclasses.fields(KVStats):
        if f.name != "meta":
            want = getattr(stats, f.name)
            if want is None:  # e.g. Fisher errors: these windows are too short to measure them
                assert getattr(one, f.name) is None, f.name
                continue
            # spectra come from float32 Gram matrices: the tail is only good to ~sqrt(eps)·||X||
            atol = 1e-3 * np.max(want) if f.name.endswith(("_sv", "_sv_prerope")) else 1e-6
            np.testing.assert_allclose(getattr(one, f.name), want, rtol=1e-4, atol=atol, err_msg=f.name)


@pytest.mark.parametrize("kw,match", [
    (dict(bits=()), "bits is empty"),
    (dict(bits=(2, 7)), "bits"),
    (dict(key_axis="channel", group_k=64), "not a multiple of the key group"),
    (dict(value_axis="channel", group_v=64), "not a multiple of the value group"),
    (dict(value_axis="token", group_v="2D"), "head_dim .* is not divisible"),
])
def test_analyze_rejects_bad_settings(tiny_model, windows, kw, match):
    args = dict(bits=(2, 4), **KW)
    args.update(kw)
    if args["group_v"] == "2D":  # a token-axis group larger than head_dim
        args["group_v"] = 2 * tiny_model.cfg.head_dim
    with pytest.raises(KvqError, match=match):
        analyze(tiny_model, windows, progress=False, **args)


# ------------------------------------------------------------------------------------ stats file
def test_stats_save_load_round_trip(stats, tmp_path):
    path = tmp_path / "stats.npz"
    stats.save(path)
    back = KVStats.load(path)
    for f in dataclasses.fields(KVStats):
        a, b = getattr(stats, f.name), getattr(back, f.name)
        if f.name == "meta":
            assert a == b
        else:
            np.testing.assert_array_equal(a, b, err_msg=f.name)
    assert back.model_name == stats.model_name and back.bits_tuple == BITS


# ------------------------------------------------------------------------------------ allocation
@pytest.mark.parametrize("method", ["sensitivity", "norm", "weight-norm"])
def test_allocated_plan_fits_the_model(stats, tiny_model, tmp_path, method):
    cfg = tiny_model.cfg
    a = allocate_detailed(stats, 3.0, method=method, residual=32, sink=4, **KW)
    plan = a.plan
    assert plan.model == cfg.name and plan.model_layers == cfg.n_layers == plan.n_layers
    assert plan.mean_data_bits() <= 3.0 + 1e-12 and a.spent <= 3.0 + 1e-12
    assert all(float(s.bits) in BITS for s in plan.keys + plan.values)
    assert all(s.axis == "channel" and s.group == GROUP for s in plan.keys + plan.values)
    plan.validate(cfg)
    # JSON round trip, as a string and as a file, and as a --kv argument
    assert KVPlan.from_json(plan.to_json()) == plan
    path = tmp_path / f"{method}.json"
    plan.save(path)
    assert KVPlan.load(path) == plan
    assert json.loads(path.read_text())["model"] == cfg.name
    assert parse_kv(str(path), cfg.n_layers) == plan
    # the cache accepts it
    cache = init_cache(cfg, plan, 2, 64)
    assert cache.capacity == 64 and len(cache.layers) == cfg.n_layers
    assert cache.nbytes() > 0


def test_model_runs_with_the_allocated_plan(stats, tiny_model):
    """Prefill past the recent window (so blocks are quantized), then decode steps through the plan."""
    cfg = tiny_model.cfg
    plan = allocate(stats, 3.0, residual=32, sink=4, **KW)
    step = jax.jit(lambda m, t, c: m(t, c))
    toks = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 48)), jnp.int32)
    logits, cache = step(tiny_model, toks, init_cache(cfg, plan, 2, 64))
    for t in range(2):
        logits, cache = step(tiny_model, toks[:, t: t + 1], cache)
    assert np.all(np.isfinite(np.asarray(logits))) and np.asarray(cache.lengths).tolist() == [50, 50]


def test_more_budget_never_worse(stats):
    lo = allocate_detailed(stats, 2.0, **KW)
    hi = allocate_detailed(stats, 6.0, **KW)
    assert hi.total_err <= lo.total_err
    assert hi.plan.mean_data_bits() >= lo.plan.mean_data_bits()


def test_plan_for_another_model_is_rejected(stats, tiny_model, tmp_path):
    cfg = tiny_model.cfg
    plan = allocate(stats, 3.0, **KW)
    other = plan.replace(model="some-other-model")
    with pytest.raises(KvqError, match=rf"plan was made for model 'some-other-model', not '{cfg.name}'"):
        other.validate(cfg)
    with pytest.raises(KvqError, match="plan was made for model"):
        init_cache(cfg, other, 1, 32)
    deeper = plan.replace(model_layers=cfg.n_layers + 3)
    with pytest.raises(KvqError, match=rf"plan was made for a {cfg.n_layers + 3}-layer model, "
                                       rf"'{cfg.name}' has {cfg.n_layers}"):
        deeper.validate(cfg)
    # a stats file of another model names the model in the plan
    renamed = dataclasses.replace(stats, meta={**stats.meta, "model": "renamed"})
    with pytest.raises(KvqError, match=f"'renamed', not '{cfg.name}'"):
        allocate(renamed, 3.0, **KW).validate(cfg)
    # a plan file with the wrong layer count is refused by --kv parsing
    path = tmp_path / "p.json"
    plan.save(path)
    with pytest.raises(KvqError, match=f"has {cfg.n_layers} layers, the model has {cfg.n_layers + 1}"):
        parse_kv(str(path), cfg.n_layers + 1)


# ------------------------------------------------------------------------------------ report
def test_report_on_tiny_model_stats(stats, tmp_path):
    plan = allocate(stats, 3.0, **KW)
    out = tmp_path / "report"
    md = write_report(stats, out, plans={"sensitivity": plan})
    assert md == out / "report.md" and md.is_file()
    text = md.read_text()
    assert text.startswith("# KV cache analysis: tiny-llama")
    assert "file=random" in text and "![spectra](spectra.png)" in text
    assert "| 1 |" in text  # one table row per layer
    for name in ("spectra.png", "norms.png", "qerr.png", "bits.png"):
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG), name
    assert (out / MARKER).is_file()
    # rewriting the same report directory is allowed
    write_report(stats, out)
    assert not (out / "bits.png").exists()
