"""Multi-turn chat (kvq_jax.chat.ChatSession and `kvq-jax chat`) on a tiny GGUF model the tests write.

- Dense fp32: each turn's greedy reply equals `generate` on the whole history from an empty cache.
- The second and third turns reuse the compiled prefill step and decode loop (no new trace).
- A turn that does not fit is one clear error and leaves the session as it was.
- `kvq-jax chat` piped: replies, /stats, /reset, an overflowing turn, bad UTF-8 and EOF.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from kvq_jax.chat import ChatSession
from kvq_jax.decode import _decode_loop, _prefill_step, generate
from kvq_jax.errors import KvqError
from kvq_jax.plan import parse_kv


def _cli_helpers() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_kvq_test_cli_helpers", Path(__file__).with_name("test_cli.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


C = _cli_helpers()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from kvq_jax.loading import load

    path = C._write_model(tmp_path_factory.mktemp("chat") / "tiny.gguf")
    model, tok = load(path, use_cache=False)
    return path, model, tok


TURNS = ["hello world", "the cat sat on the mat", "and then?"]


def test_turns_equal_generation_from_the_whole_history(tiny):
    _, model, tok = tiny
    chat = ChatSession(model, tok, capacity=256, max_new_tokens=6, attention_impl="xla", prefill_chunk=16)
    for i, text in enumerate(TURNS):
        full, ids = chat.next_turn(text)
        history = list(chat.ids)
        reply = chat.send(text)
        want = generate(model, [history + ids], max_new_tokens=6, capacity=256, attention_impl="xla")
        assert chat.ids == history + ids + want.tokens[0], f"turn {i}"
        assert reply == tok.decode(want.tokens[0])
        if i == 1:
            # The turn prefilled only its own tokens: the rendering past the cached text.
            assert full.startswith(tok.decode(history, skip_special=False))
    assert chat.stats()["tokens_cached"] == len(chat.ids) == int(chat.cache.lengths[0])
    # Compiled once per session settings: turns 2 and 3 find the step and the loop in the jit caches
    # (generate() above compiled its own shapes, so a fresh session is measured).
    chat2 = ChatSession(model, tok, capacity=256, max_new_tokens=6, attention_impl="xla", prefill_chunk=16)
    chat2.send(TURNS[0])
    sizes = (_prefill_step._cache_size(), _decode_loop._cache_size())
    chat2.send(TURNS[1])
    chat2.send(TURNS[2])
    assert (_prefill_step._cache_size(), _decode_loop._cache_size()) == sizes


def test_a_turn_that_does_not_fit_changes_nothing(tiny):
    _, model, tok = tiny
    chat = ChatSession(model, tok, kv=parse_kv("K4V2", model.cfg.n_layers), capacity=128, max_new_tokens=8,
                       attention_impl="xla")
    chat.send("hello")
    ids, n = list(chat.ids), int(chat.cache.lengths[0])
    with pytest.raises(KvqError, match=r"only \d+ of the 128 positions are left") as e:
        chat.send("the cat sat on the mat " * 16)
    assert "\n" not in str(e.value)
    assert chat.ids == ids and int(chat.cache.lengths[0]) == n
    chat.send("hi")  # the session goes on
    s = chat.stats()
    assert s["turns"] == 2 and s["tokens_left"] == 128 - s["tokens_cached"] and s["bits_per_element"] > 0
    chat.reset()
    assert chat.stats()["tokens_cached"] == 0 and int(chat.cache.lengths[0]) == 0
    with pytest.raises(KvqError, match="--capacity must be in"):
        ChatSession(model, tok, capacity=10_000)


def _run(path, argv, stdin: bytes) -> subprocess.CompletedProcess:
    env = dict(os.environ, KVQ_JAX_NO_XLA_CACHE="1", JAX_PLATFORMS="cpu",
               KVQ_JAX_CACHE=str(Path(path).parent / "kvq_cache"))
    return subprocess.run([sys.executable, "-m", "kvq_jax.cli", *argv], input=stdin, capture_output=True,
                          env=env, timeout=300)


def test_cli_chat_piped(tiny):
    path = tiny[0]
    lines = b"hello world\n/stats\n" + ("the cat " * 60).encode() + b"\n\xff\xfe\n/reset\n/stats\nand then?\n"
    p = _run(path, ["chat", "--model", str(path), "--kv", "K4V2", "--capacity", "96", "--max-new-tokens", "5"],
             lines)
    err = p.stderr.decode()
    assert p.returncode == 0, err
    assert "Traceback" not in err
    out = [ln for ln in p.stdout.decode().splitlines()]
    stats = [json.loads(ln) for ln in out if ln.startswith("{")]
    assert [s["turns"] for s in stats] == [1, 0] and stats[0]["tokens_cached"] > 0
    assert stats[1]["tokens_cached"] == 0
    text = p.stdout.decode()
    first, rest = text.split("{", 1)
    assert first.strip() and rest.rsplit("}", 1)[1].strip()  # a reply before the stats, one after
    assert "positions are left" in err and "line 4 is not valid UTF-8 text" in err and "history cleared" in err


def test_cli_bad_input(tiny):
    path = tiny[0]
    p = _run(path, ["chat", "--model", str(path), "--prefill-chunk", "-1"], b"")
    assert p.returncode == 2 and p.stderr.decode().count("\n") == 1 and "--prefill-chunk" in p.stderr.decode()
    p = _run(path, ["generate", "--model", str(path), "--prefill-chunk", "x", "--prompt", "hi"], b"")
    assert p.returncode == 2 and "expected an integer" in p.stderr.decode()
    p = subprocess.run([sys.executable, "-m", "kvq_jax.cli", "generate", "--model", str(path), "--prompt",
                        os.fsdecode(b"\xff\xfe")], capture_output=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", KVQ_JAX_NO_XLA_CACHE="1"))
    err = p.stderr.decode()
    assert p.returncode == 2 and err == "kvq-jax: error: --prompt is not valid UTF-8 text\n", err


def test_cli_prefill_chunk_on_generate_eval_bench(tiny, tmp_path):
    path = tiny[0]
    text = tmp_path / "t.txt"
    text.write_text("\n".join(C.H.CORPUS * 2))
    res = {}
    for chunk, protocol in (("0", "exact"), ("32", "exact"), ("32", "cached")):
        p = _run(path, ["eval", "--model", str(path), "--text", str(text), "--context", "128", "--windows", "2",
                        "--kv", "K4V2", "--residual", "64", "--prefill", "100", "--prefill-chunk", chunk,
                        "--prefill-protocol", protocol, "--json", "--no-progress"], b"")
        assert p.returncode == 0, p.stderr.decode()
        res[chunk, protocol] = json.loads(p.stdout)
    one, exact, cached = res["0", "exact"], res["32", "exact"], res["32", "cached"]
    assert exact["prefill_chunk"] == 32 and one["prefill_chunk"] == 0
    assert (one["prefill_protocol"], exact["prefill_protocol"], cached["prefill_protocol"]) == \
        ("one shot", "exact", "cached")
    assert np.isfinite(cached["ppl"]) and cached["ppl_fp"] == pytest.approx(one["ppl_fp"], rel=1e-4)
    # Exact chunks score the prompt as one shot does; cached chunks read the quantized earlier chunks.
    assert exact["ppl"] == pytest.approx(one["ppl"], rel=1e-4)
    assert exact["kl_vs_fp"] == pytest.approx(one["kl_vs_fp"], rel=1e-3, abs=1e-7)
    assert abs(cached["kl_vs_fp"] - one["kl_vs_fp"]) > 10 * abs(exact["kl_vs_fp"] - one["kl_vs_fp"])
    p = _run(path, ["bench", "--model", str(path), "--context", "100", "--new-tokens", "4", "--kv", "K4V2",
                    "--residual", "64", "--prefill-chunk", "32", "--json"], b"")
    assert p.returncode == 0, p.stderr.decode()
    assert json.loads(p.stdout)["prefill_chunk"] == 32
    p = _run(path, ["generate", "--model", str(path), "--prompt", "hello", "--max-new-tokens", "3",
                    "--prefill-chunk", "4"], b"")
    assert p.returncode == 0, p.stderr.decode()
