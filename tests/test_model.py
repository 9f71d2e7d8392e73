"""The model with a dense cache: step-by-step decoding equals a full forward pass; ragged batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvq_jax.cache import init_cache
from kvq_jax.config import tiny_config
from kvq_jax.decode import generate
from kvq_jax.model import Transformer
from kvq_jax.plan import DenseKV
from kvq_jax.sampling import SamplerConfig


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_step_by_step_matches_full_forward(arch):
    cfg = tiny_config(arch)
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    if arch == "qwen2":  # make the biases matter
        for blk in model.layers:
            for lin in (blk.attn.wq, blk.attn.wk, blk.attn.wv):
                lin.b.set_value(jax.random.normal(jax.random.key(3), lin.b.get_value().shape) * 0.5)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
    full, _ = model(toks, init_cache(cfg, DenseKV(), 2, 16))
    cache = init_cache(cfg, DenseKV(), 2, 16)
    step = jax.jit(lambda m, t, c: m(t, c))
    for t in range(toks.shape[1]):
        logits, cache = step(model, toks[:, t: t + 1], cache)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), np.asarray(full[:, t]), atol=1e-4, rtol=1e-4)
    assert np.asarray(cache.lengths).tolist() == [12, 12]


def test_prefill_then_decode_matches_full_forward(tiny_model):
    cfg = tiny_model.cfg
    toks = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 10)), jnp.int32)
    full, _ = tiny_model(toks, init_cache(cfg, DenseKV(), 1, 10))
    _, cache = tiny_model(toks[:, :6], init_cache(cfg, DenseKV(), 1, 10))
    for t in range(6, 10):
        logits, cache = tiny_model(toks[:, t: t + 1], cache)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), np.asarray(full[:, t]), atol=1e-4, rtol=1e-4)


def test_ragged_batch_equals_one_at_a_time(tiny_model):
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 97, n).tolist() for n in (5, 11, 1, 8)]
    batch = generate(tiny_model, prompts, max_new_tokens=9, attention_impl="xla")
    for p, got in zip(prompts, batch.tokens):
        one = generate(tiny_model, [p], max_new_tokens=9, attention_impl="xla")
        assert got == one.tokens[0]


def test_generation_stops_at_eos():
    cfg = tiny_config()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    # Force EOS (id 2) to win everywhere: its embedding row dominates the tied LM head.
    emb = model.embed.get_value()
    model.embed.set_value(emb.at[2].set(emb[2] * 0 + 5.0))
    res = generate(model, [[5, 6, 7]], max_new_tokens=8)
    assert res.stopped_at_eos == [True]
    assert len(res.tokens[0]) < 8


def test_sampling_is_seeded_and_streams(tiny_model):
    seen = []
    kw = dict(max_new_tokens=6, sampler=SamplerConfig(temperature=1.0, top_k=20, top_p=0.9))
    a = generate(tiny_model, [[4, 5, 6]], seed=7, stream=lambda t, e: seen.append(int(t[0])), **kw)
    b = generate(tiny_model, [[4, 5, 6]], seed=7, **kw)
    assert a.tokens == b.tokens
    assert seen[: len(a.tokens[0])] == a.tokens[0]


def test_capacity_errors(tiny_model):
    from kvq_jax.errors import KvqError

    with pytest.raises(KvqError, match="exceeds"):
        generate(tiny_model, [[1] * 500], max_new_tokens=100)
    with pytest.raises(KvqError, match="empty prompt"):
        generate(tiny_model, [[]], max_new_tokens=4)


@pytest.mark.parametrize("kv", ["fp", "K4V2"])
@pytest.mark.parametrize("batch", [1, 2])
def test_decode_loop_updates_the_cache_in_place(tiny_model, kv, batch):
    """The compiled decode loop never copies a buffer that grows with the context (dense K/V, packed
    words): a per-row write that re-read the old token once made XLA copy every dense buffer four
    times per step at batch 1. (The fixed-size recent ring of a quantized layer is still copied.)"""
    import re

    from kvq_jax.bench import _decode
    from kvq_jax.cache import DenseLayer
    from kvq_jax.plan import parse_kv

    cfg = tiny_model.cfg
    cache = init_cache(cfg, parse_kv(kv, cfg.n_layers), batch, 1000)
    big = [x for lay in cache.layers
           for x in ((lay.k, lay.v) if isinstance(lay, DenseLayer) else (lay.k.words, lay.v.words))]
    graphdef, state = nnx.split(tiny_model)
    tok = jnp.zeros((batch,), jnp.int32)
    hlo = _decode.lower(graphdef, state, tok, cache, steps=3, impl="xla").compile().as_text()
    for x in big:
        shape = f"{jnp.dtype(x.dtype).name.replace('float', 'f').replace('uint', 'u')}[{','.join(map(str, x.shape))}]"
        copies = re.findall(re.escape(shape) + r"\{[0-9,]*\} copy\(", hlo)
        assert not copies, f"{len(copies)} copies of {shape} in the decode loop"
