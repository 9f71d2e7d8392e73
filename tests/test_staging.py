"""Exact chunked prefill (kvq_jax.staging): chunks of a prompt attend to each other at full precision,
so chunked prefill gives the logits and the stored cache of one-shot prefill, for global and
sliding-window layers, mixed plans and rotations; "cached" is the other protocol; bad values are one
line."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from kvq_jax.cache import DenseLayer, init_cache
from kvq_jax.config import tiny_config
from kvq_jax.decode import generate, prefill
from kvq_jax.errors import KvqError
from kvq_jax.model import Transformer
from kvq_jax.plan import KVPlan, QuantSpec, parse_kv
from kvq_jax.staging import check_protocol

LLAMA = tiny_config(n_layers=2)
GEMMA = tiny_config("gemma3", n_heads=4, n_kv_heads=1, head_dim=64, dim=64, n_layers=3, max_seq_len=2048,
                    vocab_size=101, sliding_window=48, local_layers=(0, 1))


def mixed(n_layers: int) -> KVPlan:
    a = parse_kv("K4V2", n_layers, residual=64)
    keys = (QuantSpec(16),) + a.keys[1:]
    return dataclasses.replace(a, keys=keys, rotate=("hadamard",) + ("none",) * (n_layers - 1))


def prompts(cfg, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, cfg.vocab_size, n).tolist() for n in (300, 141, 17)]  # ragged


def run(model, kv, chunk: int, protocol: str | None):
    cache = init_cache(model.cfg, kv, 3, 400)
    logits, cache = prefill(model, prompts(model.cfg), cache, chunk=chunk, attention_impl="xla", protocol=protocol)
    return np.asarray(logits), cache


@pytest.mark.parametrize("cfg,plan", [(LLAMA, "mixed"), (GEMMA, "K4V2")])
def test_exact_chunks_equal_one_shot(cfg, plan):
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    kv = parse_kv("K4V2", cfg.n_layers) if plan == "K4V2" else mixed(cfg.n_layers)
    ref, ref_cache = run(model, kv, 0, None)
    got, cache = run(model, kv, 64, "exact")
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.asarray(ref_cache.lengths))
    assert [type(l) for l in cache.layers] == [type(l) for l in ref_cache.layers]
    # The stored arrays are those one shot stores; a code may differ where fp rounding of a K/V moved
    # a value across a quantization step, so compare the words' digits by their dequantized effect:
    # here simply bound the share of differing words.
    for a, b in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(ref_cache)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype
        if a.dtype == np.uint32:
            assert np.mean(a != b) < 0.01
        else:
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3)
    cached, _ = run(model, kv, 64, "cached")
    assert np.abs(cached - ref).max() > 10 * np.abs(got - ref).max()  # the other protocol differs


def test_exact_generation_continues_like_one_shot():
    model = Transformer(LLAMA, rngs=nnx.Rngs(2))
    kv = parse_kv("K4V2", LLAMA.n_layers)
    ref = generate(model, prompts(LLAMA), kv=kv, max_new_tokens=8, attention_impl="xla")
    got = generate(model, prompts(LLAMA), kv=kv, max_new_tokens=8, attention_impl="xla", prefill_chunk=64)
    assert got.tokens == ref.tokens
    # A continued cache is fed as it is stored (its history is quantized); it still works chunked.
    turn = [[5, 6, 7] * 30, [8] * 70, [9, 10]]
    a = generate(model, turn, cache=ref.cache, max_new_tokens=4, attention_impl="xla", prefill_chunk=32)
    assert all(len(t) == 4 for t in a.tokens)


def test_dense_cache_needs_no_staging():
    model = Transformer(LLAMA, rngs=nnx.Rngs(2))
    for protocol in ("exact", "cached"):
        logits, cache = run(model, parse_kv("fp", LLAMA.n_layers), 64, protocol)
        assert all(isinstance(l, DenseLayer) for l in cache.layers)
    ref, _ = run(model, parse_kv("fp", LLAMA.n_layers), 0, None)
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=1e-4)


def test_bad_protocol_is_one_line():
    assert check_protocol(None) == "exact"
    with pytest.raises(KvqError, match="prefill protocol must be one of exact, cached"):
        check_protocol("fast")


def test_generate_with_a_16bit_side():
    """Regression: a 16-bit side's empty scale and zero were one buffer, which donation refused."""
    model = Transformer(LLAMA, rngs=nnx.Rngs(1))
    out = generate(model, prompts(LLAMA), kv=mixed(LLAMA.n_layers), max_new_tokens=3, attention_impl="xla")
    assert [len(t) for t in out.tokens] == [3, 3, 3]
