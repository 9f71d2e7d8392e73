"""Needle (passkey) retrieval: case construction, the continuation protocol, results and the CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kvq_jax.cli import main
from kvq_jax.decode import generate
from kvq_jax.errors import KvqError
from kvq_jax.loading import load
from kvq_jax.needle import INTRO, NEEDLE, QUESTION, Filler, first_number, make_case, needle
from kvq_jax.plan import DenseKV, parse_kv

_spec = importlib.util.spec_from_file_location("_kvq_test_cli", Path(__file__).with_name("test_cli.py"))
C = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(C)

TEXT = ("Alpha was founded in 1901. Beta followed it! Gamma came third? Delta is a river mouth. "
        "Epsilon is small. Zeta ends the list. ") * 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("needle")
    with pytest.MonkeyPatch.context() as mp:  # converted weights go to the test directory, not ~/.cache
        mp.setenv("KVQ_JAX_CACHE", str(d / "kvq_cache"))
        mp.setenv("KVQ_JAX_NO_XLA_CACHE", "1")
        path = C._write_model(d / "tiny.gguf")
        model, tok = load(str(path))
        yield model, tok, path


def _find(seq: list[int], sub: list[int]) -> int:
    return next(i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub)


@pytest.mark.parametrize("filler_text", [None, TEXT])
def test_case_geometry(tiny, filler_text) -> None:
    _, tok, _ = tiny
    filler = Filler(tok, filler_text)
    head = tok.encode(INTRO, add_bos=tok.uses_bos)
    longest = max(len(filler.ids(i)) for i in range(len(filler.sentences)))
    for length in (220, 244):
        where = []
        for depth in (0.0, 0.5, 1.0):
            c = make_case(tok, filler, length, depth, seed=3, trial=0)
            total = len(c.haystack) + len(c.question)
            assert length - longest < total <= length
            assert c.question == tok.encode(QUESTION)
            assert len(c.key) == 5 and c.key.isdigit()
            at = _find(c.haystack, tok.encode(NEEDLE.format(key=c.key)))
            assert c.haystack[:len(head)] == head
            where.append(at)
            assert c.needle_at == pytest.approx(at / len(c.haystack))
            assert c == make_case(tok, filler, length, depth, seed=3, trial=0)  # deterministic
        n_needle = len(tok.encode(NEEDLE.format(key="12345")))
        assert where[0] == len(head)  # depth 0: right after the instruction
        assert where[0] < where[1] < where[2]
        c = make_case(tok, filler, length, 1.0, seed=3, trial=0)
        assert where[2] + n_needle == len(c.haystack)  # depth 1: nothing after the needle
    keys = {make_case(tok, filler, 240, 0.5, seed=3, trial=t).key for t in range(6)}
    assert len(keys) > 1


def test_text_filler_starts_at_a_seeded_offset(tiny) -> None:
    _, tok, _ = tiny
    filler = Filler(tok, TEXT)
    starts = {tuple(make_case(tok, filler, 200, 0.0, seed=0, trial=t).haystack[-20:]) for t in range(6)}
    assert len(starts) > 1


def test_bad_cases(tiny) -> None:
    model, tok, _ = tiny
    with pytest.raises(KvqError, match="too short"):
        make_case(tok, Filler(tok), 50, 0.5, 0, 0)
    with pytest.raises(KvqError, match="depths"):
        make_case(tok, Filler(tok), 200, 1.5, 0, 0)
    with pytest.raises(KvqError, match="no sentences"):
        Filler(tok, "   ")
    with pytest.raises(KvqError, match="exceeds the model's context of 256"):
        needle(model, tok, lengths=[250], depths=[0.5], progress=False)
    assert first_number(" 12345. The grass") == "12345"
    assert first_number(" the pass key 7 and 12345") == "7"
    assert first_number(" none") is None


def test_needle_reads_the_question_from_the_cache(tiny) -> None:
    """Scores are the greedy answers checked against the keys; for the fp cache the continuation
    protocol (haystack prefilled, question fed on top) answers what one prompt would."""
    model, tok, _ = tiny
    lengths, depths = [200, 240], [0.0, 1.0]
    fp = needle(model, tok, lengths=lengths, depths=depths, trials=2, batch=3, progress=False)
    q = needle(model, tok, lengths=lengths, depths=depths, trials=2, batch=3, progress=False,
               kv=parse_kv("K4V2", model.cfg.n_layers, residual=64))
    for r in (fp, q):
        assert [(c["length"], c["depth"]) for c in r["cells"]] == [(n, d) for n in lengths for d in depths]
        for c in r["cells"]:
            assert c["correct"] == sum(first_number(a) == k for a, k in zip(c["answers"], c["keys"]))
            assert c["accuracy"] == c["correct"] / 2
        assert r["accuracy"] == pytest.approx(sum(c["accuracy"] for c in r["cells"]) / 4)
    # fp32 stores 32 bits per element plus the capacity's padding; K4V2 far fewer, counted the same way
    for a, b in zip(fp["per_length"], q["per_length"]):
        assert 32 <= a["stored_bits"] < 48 and b["stored_bits"] < a["stored_bits"] / 2
    filler = Filler(tok)
    for n in lengths:
        cases = [make_case(tok, filler, n, d, 0, t) for d in depths for t in range(2)]
        one = generate(model, [c.haystack + c.question for c in cases], max_new_tokens=12)
        got = [a for c in fp["cells"] if c["length"] == n for a in c["answers"]]
        assert got == [tok.decode(t) for t in one.tokens]


def test_cli_needle(capsys, tiny, tmp_path) -> None:
    _, _, path = tiny
    png = tmp_path / "needle.png"
    args = ["eval", "--task", "needle", "--model", str(path), "--lengths", "200,240", "--depths", "0,0.5",
            "--trials", "1", "--kv", "K4V2", "--residual", "64", "--json", "--no-progress", "--heatmap", str(png)]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in out["runs"]] == ["fp", "K4V2"]
    assert all(len(r["cells"]) == 4 for r in out["runs"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = png.read_bytes()
    assert main(args) == 2  # the heatmap is not overwritten without --force
    err = capsys.readouterr().err
    assert "exists; pass --force" in err and len(err.splitlines()) == 1
    assert png.read_bytes() == before
    with_text = ["eval", "--task", "needle", "--model", str(path), "--lengths", "200", "--depths", "1",
                 "--trials", "1", "--no-progress"]
    assert main(with_text) == 0
    assert "fp: accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("extra, match", [
    (["--depths", "0,2"], "--depths in [0, 1]"),
    (["--lengths", "abc"], "--lengths must be comma-separated"),
    (["--lengths", "100,nan"], "--lengths must be comma-separated"),
    (["--depths", ""], "--depths must be comma-separated"),
    (["--lengths", "40"], "too short"),
    (["--mesh", "data=1"], "no --mesh"),
    (["--text", "/nonexistent.txt"], "text file not found"),
])
def test_cli_needle_bad_input(capsys, tiny, extra, match) -> None:
    _, _, path = tiny
    rc = main(["eval", "--task", "needle", "--model", str(path), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and len(err.splitlines()) == 1 and "Traceback" not in err
