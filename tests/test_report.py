"""KVStats file round trip / validation and the figures + Markdown report (kvq_jax.stats, .report)."""

from __future__ import annotations

import dataclasses
import re
import zipfile

import numpy as np
import pytest

from kvq_jax.allocate import allocate
from kvq_jax.errors import KvqError
from kvq_jax.plan import KVPlan
from kvq_jax.report import MARKER, norm_summary, write_report
from kvq_jax.stats import OPTIONAL, KVStats, synthetic_stats

PNG = b"\x89PNG\r\n\x1a\n"
FIGS = ("spectra.png", "norms.png", "qerr.png")


@pytest.fixture(scope="module")
def stats() -> KVStats:
    return synthetic_stats(3, 2, 8, seed=0)


# ------------------------------------------------------------------------------------------ stats
def test_stats_round_trip(tmp_path, stats):
    path = tmp_path / "stats.npz"
    stats.save(path)
    back = KVStats.load(path)
    for f in dataclasses.fields(KVStats):
        a, b = getattr(stats, f.name), getattr(back, f.name)
        if f.name == "meta":
            assert a == b
        else:
            np.testing.assert_array_equal(a, b)
    assert (back.n_layers, back.n_heads, back.head_dim, back.model_name) == (3, 2, 8, "synthetic")
    assert back.bits_tuple == (1, 1.58, 2, 3, 4, 6, 8)
    np.testing.assert_allclose(back.k_fro_layer, np.sqrt((stats.k_fro**2).sum(axis=1)))


def test_stats_optional_arrays_may_be_absent(tmp_path, stats):
    s = dataclasses.replace(stats, **{n: None for n in OPTIONAL})
    s.save(tmp_path / "s.npz")
    back = KVStats.load(tmp_path / "s.npz")
    assert all(getattr(back, n) is None for n in OPTIONAL)


def _one_line_error(path) -> str:
    with pytest.raises(KvqError) as e:
        KVStats.load(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_stats_corrupt_files(tmp_path, stats):
    assert "not found" in _one_line_error(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    assert "corrupt" in _one_line_error(junk)
    good = tmp_path / "good.npz"
    stats.save(good)
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _one_line_error(cut)
    # a valid zip whose entries are not what we wrote
    with zipfile.ZipFile(tmp_path / "zip.npz", "w") as z:
        z.writestr("meta.npy", b"garbage")
    _one_line_error(tmp_path / "zip.npz")
    # a plain npz without meta, and one lacking a required array
    np.savez(tmp_path / "plain.npz", x=np.zeros(3))
    assert "no meta" in _one_line_error(tmp_path / "plain.npz")
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}
    partial = {k: v for k, v in arrays.items() if k != "k_sv"}
    np.savez(tmp_path / "partial.npz", **partial)
    assert "k_sv" in _one_line_error(tmp_path / "partial.npz")


@pytest.mark.parametrize("change, match", [
    (lambda a: a.__setitem__("k_fro", a["k_fro"][:, :1]), "shape"),
    (lambda a: a["v_qerr"].__setitem__((0, 0, 0), np.nan), "non-finite"),
    (lambda a: a.__setitem__("bits", a["bits"][::-1].copy()), "increasing"),
    (lambda a: a.__setitem__("k_sv", a["k_sv"][..., ::-1].copy()), "descending"),
    (lambda a: a.__setitem__("meta", np.array('{"n_layers": 99}')), "n_layers"),
    (lambda a: a.__setitem__("meta", np.array("{not json")), "corrupt"),
])
def test_stats_invalid_content(tmp_path, stats, change, match):
    good = tmp_path / "good.npz"
    stats.save(good)
    with np.load(good) as z:
        arrays = {k: np.array(z[k]) for k in z.files}
    change(arrays)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    assert re.search(match, _one_line_error(bad))


def test_stats_constructor_validates(stats):
    with pytest.raises(KvqError, match="non-finite"):
        dataclasses.replace(stats, k_attn_err=np.full_like(stats.k_attn_err, np.inf))
    with pytest.raises(KvqError, match="missing"):
        dataclasses.replace(stats, k_fro=None)


def test_synthetic_stats_seeded():
    a, b, c = (synthetic_stats(2, 2, 8, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.k_sv, b.k_sv)
    assert not np.array_equal(a.k_sv, c.k_sv)
    assert np.all(a.k_fro_layer > a.v_fro_layer)


# ------------------------------------------------------------------------------------------ report
def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 1000


def test_report_files(tmp_path, stats):
    plans = {"sensitivity": allocate(stats, 3.0), "norm": allocate(stats, 3.0, method="norm"),
             "K4V2": KVPlan.uniform(3, 4, 2)}
    out = tmp_path / "rep"
    md = write_report(stats, out, plans, skip_top=1)
    assert md == out / "report.md"
    for name in FIGS + ("bits.png",):
        _check_png(out / name)
    text = md.read_text()
    for name in FIGS + ("bits.png",):
        assert f"]({name})" in text
    assert re.search(r"key Frobenius norm > value norm in 3/3 layers \(median ratio \d+\.\dx\)", text)
    assert norm_summary(stats) in text
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 3
    assert rows[0].endswith(" | 4/2 |")  # the uniform plan's column
    assert (out / MARKER).is_file()


def test_report_without_plans_and_rewrite(tmp_path, stats):
    out = tmp_path / "rep"
    write_report(stats, out, {"p": KVPlan.uniform(3, 4, 2)})
    assert (out / "bits.png").is_file()
    # a previous report may be overwritten; its stale bits.png goes away
    md = write_report(stats, out)
    assert not (out / "bits.png").exists()
    for name in FIGS:
        _check_png(out / name)
    assert "bits.png" not in md.read_text()


def test_report_refuses_foreign_directory(tmp_path, stats):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(KvqError, match="refusing to overwrite"):
        write_report(stats, out)
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    write_report(stats, empty)  # an existing empty directory is fine
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(KvqError, match="not a directory"):
        write_report(stats, afile)


def test_report_bad_arguments(tmp_path, stats):
    with pytest.raises(KvqError, match="skip_top"):
        write_report(stats, tmp_path / "a", skip_top=8)
    with pytest.raises(KvqError, match="layers"):
        write_report(stats, tmp_path / "b", {"p": KVPlan.uniform(5, 4, 2)})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
