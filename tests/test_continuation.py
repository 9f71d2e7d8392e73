"""Continuing a cache: any T >= 1 new tokens at any fill (kvq_jax.attention / cache.write).

- Dense fp32: one shot, chunked (any sizes, ragged rows, rows that skip a call) and token by token give
  the same logits (1e-4) and the same cache.
- Quantized: what a layer stores (codes, scales, zeros, sink, live ring slots) depends only on its
  K/V inputs, never on the chunking: checked on `cache.write` with fixed K/V streams and on a
  one-layer model, for K4V2, a mixed plan with a 16-bit side, hadamard, keys before RoPE, sink 0 and
  a window-less all-16-bit plan.
- A row with `n_new == 0` is left bit for bit as it was; overflowing the capacity is one clear line.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvq_jax import cache as kvcache
from kvq_jax.cache import DenseLayer, QuantLayer, init_cache
from kvq_jax.config import tiny_config
from kvq_jax.decode import generate
from kvq_jax.errors import KvqError
from kvq_jax.model import Transformer
from kvq_jax.packing import unpack
from kvq_jax.plan import DenseKV, KVPlan, QuantSpec


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _call(graphdef, state, tokens, cache, n_new):
    return nnx.merge(graphdef, state)(tokens, cache, n_new, attention_impl="xla")


def schedule(n: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """Per-call n_new `[B]`: row b takes `sizes[(call + b) % len(sizes)]` tokens per call until it has
    fed n[b] (so rows are ragged within a call and some rows sit calls out with 0)."""
    fed, out, call = np.zeros_like(n), [], 0
    while (fed < n).any():
        want = np.array([sizes[(call + b) % len(sizes)] for b in range(len(n))])
        step = np.clip(np.minimum(want, n - fed), 0, None)
        out.append(step)
        fed += step
        call += 1
    return out


def feed(model, cache, tokens: np.ndarray, calls: list[np.ndarray]):
    """Runs the calls; returns each row's logits of its real tokens `[n_b, V]` and the cache."""
    graphdef, state = nnx.split(model)
    fed = np.zeros(tokens.shape[0], int)
    logits = [[] for _ in range(tokens.shape[0])]
    for n_new in calls:
        t = max(1, int(n_new.max()))
        x = np.zeros((tokens.shape[0], t), np.int32)
        for b in range(tokens.shape[0]):
            x[b, : n_new[b]] = tokens[b, fed[b]: fed[b] + n_new[b]]
        out, cache = _call(graphdef, state, jnp.asarray(x), cache, jnp.asarray(n_new, jnp.int32))
        out = np.asarray(out)
        for b in range(tokens.shape[0]):
            logits[b].append(out[b, : n_new[b]])
        fed += n_new
    return [np.concatenate(l) for l in logits], cache


@pytest.fixture(scope="module")
def two_layer():
    return Transformer(tiny_config(), rngs=nnx.Rngs(3))


@pytest.mark.parametrize("sizes,kv", [([1], "fp"), ([7], "fp"), ([64], "fp"), ([5, 1, 16, 0], "fp"),
                                      ([333], "fp"), ([9, 2], "16-bit plan, residual 0")])
def test_dense_chunked_equals_one_shot(two_layer, sizes, kv):
    cfg = two_layer.cfg
    kv = DenseKV() if kv == "fp" else KVPlan.uniform(cfg.n_layers, 16, 16, residual=0, sink=0)
    n = np.array([300, 170, 1])
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (3, 300)).astype(np.int32)
    cap = 320
    one, c_one = feed(two_layer, init_cache(cfg, kv, 3, cap), tokens, [n])
    got, c_got = feed(two_layer, init_cache(cfg, kv, 3, cap), tokens, schedule(n, sizes))
    for a, b in zip(got, one):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    assert np.asarray(c_got.lengths).tolist() == n.tolist()
    for la, lb in zip(c_got.layers, c_one.layers):
        np.testing.assert_allclose(np.asarray(la.k), np.asarray(lb.k), atol=1e-5)
        np.testing.assert_allclose(np.asarray(la.v), np.asarray(lb.v), atol=1e-5)


def test_continuing_generation_equals_generating_the_concatenation(two_layer):
    """generate(cache=previous.cache) on a dense fp32 cache == generate on the whole history."""
    rng = np.random.default_rng(1)
    p1 = [rng.integers(3, 97, k).tolist() for k in (9, 30)]
    p2 = [rng.integers(3, 97, k).tolist() for k in (12, 4)]
    first = generate(two_layer, p1, max_new_tokens=6, capacity=128, attention_impl="xla")
    history = [a + r for a, r in zip(p1, first.tokens)]
    assert np.asarray(first.cache.lengths).tolist() == [len(h) for h in history]
    again = generate(two_layer, p2, max_new_tokens=7, cache=first.cache, attention_impl="xla",
                     prefill_chunk=5)
    scratch = generate(two_layer, [h + q for h, q in zip(history, p2)], max_new_tokens=7, capacity=128,
                       attention_impl="xla")
    assert again.tokens == scratch.tokens


# ----------------------------------------------------------------------------- quantized invariance

S, R = 4, 64


def _plans():
    ch = lambda b, g=32: QuantSpec(b, "channel", g)
    tk = lambda b, g=32: QuantSpec(b, "token", g)
    return {
        "K4V2": KVPlan((ch(4),), (tk(2),), residual=R, sink=S),
        "K4V2 bf16 window": KVPlan((ch(4),), (tk(2),), residual=R, sink=S, window_dtype="bfloat16"),
        "K16V2": KVPlan((QuantSpec(16),), (tk(2),), residual=R, sink=S),
        "K3V1.58 hadamard": KVPlan((tk(3),), (ch(1.58),), residual=R, sink=S, rotate="hadamard"),
        "K2V4 sink 0": KVPlan((ch(2, 64),), (tk(4, 64),), residual=R, sink=0),
        "16-bit hadamard": KVPlan((QuantSpec(16),), (QuantSpec(16),), residual=R, sink=S, rotate="hadamard"),
        "K2V4 prerope": KVPlan((ch(2),), (tk(4),), residual=R, sink=S, rotate="prerope"),
        "K2V2 prerope/hadamard": KVPlan((ch(2),), (tk(2),), residual=R, sink=S, rotate="prerope/hadamard"),
    }


def _stored(lay: QuantLayer, lengths: np.ndarray) -> list[np.ndarray]:
    """Everything a reader depends on: sink, packed body (words, scales, zeros), the live ring slots."""
    lay = jax.device_get(lay)
    out = [np.asarray(lay.sink_k), np.asarray(lay.sink_v)]
    for t in (lay.k, lay.v):
        out += [np.asarray(t.words), np.asarray(t.scale, np.float32), np.asarray(t.zero, np.float32)]
    q = np.asarray(kvcache.quantized_count(lay, jnp.asarray(lengths, jnp.int32)))
    m = np.maximum(lengths - lay.sink, 0)
    for b in range(len(lengths)):
        slots = np.arange(q[b], m[b]) % max(lay.residual, 1)
        out += [np.asarray(lay.recent_k)[b][:, slots], np.asarray(lay.recent_v)[b][:, slots]]
    return out


@jax.jit
def _write(lay, k, v, lengths, n_new):
    return kvcache.write(lay, k, v, lengths, n_new)


@pytest.mark.parametrize("name", list(_plans()))
def test_stored_arrays_do_not_depend_on_the_chunking(name):
    plan = _plans()[name]
    cfg = tiny_config(n_layers=1, n_heads=2, n_kv_heads=2, head_dim=64)
    n = np.array([700, 451])
    rng = np.random.default_rng(5)
    xk = rng.standard_normal((2, 2, 700, 64)).astype(np.float32) * np.exp(rng.normal(0, 1, (1, 1, 1, 64)))
    xv = rng.standard_normal((2, 2, 700, 64)).astype(np.float32)
    states = {}
    for sizes in ([700], [333], [64], [7], [1], [5, 0, 130, 1]):
        lay = init_cache(cfg, plan, 2, 704).layers[0]
        fed = np.zeros(2, int)
        for n_new in schedule(n, sizes):
            t = max(1, int(n_new.max()))
            k = np.zeros((2, 2, t, 64), np.float32)
            v = np.zeros_like(k)
            for b in range(2):
                k[b, :, : n_new[b]] = xk[b, :, fed[b]: fed[b] + n_new[b]]
                v[b, :, : n_new[b]] = xv[b, :, fed[b]: fed[b] + n_new[b]]
            lay = _write(lay, jnp.asarray(k), jnp.asarray(v), jnp.asarray(fed, jnp.int32),
                         jnp.asarray(n_new, jnp.int32))
            fed += n_new
        states[str(sizes)] = _stored(lay, n)
    ref = states.pop("[700]")
    for key, got in states.items():
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b, err_msg=f"{name}: chunks {key}")


# Three plans that between them pass every model-side transform (bf16 window, Hadamard, pre-RoPE);
# the test above covers every plan's writer without the model.
@pytest.mark.parametrize("name", ["K4V2 bf16 window", "K3V1.58 hadamard", "K2V4 prerope"])
def test_one_layer_model_stores_the_same_whatever_the_chunking(name):
    """Through the model (projections, RoPE, rotation): chunkings 1, 7, 333 and T store alike.

    XLA:CPU's matrix products round differently for different T, so the model's K/V themselves differ
    in the last bit between chunkings (identical inputs store identical arrays: the test above). Here
    the full-precision parts and scales agree to float32 rounding, and codes only flip where a value
    sits on a rounding boundary.
    """
    plan = _plans()[name]
    cfg = tiny_config(n_layers=1)
    model = Transformer(cfg, rngs=nnx.Rngs(4))
    n = np.array([500])
    tokens = np.random.default_rng(2).integers(3, cfg.vocab_size, (1, 500)).astype(np.int32)
    ref = None
    for sizes in ([500], [333], [7], [1]):
        logits, cache = feed(model, init_cache(cfg, plan, 1, 512), tokens, schedule(n, sizes))
        assert np.isfinite(logits[0]).all()
        if ref is None:
            ref = cache.layers[0]
            continue
        assert_stored_close(cache.layers[0], ref, n, f"{name}: chunks {sizes}")


def test_bf16_window_stores_the_sink_and_ring_in_bf16():
    cfg = tiny_config(n_layers=1)
    model = Transformer(cfg, rngs=nnx.Rngs(4))
    tokens = np.random.default_rng(2).integers(3, cfg.vocab_size, (1, 300)).astype(np.int32)
    n = np.array([300])
    out = {}
    for name in ("K4V2", "K4V2 bf16 window"):
        logits, cache = feed(model, init_cache(cfg, _plans()[name], 1, 320), tokens, schedule(n, [64]))
        out[name] = (np.asarray(logits), cache)
    lay, ref = out["K4V2 bf16 window"][1].layers[0], out["K4V2"][1].layers[0]
    assert {x.dtype for x in (lay.sink_k, lay.sink_v, lay.recent_k, lay.recent_v)} == {jnp.dtype(jnp.bfloat16)}
    assert lay.k.words.dtype == ref.k.words.dtype and ref.recent_k.dtype == jnp.float32
    window = sum(x.size for x in (ref.sink_k, ref.sink_v, ref.recent_k, ref.recent_v))
    assert out["K4V2"][1].nbytes() - out["K4V2 bf16 window"][1].nbytes() == 2 * window
    np.testing.assert_allclose(np.asarray(lay.recent_k, np.float32), np.asarray(ref.recent_k), rtol=1e-2, atol=1e-2)
    # Rounding the window to bf16 costs little next to 4/2-bit quantization: its error vs fp stays
    # close to that of the float32 window.
    fp = np.asarray(feed(model, init_cache(cfg, DenseKV("float32"), 1, 320), tokens, schedule(n, [64]))[0])
    err = {k: float(np.sqrt(np.mean((v[0] - fp) ** 2))) for k, v in out.items()}
    assert np.isfinite(out["K4V2 bf16 window"][0]).all()
    assert err["K4V2 bf16 window"] < 1.25 * err["K4V2"], err


def assert_stored_close(lay, ref, n: np.ndarray, what: str) -> None:
    """Stored arrays equal up to float32 rounding of the inputs: values and scales to 1e-5, codes
    off by at most one level, and only at a rounding boundary (a small fraction of them)."""
    lay, ref = jax.device_get(lay), jax.device_get(ref)
    for a, b in zip(_stored(lay, n), _stored(ref, n)):
        if a.dtype != np.uint32:  # packed words: compared as codes below
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=what)
    for ta, tb in ((lay.k, ref.k), (lay.v, ref.v)):
        if ta.spec.dense:
            continue
        a, b = np.asarray(unpack(ta.words, ta.spec.bits)), np.asarray(unpack(tb.words, tb.spec.bits))
        assert np.abs(a.astype(int) - b).max(initial=0) <= 1, what
        assert np.mean(a != b) < 2e-3, f"{what}: {np.mean(a != b):.4f} of codes differ"


def test_per_layer_rotation(two_layer):
    """A plan rotating layer 0 only: layer 0 stores what an all-rotated plan stores, layer 1 is a
    plain layer; a rotated 16-bit layer is exact (the rotation is orthonormal)."""
    cfg = two_layer.cfg
    ch, tk = QuantSpec(4, "channel", 32), QuantSpec(2, "token", 32)
    n = np.array([150])
    tokens = np.random.default_rng(7).integers(3, cfg.vocab_size, (1, 150)).astype(np.int32)
    run = lambda plan: feed(two_layer, init_cache(cfg, plan, 1, 192), tokens, schedule(n, [50]))
    mixed = KVPlan((ch, ch), (tk, tk), residual=32, sink=S, rotate=("hadamard", "none"))
    _, c_mixed = run(mixed)
    _, c_all = run(mixed.replace(rotate="hadamard"))
    assert [lay.rotate for lay in c_mixed.layers] == ["hadamard", "none"]
    for a, b in zip(_stored(c_mixed.layers[0], n), _stored(c_all.layers[0], n)):
        np.testing.assert_array_equal(a, b)
    dense = KVPlan((QuantSpec(16), QuantSpec(16)), (QuantSpec(16), QuantSpec(16)), residual=64, sink=S,
                   rotate=("hadamard", "none"))
    got, c_dense = run(dense)
    fp, _ = run(DenseKV("float32"))
    assert isinstance(c_dense.layers[0], QuantLayer) and isinstance(c_dense.layers[1], DenseLayer)
    np.testing.assert_allclose(got[0], fp[0], rtol=1e-4, atol=1e-4)


def test_mixed_plan_with_a_16bit_layer_continues(two_layer):
    """Layer 0 quantized, layer 1 16-bit (dense): chunked prefill runs, layer 0 stores as one shot does."""
    cfg = two_layer.cfg
    plan = KVPlan((QuantSpec(4, "channel", 32), QuantSpec(16)), (QuantSpec(2, "token", 32), QuantSpec(16)),
                  residual=32, sink=S)
    n = np.array([200, 90])
    tokens = np.random.default_rng(3).integers(3, cfg.vocab_size, (2, 200)).astype(np.int32)
    one, c_one = feed(two_layer, init_cache(cfg, plan, 2, 256), tokens, [n])
    got, c_got = feed(two_layer, init_cache(cfg, plan, 2, 256), tokens, schedule(n, [17, 40]))
    assert isinstance(c_got.layers[1], DenseLayer)
    assert_stored_close(c_got.layers[0], c_one.layers[0], n, "layer 0")
    # Chunks attend to the quantized earlier chunks, a one-shot prefill to the prompt at full precision:
    # the logits differ, but only a little at 4/2 bits.
    for a, b in zip(got, one):
        assert np.isfinite(a).all() and np.abs(a - b).max() < 0.5


# ----------------------------------------------------------------------------- n_new == 0, overflow


@pytest.mark.parametrize("kv", ["K4V2", "fp"])
def test_rows_with_no_new_tokens_are_left_exactly_as_they_were(two_layer, kv):
    """Decode steps with n_new = [1, 0]: row 1 never changes (it once re-ran a flush and added codes
    onto live digits), and it then continues exactly like a row that never sat out."""
    from kvq_jax.plan import parse_kv

    cfg = two_layer.cfg
    plan = parse_kv(kv, cfg.n_layers, residual=32, group_k=32, group_v=32)
    tokens = np.random.default_rng(4).integers(3, cfg.vocab_size, (2, 300)).astype(np.int32)
    _, cache = feed(two_layer, init_cache(cfg, plan, 2, 320), tokens, [np.array([100, 100])])
    before = jax.device_get(cache)
    calls = [np.array([1, 0])] * 150
    _, cache = feed(two_layer, cache, tokens[:, 100:], calls)
    after = jax.device_get(cache)
    for a, b in zip(jax.tree_util.tree_leaves(after.layers), jax.tree_util.tree_leaves(before.layers)):
        np.testing.assert_array_equal(np.asarray(a)[1], np.asarray(b)[1])
    assert np.asarray(after.lengths).tolist() == [250, 100]
    # Row 1 then continues as a cache that never sat out does.
    lone, c_lone = feed(two_layer, init_cache(cfg, plan, 1, 320), tokens[1:], [np.array([100]), *[np.array([1])] * 30])
    tail, cache = feed(two_layer, cache, np.stack([tokens[0, 250:280], tokens[1, 100:130]]), [np.array([0, 1])] * 30)
    np.testing.assert_allclose(tail[1], lone[0][100:], atol=1e-5)


def test_capacity_overflow_is_one_line_before_launch(two_layer):
    cfg = two_layer.cfg
    cache = init_cache(cfg, DenseKV(), 1, 40)
    _, cache = two_layer(jnp.ones((1, 30), jnp.int32), cache)
    with pytest.raises(KvqError, match=r"row 0: 30 cached \+ 11 new tokens = 41 exceeds the cache capacity \(40 positions; 10 left\)") as e:
        two_layer(jnp.ones((1, 11), jnp.int32), cache)
    assert "\n" not in str(e.value)
    res = generate(two_layer, [[5, 6, 7]], max_new_tokens=4, capacity=16, attention_impl="xla")
    with pytest.raises(KvqError, match=r"row 0: 7 cached \+ 6 new tokens \+ max_new_tokens 4 = 17 exceeds "
                                       r"the cache capacity \(16 positions; 9 left\)"):
        generate(two_layer, [[1] * 6], max_new_tokens=4, cache=res.cache)
    with pytest.raises(KvqError, match="another kv plan"):
        generate(two_layer, [[1]], max_new_tokens=1, cache=res.cache, kv=KVPlan.uniform(cfg.n_layers, 4, 2))
    with pytest.raises(KvqError, match="prefill_chunk must be 0"):
        generate(two_layer, [[1]], max_new_tokens=1, prefill_chunk=-1)
