"""`--mesh` on the command line, 8 CPU devices: eval/generate give the one-device result, bench reports
per-device cache bytes, and a mesh that does not fit is one line, exit 2."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from kvq_jax.cli import main


def _cli_module() -> ModuleType:
    """tests/test_cli.py's tiny GGUF model writer (one KV head of width 64, a 256-token context)."""
    spec = importlib.util.spec_from_file_location("_kvq_test_cli", Path(__file__).parents[1] / "test_cli.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


C = _cli_module()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli_mesh")
    (d / "text.txt").write_text("\n".join(C.H.CORPUS * 4))
    return {"model": C._write_model(d / "tiny.gguf"), "text": d / "text.txt", "cache": d / "kvq_cache"}


@pytest.fixture(autouse=True)
def _env(monkeypatch, files):
    monkeypatch.setenv("KVQ_JAX_CACHE", str(files["cache"]))
    monkeypatch.setenv("KVQ_JAX_NO_XLA_CACHE", "1")


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_json(out: str) -> dict:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, out
    return json.loads(lines[0])


@pytest.mark.parametrize("kv", ["fp", "K4V2"])
def test_eval_on_a_mesh_equals_one_device(capsys, files, kv: str) -> None:
    common = ["eval", "--model", files["model"], "--text", files["text"], "--context", "128", "--windows", "8",
              "--json", "--no-progress", "--prefill", "16", "--residual", "64"]
    if kv != "fp":
        common += ["--kv", kv]
    results = {}
    # None: the default, all 8 devices on data. The quantized cache on one split mesh: the library
    # tests cover it on every mesh, this test the command line's path to it.
    meshes = ("data=1", None, "data=2,seq=4", "seq=8") if kv == "fp" else ("data=1", "data=2,seq=4")
    for mesh in meshes:
        rc, out, err = run(capsys, *common, *([] if mesh is None else ["--mesh", mesh]))
        assert rc == 0, err
        results[mesh] = one_json(out)
    ref = results["data=1"]
    for mesh, res in results.items():
        assert res["tokens_scored"] == ref["tokens_scored"], mesh
        assert res["ppl"] == pytest.approx(ref["ppl"], rel=1e-4), mesh
        if kv != "fp":
            assert res["kl_vs_fp"] == pytest.approx(ref["kl_vs_fp"], rel=1e-2, abs=1e-6), mesh


def test_generate_on_a_seq_mesh_gives_the_same_reply(capsys, files) -> None:
    common = ["generate", "--model", files["model"], "--prompt", "the cat sat on the mat", "--no-chat",
              "--max-new-tokens", "12", "--kv", "K4V2", "--residual", "64", "--json"]
    replies = set()
    for mesh, impl in (("data=1", "xla"), ("seq=2", "xla"), ("seq=2", "pallas_interpret")):
        rc, out, err = run(capsys, *common, "--mesh", mesh, "--attention", impl)
        assert rc == 0, err
        replies.add(one_json(out)["reply"])
    assert len(replies) == 1, replies


def test_bench_reports_per_device_bytes(capsys, files) -> None:
    common = ["bench", "--model", files["model"], "--context", "240", "--new-tokens", "4", "--kv", "K4V2",
              "--json", "--residual", "64"]
    rc, out, err = run(capsys, *common, "--mesh", "data=1")
    assert rc == 0, err
    one = one_json(out)
    rc, out, err = run(capsys, *common, "--mesh", "seq=4")
    assert rc == 0, err
    four = one_json(out)
    assert four["mesh"] == {"data": 1, "model": 1, "seq": 4}
    assert four["kv_cache_bytes_per_device"] < one["kv_cache_bytes_per_device"]
    # Each device holds a quarter of the body plus the replicated sink and ring: more than a quarter
    # of the whole. (The totals differ too: a seq slice rounds to a packing unit, one body to 512.)
    assert four["kv_cache_bytes_per_device"] > four["kv_cache_bytes"] / 4
    assert four["kv_cache_bytes_bf16"] == one["kv_cache_bytes_bf16"]


@pytest.mark.parametrize("mesh, match", [
    ("data=16", "needs 16 devices, 8 available"),
    ("data=3", "batch"),
    ("model=4", "heads"),
    ("data=2,seq=x", "integer"),
])
def test_bad_mesh_is_one_line_exit_2(capsys, files, mesh: str, match: str) -> None:
    rc, out, err = run(capsys, "eval", "--model", files["model"], "--text", files["text"], "--context", "128",
                       "--windows", "2", "--no-progress", "--mesh", mesh)
    C.assert_user_error(rc, err, match)
