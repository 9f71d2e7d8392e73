"""Sharded inference on 8 CPU devices equals one device: tokens, logits, cache layout, HLO."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvq_jax.cache import QuantLayer, cache_bytes, init_cache
from kvq_jax.config import tiny_config
from kvq_jax.decode import generate
from kvq_jax.errors import KvqError
from kvq_jax.model import Transformer
from kvq_jax.plan import DenseKV, KVPlan, parse_kv
from kvq_jax.sharding import bytes_per_device, cache_specs, make_mesh, param_axes, prepare

# SmolLM2's head layout in small: 3 KV heads (so model=3 shards them), 2 query heads each.
CFG = tiny_config(n_heads=6, n_kv_heads=3, head_dim=64, dim=96, n_layers=3, max_seq_len=2048, vocab_size=101)
GEMMA = tiny_config("gemma3", n_heads=4, n_kv_heads=1, head_dim=64, dim=64, n_layers=3, max_seq_len=2048,
                    vocab_size=101, sliding_window=48, local_layers=(0, 1))
MESHES = [dict(data=4), dict(data=2, seq=4), dict(model=3), dict(seq=8)]
# fp runs on every mesh; each quantized plan on two, the two plans on opposite pairs, so every mesh
# sees a quantized cache (compiling one program per plan and mesh is most of this session's time).
PLAN_MESHES = {"fp": MESHES, "K4V2": [dict(model=3), dict(seq=8)], "mixed": [dict(data=4), dict(data=2, seq=4)]}


def mixed() -> KVPlan:
    a, b = parse_kv("K4V2", 3), parse_kv("K2V4", 3, key_axis="token")
    return KVPlan(keys=(a.keys[0], b.keys[1], parse_kv("K8V8", 3).keys[2]),
                  values=(a.values[0], b.values[1], parse_kv("K3V3", 3).values[2]), residual=64,
                  rotate=("prerope/hadamard", "hadamard", "prerope"))  # pre-RoPE keys: positions on every slice


PLANS = {"fp": DenseKV("float32"), "K4V2": parse_kv("K4V2", 3), "mixed": mixed()}


def prompts(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 100, n).tolist() for n in (300, 17, 150, 90)]  # ragged


def fresh(cfg=CFG) -> Transformer:
    return Transformer(cfg, rngs=nnx.Rngs(0))


def test_eight_devices() -> None:
    assert len(jax.devices()) == 8


def body_spec(cache) -> tuple:
    """The sharding of the last (global) layer's token-sharded array, one entry per dimension."""
    layer = cache.layers[-1]
    spec = tuple((layer.k.words if isinstance(layer, QuantLayer) else layer.k).sharding.spec)
    return spec + (None,) * (4 - len(spec))


@pytest.mark.parametrize("plan", list(PLANS))
def test_generate_same_tokens_on_every_mesh(plan: str) -> None:
    kv = PLANS[plan]
    ref = generate(fresh(), prompts(), kv=kv, max_new_tokens=12)
    sharded = {}
    for m in PLAN_MESHES[plan]:
        got = generate(fresh(), prompts(), kv=kv, max_new_tokens=12, mesh=make_mesh(**m))
        assert got.tokens == ref.tokens, (plan, m)
        sharded[tuple(m.items())] = got
    if plan != "mixed":
        return
    # A second turn continues the sharded cache: same tokens, and the cache stays sharded.
    turn = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14]]
    t1 = generate(fresh(), turn, cache=ref.cache, max_new_tokens=8)
    t2 = generate(fresh(), turn, cache=sharded[(("data", 2), ("seq", 4))].cache, max_new_tokens=8)
    assert t1.tokens == t2.tokens
    assert body_spec(t2.cache) == ("data", None, "seq", None)


@pytest.mark.parametrize("plan", ["fp", "K4V2"])
def test_eight_rows_on_data_8(plan: str) -> None:
    """A pmap-style data-parallel run: one row per device, the tokens of one device."""
    rows = prompts(1) + prompts(2)
    ref = generate(fresh(), rows, kv=PLANS[plan], max_new_tokens=10)
    got = generate(fresh(), rows, kv=PLANS[plan], max_new_tokens=10, mesh=make_mesh(data=8))
    assert got.tokens == ref.tokens
    assert got.cache.lengths.sharding.spec == jax.sharding.PartitionSpec("data")


def test_gemma3_local_and_global_layers_on_a_mesh() -> None:
    """Sliding-window rings (replicated along seq) and a global layer split along seq."""
    kv = parse_kv("K4V2", 3)
    ps = prompts(1)
    ref = generate(fresh(GEMMA), ps, kv=kv, max_new_tokens=12)
    for m in (dict(data=2, seq=4),):  # seq=8: test_chunked_prefill_on_meshes
        got = generate(fresh(GEMMA), ps, kv=kv, max_new_tokens=12, mesh=make_mesh(**m))
        assert got.tokens == ref.tokens, m
        assert got.cache.layers[0].shards == 1 and got.cache.layers[2].shards == m["seq"]


@pytest.mark.parametrize("cfg", ["llama", "gemma3"])
def test_chunked_prefill_on_meshes(cfg: str) -> None:
    """Exact chunked prefill (staged, then absorbed into the sharded cache) and cached chunks give
    the tokens they give on one device."""
    c = CFG if cfg == "llama" else GEMMA
    kv, ps = parse_kv("K4V2", 3), prompts(3)
    # Each protocol on one mesh per model, the two models on opposite ones: every pairing of
    # protocol, mesh and local/global layers is covered once.
    meshes = {"exact": dict(seq=8), "cached": dict(data=2, seq=4)}
    if cfg == "gemma3":
        meshes = {"exact": dict(data=2, seq=4), "cached": dict(seq=8)}
    for protocol, m in meshes.items():
        ref = generate(fresh(c), ps, kv=kv, max_new_tokens=8, prefill_chunk=64, prefill_protocol=protocol)
        got = generate(fresh(c), ps, kv=kv, max_new_tokens=8, prefill_chunk=64, prefill_protocol=protocol,
                       mesh=make_mesh(**m))
        assert got.tokens == ref.tokens, (cfg, protocol, m)
        if protocol == "exact":  # exact chunks on a mesh give one shot's tokens
            assert got.tokens == generate(fresh(c), ps, kv=kv, max_new_tokens=8).tokens


def _logits_steps(model, kv, mesh, tokens, steps=6):
    """Prefill logits `[B, T, V]` then `steps` decode-step logits, through one (sharded) cache."""
    cache = init_cache(model.cfg, kv, tokens.shape[0], 512, mesh=mesh)
    g, st = nnx.split(model)
    fwd = jax.jit(lambda st, x, c, n: nnx.merge(g, st)(x, c, n))
    lg, cache = fwd(st, tokens[:, :-steps], cache, jnp.full((tokens.shape[0],), tokens.shape[1] - steps))
    out = [np.asarray(lg)]
    for i in range(steps, 0, -1):
        j = tokens.shape[1] - i
        lg, cache = fwd(st, tokens[:, j:j + 1], cache, jnp.ones((tokens.shape[0],), jnp.int32))
        out.append(np.asarray(lg))
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("plan", ["fp", "mixed"])
def test_logits_match_one_device(plan: str) -> None:
    tokens = jnp.asarray(np.random.default_rng(2).integers(3, 100, (4, 260)), jnp.int32)
    ref = _logits_steps(fresh(), PLANS[plan], None, tokens)
    # fp on every mesh; the quantized plan where its layout differs most (heads split, tokens split)
    for m in MESHES if plan == "fp" else [dict(model=3), dict(data=2, seq=4)]:
        model = fresh()
        mesh = make_mesh(**m)
        prepare(model, mesh, 4)
        got = _logits_steps(model, PLANS[plan], mesh, tokens)
        if plan != "fp" and m.get("model", 1) > 1:
            # Sharded heads sum W_o's products in another order; a K/V value that lands within a
            # rounding error of a quantization step can then take the neighbouring code. Such flips
            # are rare and small; everything else agrees to 1e-5.
            diff = np.abs(got - ref)
            assert np.mean(diff > 1e-5 + 1e-5 * np.abs(ref)) < 0.02 and diff.max() < 5e-3, m
        else:
            np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5, err_msg=str(m))


def test_evaluate_on_a_mesh_equals_one_device() -> None:
    from kvq_jax.evaluate import evaluate

    class Tok:  # text_windows only needs encode and uses_bos
        uses_bos = False
        bos_id = None

        def encode(self, text: str, add_bos: bool = False) -> list[int]:
            return [3 + b % 97 for b in text.encode()]

    text = "".join(chr(97 + (i * 7) % 26) for i in range(4000))
    kw = dict(context=192, windows=4, prefill=96, progress=True)
    ref = evaluate(fresh(), Tok(), text, kv=PLANS["K4V2"], **kw)
    got = evaluate(fresh(), Tok(), text, kv=PLANS["K4V2"], mesh=make_mesh(data=2, seq=4), **kw)
    for key in ("ppl", "ppl_fp", "kl_vs_fp", "top1_agreement"):
        assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key
    assert got["mesh"] == {"data": 2, "model": 1, "seq": 4}


def test_parameters_and_cache_follow_the_rules() -> None:
    from kvq_jax.model import param_table

    model = fresh()
    mesh = make_mesh(data=2, model=3)
    prepare(model, mesh, 4)
    table = param_table(model)
    assert table["layers.0.wq"].get_value().sharding.spec == jax.sharding.PartitionSpec(None, "model")
    assert table["layers.0.wo"].get_value().sharding.spec == jax.sharding.PartitionSpec("model", None)
    assert table["layers.1.w_down"].get_value().sharding.spec == jax.sharding.PartitionSpec(None, None) \
        or CFG.hidden_dim % 3 == 0
    for name, param in table.items():
        axes = param_axes(name)
        spec = param.get_value().sharding.spec
        for logical, got, dim in zip(axes, tuple(spec) + (None,) * 2, param.get_value().shape):
            want = {"heads": "model", "kv_heads": "model", "mlp": "model", "vocab": "model"}.get(logical)
            units = {"heads": CFG.n_heads, "kv_heads": CFG.n_kv_heads}.get(logical, dim)
            assert got == (want if want and units % 3 == 0 else None), (name, logical)
    cache = init_cache(CFG, PLANS["mixed"], 4, 1000, mesh=make_mesh(data=2, model=3))
    specs = jax.tree_util.tree_leaves(cache_specs(cache))
    for leaf, spec in zip(jax.tree_util.tree_leaves(cache), specs):
        assert leaf.sharding.spec == spec
    assert all(s[0] == "data" and (len(s) < 2 or s[1] == "model") for s in specs[:-1])


@pytest.mark.parametrize("seq", [2, 4, 8])
def test_bytes_per_device_split_the_body(seq: int) -> None:
    """Each seq device holds 1/seq of every global body, recent ring (and dense buffer); sinks and
    sliding-window layers are replicated along seq."""
    kv = parse_kv("K4V2", 3)
    cache = init_cache(GEMMA, kv, 2, 2000, mesh=make_mesh(seq=seq))
    per = bytes_per_device(cache)
    assert len(set(per.values())) == 1
    assert cache_bytes(GEMMA, kv, 2, 2000, mesh=make_mesh(seq=seq)) == next(iter(per.values()))
    glob = cache.layers[2]
    assert glob.residual % seq == 0
    split = sum(x.nbytes for x in jax.tree_util.tree_leaves((glob.k, glob.v, glob.recent_k, glob.recent_v)))
    replicated = cache.nbytes() - split
    assert next(iter(per.values())) == split // seq + replicated
    # Each slice is sized to a whole packing unit: the split body holds less than one unit per slice
    # more than the capacity needs.
    from kvq_jax.cache import chunk_tokens

    unit = chunk_tokens(kv.keys[2], kv.values[2], kv.block(2), 1)
    need = 2000 - glob.sink
    assert need <= glob.body_capacity < need + seq * unit


def test_decode_hlo_gathers_no_cache_buffer() -> None:
    """Only the small partial results (out, lse) cross devices, and a split recent ring when a block
    is flushed (R tokens, whatever the context): no all-gather as large as a body slice."""
    from kvq_jax import bench

    for m in (dict(data=2, seq=4), dict(seq=8), dict(model=3)):
        mesh = make_mesh(**m)
        model = fresh()
        prepare(model, mesh, 2)
        cache = init_cache(CFG, PLANS["K4V2"], 2, 16384, mesh=mesh)
        g, st = nnx.split(model)
        hlo = bench._decode.lower(g, st, jnp.zeros((2,), jnp.int32), cache, steps=2, impl="xla").compile().as_text()
        smallest = min(s.data.size for s in cache.layers[-1].k.words.addressable_shards)
        for shape in re.findall(r"= \w+\[([\d,]*)\]\S* all-gather\(", hlo):
            size = int(np.prod([int(x) for x in shape.split(",") if x] or [1]))
            assert size < smallest, (m, shape)


def test_stream_callback_on_a_mesh() -> None:
    seen = []
    got = generate(fresh(), prompts(), kv=PLANS["K4V2"], max_new_tokens=6, mesh=make_mesh(data=4),
                   stream=lambda tok, emit: seen.append(np.asarray(tok).copy()))
    assert len(seen) >= 6 and [int(s[0]) for s in seen[:6]] == got.tokens[0][:6]


def test_bad_meshes() -> None:
    with pytest.raises(KvqError, match="needs 16 devices, 8 available"):
        make_mesh(data=16)
    with pytest.raises(KvqError, match="batch 3 does not divide"):
        generate(fresh(), prompts()[:3], max_new_tokens=2, mesh=make_mesh(data=2))
    with pytest.raises(KvqError, match="divides neither"):
        generate(fresh(), prompts(), max_new_tokens=2, mesh=make_mesh(model=4))
    with pytest.raises(KvqError, match="positive integers"):
        make_mesh(seq=0)
