"""The `kvq-jax` command line: in-process through `kvq_jax.cli.main`, plus a few real subprocesses
for the contract that bad input prints exactly one `kvq-jax: error: ...` line on stderr, exits with
status 2 and never shows a traceback.

The model is a tiny llama GGUF with a tiny BPE tokenizer, written with the helpers of test_gguf.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from kvq_jax.cli import main
from kvq_jax.plan import join_rotation, split_rotation


def _helpers() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "_kvq_test_gguf_helpers", Path(__file__).with_name("test_gguf.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


H = _helpers()
# Small on purpose: one KV head of width 64 (so the default groups of 64 fit), a 256-token context.
CFG = H.tiny_cfg(n_layers=2, dim=64, n_heads=2, n_kv_heads=1, head_dim=64, hidden_dim=128, max_seq_len=256)
EVAL_KEYS = {"model", "kv", "windows", "context", "tokens_scored", "ppl", "tokens_per_s"}
KV_KEYS = {"ppl_fp", "kl_vs_fp", "top1_agreement", "kv_cache_bytes", "kv_cache_bytes_bf16", "effective_bits"}


def _params(cfg) -> dict[str, np.ndarray]:
    """Random weights scaled like a trained model's (unit-variance activations, moderate logits)."""
    p = H.random_params(cfg, seed=0)
    out = {}
    for k, v in p.items():
        if k == "embed":
            v = 0.2 * v
        elif v.ndim == 2:
            v = v / np.sqrt(v.shape[0])
        out[k] = v.astype(np.float32)
    return out


def _write_model(path: Path, arch: str | None = None) -> Path:
    H.write_gguf(path, CFG, H.gguf_tensors(CFG, _params(CFG)), H.tiny_tokenizer_meta(), arch=arch)
    return path


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    text = "\n".join(H.CORPUS * 2)  # ~700 tokens of the tiny tokenizer
    (d / "text.txt").write_text(text)
    (d / "short.txt").write_text("hello world")
    return {"model": _write_model(d / "tiny.gguf"), "text": d / "text.txt", "short": d / "short.txt",
            "dir": d, "cache": d / "kvq_cache"}


@pytest.fixture(autouse=True)
def _env(monkeypatch, files):
    """Never touch the user's ~/.cache: converted weights go to a test directory; no XLA cache."""
    monkeypatch.setenv("KVQ_JAX_CACHE", str(files["cache"]))
    monkeypatch.setenv("KVQ_JAX_NO_XLA_CACHE", "1")


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc: int, err: str, match: str | None = None) -> str:
    """Exit status 2 and exactly one stderr line `kvq-jax: error: ...`, no traceback."""
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kvq-jax: error: "), err
    if match is not None:
        assert match in lines[0], lines[0]
    return lines[0]


def _json(out: str) -> dict:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, out
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    return obj


# ------------------------------------------------------------------------------------ bad input
def _bad_cases(f: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    m, t, s = str(f["model"]), str(f["text"]), str(f["short"])
    long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 40)  # > 256 tokens
    gen = ["generate", "--model", m, "--prompt", "hello"]
    ev = ["eval", "--model", m, "--text", t, "--context", "64", "--no-progress"]
    return {
        "missing model": (["generate", "--model", "/nonexistent.gguf", "--prompt", "hi"], "model not found"),
        "empty prompt": (["generate", "--model", m, "--prompt", ""], "empty prompt"),
        "blank prompt": (["generate", "--model", m, "--prompt", "  \n "], "empty prompt"),
        "prompt longer than the cache": (
            ["generate", "--model", m, "--prompt", long_prompt, "--no-chat"], "exceeds the model's context of 256"),
        "text shorter than a window": (["eval", "--model", m, "--text", s, "--context", "64"],
                                       "fewer than one window of 64"),
        "missing text file": (["eval", "--model", m, "--text", str(f["dir"] / "nope.txt")], "text file not found"),
        "negative temperature": (gen + ["--temperature", "-1"], "--temperature"),
        "nan temperature": (gen + ["--temperature", "nan"], "--temperature"),
        "top-p above 1": (gen + ["--top-p", "2"], "--top-p"),
        "negative top-k": (gen + ["--top-k", "-1"], "--top-k"),
        "zero max-new-tokens": (gen + ["--max-new-tokens", "0"], "--max-new-tokens"),
        "zero context": (ev[:-3] + ["--context", "0"], "--context"),
        "context 1": (ev[:-3] + ["--context", "1"], "--context must be >= 2"),
        "bad kv width": (gen + ["--kv", "K9V2"], "bad --kv 'K9V2'"),
        "missing plan file": (gen + ["--kv", "nonexistent.json"], "plan file not found"),
        "unknown kv": (gen + ["--kv", "K4"], "bad --kv 'K4'"),
        "bad attention": (gen + ["--attention", "foo"], "--attention"),
        "bad window dtype": (gen + ["--kv", "K4V2", "--window-dtype", "float16"], "--window-dtype"),
        "bad windows": (ev + ["--windows", "abc"], "--windows"),
        "negative residual": (gen + ["--kv", "K4V2", "--residual", "-1"], "--residual must be >= 0"),
        "residual not a block multiple": (gen + ["--kv", "K4V2", "--residual", "10"], "not a multiple"),
        "bad group": (gen + ["--kv", "K4V2", "--group-k", "7"], "group"),
        "prefill too long": (ev + ["--kv", "K4V2", "--prefill", "64"], "--prefill must be in [1, 63]"),
        "bench context too long": (["bench", "--model", m, "--context", "250", "--new-tokens", "16"],
                                   "exceeds the model's context of 256"),
        "bench text too short": (["bench", "--model", m, "--text", s, "--context", "8"], "the benchmark needs 8"),
        "bad bits": (["analyze", "--model", m, "--calib", t, "--out", str(f["dir"] / "x.json"), "--bits", "a,b"],
                     "bad --bits"),
        "analyze without calibration": (["analyze", "--model", m, "--out", str(f["dir"] / "x.json")],
                                        "analyze needs --calib"),
        "bad analyze batch": (["analyze", "--model", m, "--calib", t, "--out", str(f["dir"] / "x.json"), "--batch", "0"],
                              "--batch"),
        "no command": ([], "required"),
        "unknown command": (["frobnicate"], "invalid choice"),
        "missing required option": (["eval", "--model", m], "--text"),
    }


CASES = list(_bad_cases({k: Path("/x") for k in ("model", "text", "short", "dir")}))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_exit_2(capsys, files, case):
    argv, match = _bad_cases(files)[case]
    rc, out, err = cli(capsys, *argv)
    assert_user_error(rc, err, match)
    assert out == ""


def test_corrupt_model_files(capsys, files, tmp_path):
    rng = np.random.default_rng(0)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(rng.bytes(4096))
    assert_user_error(*cli(capsys, "generate", "--model", junk, "--prompt", "hi")[::2], "not a GGUF file")
    # right magic, random header: gguf-py's own error becomes one line
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + rng.bytes(4096))
    assert_user_error(*cli(capsys, "generate", "--model", bad, "--prompt", "hi")[::2], "corrupt or truncated")
    # a real file cut short
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(files["model"].read_bytes()[:3000])
    assert_user_error(*cli(capsys, "eval", "--model", cut, "--text", files["text"])[::2])
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert_user_error(*cli(capsys, "bench", "--model", empty)[::2])


def test_unsupported_architecture(capsys, tmp_path):
    path = _write_model(tmp_path / "mamba.gguf", arch="mamba")
    rc, out, err = cli(capsys, "generate", "--model", path, "--prompt", "hi")
    assert_user_error(rc, err, "unsupported architecture 'mamba'")


def test_analyze_refuses_to_overwrite(capsys, files, tmp_path):
    out_file = tmp_path / "plan.json"
    out_file.write_text("precious\n")
    rc, out, err = cli(capsys, "analyze", "--model", files["model"], "--calib", files["text"],
                       "--out", out_file, "--context", "64", "--windows", "1", "--no-progress")
    assert_user_error(rc, err, "exists; pass --force")
    assert out_file.read_text() == "precious\n"


def test_kv_plan_for_another_model(capsys, files, tmp_path):
    from kvq_jax.plan import KVPlan

    plan = tmp_path / "other.json"
    KVPlan.uniform(CFG.n_layers, 4, 2).replace(model="SmolLM2", model_layers=CFG.n_layers).save(plan)
    rc, out, err = cli(capsys, "eval", "--model", files["model"], "--text", files["text"], "--context", "64",
                       "--kv", plan, "--prefill", "8", "--no-progress")
    assert_user_error(rc, err, "plan was made for model 'SmolLM2'")
    wrong = tmp_path / "three.json"
    KVPlan.uniform(3, 4, 2).save(wrong)
    rc, out, err = cli(capsys, "generate", "--model", files["model"], "--prompt", "hi", "--kv", wrong)
    assert_user_error(rc, err, "has 3 layers, the model has 2")


# ------------------------------------------------------------------------------------ regressions
def test_huge_seed_is_a_user_error(capsys, files):
    rc, out, err = cli(capsys, "generate", "--model", files["model"], "--prompt", "hi", "--max-new-tokens", "2",
                       "--seed", str(2**70))
    assert_user_error(rc, err, "--seed")


def test_huge_top_k_keeps_the_whole_vocabulary(capsys, files):
    # A top-k beyond the vocabulary is clamped to it (it filters nothing), not an int32 overflow.
    argv = ["generate", "--model", files["model"], "--prompt", "hi", "--max-new-tokens", "3",
            "--temperature", "1", "--seed", "5", "--json"]
    rc, huge, err = cli(capsys, *argv, "--top-k", str(2**40))
    assert rc == 0 and "Traceback" not in err, err
    rc, off, err = cli(capsys, *argv, "--top-k", "0")
    assert rc == 0, err
    assert _json(huge)["reply"] == _json(off)["reply"]


def test_bench_negative_seed_is_a_user_error(capsys, files):
    rc, out, err = cli(capsys, "bench", "--model", files["model"], "--context", "8", "--new-tokens", "2",
                       "--seed", "-1", "--json")
    assert_user_error(rc, err, "--seed")


def test_eval_context_beyond_model_context_is_rejected(capsys, files):
    rc, out, err = cli(capsys, "eval", "--model", files["model"], "--text", files["text"], "--context", "300",
                       "--windows", "1", "--json", "--no-progress")
    assert_user_error(rc, err, "context")


# ------------------------------------------------------------------------------------ success
def test_generate_streams_text(capsys, files):
    argv = ["generate", "--model", files["model"], "--prompt", "The quick brown fox", "--no-chat",
            "--max-new-tokens", "4"]
    rc, out, err = cli(capsys, *argv)
    assert rc == 0, err
    assert "Traceback" not in err and out.endswith("\n")
    rc, js, err = cli(capsys, *argv, "--json")
    assert rc == 0, err
    res = _json(js)
    assert res["model"] == "tiny test model" and res["kv"] == "fp" and res["prompt"] == "The quick brown fox"
    assert 0 <= res["new_tokens"] <= 4 and isinstance(res["stopped_at_eos"], bool)
    assert res["stopped_at_eos"] or res["new_tokens"] == 4
    assert out == res["reply"] + "\n"  # the streamed text is the same greedy reply


def test_generate_chat_and_quantized_cache(capsys, files):
    rc, out, err = cli(capsys, "generate", "--model", files["model"], "--prompt", "Hello world!",
                       "--max-new-tokens", "3", "--kv", "K4V2", "--json")
    assert rc == 0, err
    res = _json(out)
    assert res["kv"].startswith("2 layers: K 4b/channel/64; V 2b/token/64")
    assert res["new_tokens"] <= 3


def test_eval_fp_json(capsys, files):
    rc, out, err = cli(capsys, "eval", "--model", files["model"], "--text", files["text"], "--context", "128",
                       "--windows", "2", "--json", "--no-progress")
    assert rc == 0, err
    res = _json(out)
    assert EVAL_KEYS <= set(res)
    assert (res["model"], res["kv"], res["windows"], res["context"]) == ("tiny test model", "fp", 2, 128)
    assert res["tokens_scored"] == 2 * 127
    assert math.isfinite(res["ppl"]) and res["ppl"] > 1 and res["tokens_per_s"] > 0
    # plain output: one "key: value" line per field
    rc, text, err = cli(capsys, "eval", "--model", files["model"], "--text", files["text"], "--context", "128",
                        "--windows", "2", "--no-progress")
    assert rc == 0, err
    fields = dict(line.split(": ", 1) for line in text.splitlines())
    assert {k.strip() for k in fields} == set(res)


def test_eval_quantized_json(capsys, files):
    common = ["eval", "--model", files["model"], "--text", files["text"], "--context", "128", "--windows", "2",
              "--json", "--no-progress"]
    rc, out, err = cli(capsys, *common)
    assert rc == 0, err
    fp = _json(out)
    # residual 64 < 128 - sink: blocks of the body really are quantized
    rc, out, err = cli(capsys, *common, "--kv", "K4V2", "--prefill", "8", "--residual", "64")
    assert rc == 0, err
    res = _json(out)
    assert EVAL_KEYS | KV_KEYS <= set(res)
    assert res["prefill"] == 8 and res["tokens_scored"] == fp["tokens_scored"]
    assert res["kv"].startswith("2 layers: K 4b/channel/64; V 2b/token/64") and "residual 64" in res["kv"]
    for k in ("ppl", "ppl_fp", "kl_vs_fp", "effective_bits", "tokens_per_s"):
        assert math.isfinite(res[k]), k
    # the teacher-forced fp reference scores the same tokens as the one-pass fp evaluation
    assert res["ppl_fp"] == pytest.approx(fp["ppl"], rel=1e-3)
    assert res["kl_vs_fp"] > 0 and 0.5 <= res["top1_agreement"] <= 1
    assert res["ppl"] == pytest.approx(res["ppl_fp"], rel=0.5)
    elems = 2 * CFG.n_layers * 2 * CFG.n_kv_heads * CFG.head_dim * 128
    assert res["kv_cache_bytes_bf16"] == elems * 2
    assert res["effective_bits"] == pytest.approx(res["kv_cache_bytes"] * 8 / elems)
    assert res["stored_bits"] == pytest.approx(res["effective_bits"])  # every layer global: the same
    assert res["data_bits"] == 3.0 and fp["data_bits"] == 32.0 and fp["stored_bits"] == pytest.approx(32.0, rel=1e-3)
    assert res["kv_cache_bytes"] > 0
    # the tokens fed one at a time after the prefill, apart: they read the quantized cache
    assert res["tokens_decoded"] == 2 * (128 - 1 - 8)
    assert res["kl_vs_fp_decoded"] * res["tokens_decoded"] <= res["kl_vs_fp"] * res["tokens_scored"] + 1e-6
    assert res["ppl_decoded"] > res["ppl_fp_decoded"] and 0.5 <= res["top1_decoded"] <= 1
    # a window that never leaves the full-precision ring: the decoded tokens score as fp
    rc, out, err = cli(capsys, *common, "--kv", "K4V2", "--prefill", "8", "--residual", "128")
    assert rc == 0, err
    whole = _json(out)
    assert whole["ppl_decoded"] == pytest.approx(whole["ppl_fp_decoded"], rel=1e-5) and whole["kl_vs_fp_decoded"] < 1e-6
    # the sink and ring in bf16: 2 bytes less per element of them (4 + 64 tokens, K and V, 2 rows)
    rc, out, err = cli(capsys, *common, "--kv", "K4V2", "--prefill", "8", "--residual", "64",
                       "--window-dtype", "bfloat16")
    assert rc == 0, err
    half = _json(out)
    assert half["kv"].endswith("window bfloat16")
    window = 2 * CFG.n_layers * 2 * CFG.n_kv_heads * CFG.head_dim * (4 + 64)
    assert res["kv_cache_bytes"] - half["kv_cache_bytes"] == 2 * window
    assert half["ppl"] == pytest.approx(res["ppl"], rel=0.05)
    # keys stored before RoPE: the same bytes, another (finite) result
    rc, out, err = cli(capsys, *common, "--kv", "K4V2", "--prefill", "8", "--residual", "64", "--rotate", "prerope")
    assert rc == 0, err
    pre = _json(out)
    assert "rotate prerope" in pre["kv"] and pre["kv_cache_bytes"] == res["kv_cache_bytes"]
    assert math.isfinite(pre["ppl"]) and pre["ppl"] != res["ppl"]


def test_evaluate_plans_shares_one_reference(files):
    """Several caches scored in one call (the fp stream run once) give each cache's own numbers."""
    from kvq_jax.evaluate import evaluate, evaluate_plans
    from kvq_jax.loading import load
    from kvq_jax.plan import DenseKV, parse_kv

    model, tok = load(str(files["model"]))
    text = files["text"].read_text()
    kvs = [parse_kv("K4V2", CFG.n_layers, residual=64), DenseKV("float32"), parse_kv("K2V2", CFG.n_layers, residual=64)]
    common = dict(context=128, windows=2, prefill=8, progress=False)
    together = list(evaluate_plans(model, tok, text, kvs, **common))
    assert [r["kv"] for r in together] == [evaluate(model, tok, text, kv=kv, **common)["kv"] for kv in kvs]
    for kv, r in zip(kvs, together):
        alone = evaluate(model, tok, text, kv=kv, **common)
        for k in ("ppl", "ppl_fp", "kl_vs_fp", "top1_agreement", "ppl_decoded", "kl_vs_fp_decoded", "stored_bits"):
            if k in alone:
                assert r[k] == pytest.approx(alone[k], rel=1e-5, abs=1e-9), (r["kv"], k)
    assert together[2]["kl_vs_fp_decoded"] > together[0]["kl_vs_fp_decoded"] > 0  # 2-bit keys cost more
    assert together[0]["ppl_fp"] == pytest.approx(together[1]["ppl"], rel=1e-3)


def test_bench_json(capsys, files):
    rc, out, err = cli(capsys, "bench", "--model", files["model"], "--context", "16", "--new-tokens", "4",
                       "--json")
    assert rc == 0, err
    res = _json(out)
    assert (res["batch"], res["context"], res["new_tokens"], res["kv"]) == (1, 16, 4, "fp")
    assert res["prefill_tokens_per_s"] > 0 and res["decode_tokens_per_s"] > 0
    assert res["decode_ms_per_step"] > 0 and res["backend"] == "cpu"
    capacity = 16 + 4  # a dense fp32 cache of K and V per layer, plus the int32 lengths
    assert res["kv_cache_bytes"] == 2 * CFG.n_layers * CFG.n_kv_heads * capacity * CFG.head_dim * 4 + 4
    assert res["kv_cache_bytes_bf16"] == 2 * CFG.n_layers * CFG.n_kv_heads * capacity * CFG.head_dim * 2


def test_analyze_writes_a_plan_that_eval_accepts(capsys, files, tmp_path):
    plan_path, stats_path, report = tmp_path / "plan.json", tmp_path / "stats.npz", tmp_path / "report"
    analyze = ["analyze", "--model", files["model"], "--calib", files["text"], "--context", "64", "--windows", "2",
               "--batch", "1", "--bits", "2,4,8", "--budget", "3", "--out", plan_path, "--stats", stats_path, "--no-progress",
               "--group-k", "32", "--group-v", "32", "--residual", "32", "--sink", "2"]
    rc, out, err = cli(capsys, *analyze, "--report", report)
    assert rc == 0, err
    summary = _json(out)
    assert summary["model"] == "tiny test model" and summary["method"] == "fisher"
    assert summary["out"] == str(plan_path) and summary["spent"] <= 3
    assert len(summary["k_bits"]) == len(summary["v_bits"]) == CFG.n_layers
    assert (report / "report.md").is_file() and (report / "bits.png").stat().st_size > 0
    assert stats_path.is_file()
    plan = json.loads(plan_path.read_text())
    assert plan["model"] == "tiny test model" and plan["model_layers"] == CFG.n_layers
    assert [float(s.split("b/")[0]) for s in plan["keys"]] == summary["k_bits"]

    rc, out, err = cli(capsys, "eval", "--model", files["model"], "--text", files["text"], "--context", "128",
                       "--windows", "2", "--kv", plan_path, "--prefill", "8", "--residual", "64", "--json",
                       "--no-progress")
    assert rc == 0, err
    res = _json(out)
    assert EVAL_KEYS | KV_KEYS <= set(res)
    assert res["kv"].startswith("2 layers of tiny test model") and math.isfinite(res["ppl"])

    # --force replaces the plan (statistics reused from --stats), here with another method
    rc, out, err = cli(capsys, *analyze, "--force", "--method", "norm", "--budget", "4")
    assert rc == 0, err
    assert _json(out)["method"] == "norm"
    assert "method=norm" in json.loads(plan_path.read_text())["note"]
    # a memory budget at a target context (the tiny llama's layers are all global: the same plan);
    # the statistics exist, so no calibration text is needed
    i = analyze.index("--calib")
    no_calib = analyze[:i] + analyze[i + 2:]
    rc, out, err = cli(capsys, *no_calib, "--force", "--method", "norm", "--budget", "4", "--target-context", "4096")
    assert rc == 0, err
    mem = _json(out)
    assert mem["target_context"] == 4096 and mem["element_bits"] <= 4 and mem["spent"] <= 4
    assert "memory budget" in json.loads(plan_path.read_text())["note"]
    # saved statistics carry their cache geometry: without the flags the plan takes it, and a flag
    # that contradicts it (the Fisher errors were measured with 32-token key groups) is refused
    geometry = no_calib.index("--group-k")
    bare = no_calib[:geometry] + no_calib[geometry + 8:]
    assert not {"--group-k", "--group-v", "--residual", "--sink"} & set(bare)
    rc, out, err = cli(capsys, *bare, "--force")
    assert rc == 0, err
    plan = json.loads(plan_path.read_text())
    assert all(k.endswith("/32") for k in plan["keys"]) and (plan["residual"], plan["sink"]) == (32, 2)
    rc, out, err = cli(capsys, *bare, "--force", "--group-k", "64")
    assert_user_error(rc, err, "measured with group_k 32, not 64")
    assert json.loads(plan_path.read_text()) == plan  # the earlier plan is kept
    # so with the positions the Fisher errors were scored at (all, here)
    rc, out, err = cli(capsys, *bare, "--force", "--score-from", "48")
    assert_user_error(rc, err, "was measured with --score-from 0, not 48")
    assert json.loads(plan_path.read_text()) == plan
    # rotations chosen per layer with the widths (fisher); eval runs the plan
    rc, out, err = cli(capsys, *analyze, "--force", "--rotate", "auto")
    assert rc == 0, err
    auto = json.loads(plan_path.read_text())
    assert "rotations chosen per layer" in auto["note"]
    rotations = {auto["rotate"]} if isinstance(auto["rotate"], str) else set(auto["rotate"])
    assert all(join_rotation(*split_rotation(r)) == r for r in rotations)  # valid, in canonical form
    rc, out, err = cli(capsys, "eval", "--model", files["model"], "--text", files["text"], "--context", "128",
                       "--windows", "2", "--kv", plan_path, "--prefill", "8", "--json", "--no-progress")
    assert rc == 0 and math.isfinite(_json(out)["ppl"]), err
    # --no-codebooks: the same choice without learned key codebooks (uniform codes only)
    rc, out, err = cli(capsys, *analyze, "--force", "--rotate", "auto", "--no-codebooks")
    assert rc == 0, err
    assert all(isinstance(k, str) for k in json.loads(plan_path.read_text())["keys"])
    rc, out, err = cli(capsys, *analyze, "--force", "--rotate", "auto", "--method", "norm")
    assert_user_error(rc, err, "use method 'fisher'")
    # windows no longer than sink + residual cannot measure Fisher errors: a clear error, no plan
    short = tmp_path / "short.json"
    rc, out, err = cli(capsys, "analyze", "--model", files["model"], "--calib", files["text"], "--context", "64",
                       "--windows", "1", "--bits", "2,4", "--out", short, "--no-progress")
    assert_user_error(rc, err, "longer --context")
    assert not short.exists()


# ------------------------------------------------------------------------------------ subprocess
def _exe() -> list[str]:
    exe = shutil.which("kvq-jax")
    return [exe] if exe else [sys.executable, "-m", "kvq_jax.cli"]


def _run(files, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, KVQ_JAX_CACHE=str(files["cache"]), KVQ_JAX_NO_XLA_CACHE="1", JAX_PLATFORMS="cpu")
    return subprocess.run([*_exe(), *map(str, argv)], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("case", ["missing model", "prompt longer than the cache", "bad kv width",
                                  "negative temperature", "missing required option"])
def test_subprocess_bad_input(files, case):
    argv, match = _bad_cases(files)[case]
    p = _run(files, *argv)
    assert_user_error(p.returncode, p.stderr, match)
    assert p.stdout == ""


def test_subprocess_corrupt_model_and_existing_out(files, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + np.random.default_rng(1).bytes(2048))
    p = _run(files, "eval", "--model", bad, "--text", files["text"])
    assert_user_error(p.returncode, p.stderr, "corrupt or truncated GGUF file")
    out_file = tmp_path / "plan.json"
    out_file.write_bytes(b"\x00keep me")
    p = _run(files, "analyze", "--model", files["model"], "--calib", files["text"], "--out", out_file)
    assert_user_error(p.returncode, p.stderr, "exists")
    assert out_file.read_bytes() == b"\x00keep me"


def test_subprocess_generate_succeeds(files):
    p = _run(files, "generate", "--model", files["model"], "--prompt", "Hello world!", "--no-chat",
             "--max-new-tokens", "4")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and p.stdout.endswith("\n")
