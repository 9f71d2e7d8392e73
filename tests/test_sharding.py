"""Sharding on one device (rules, mesh parsing, errors), and the multi-device checks: an 8-device
pytest session (tests/multidevice) and a 2-process run, each in subprocesses."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvq_jax.cli import main
from kvq_jax.errors import KvqError
from kvq_jax.sharding import ShardingRules, initialize, make_mesh, param_axes, parse_mesh

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "multidevice"))
from xla_flags import set_test_env  # noqa: E402

sys.path.pop(0)


def test_parse_mesh() -> None:
    assert parse_mesh("data=2,model=1,seq=4") == {"data": 2, "model": 1, "seq": 4}
    assert parse_mesh("seq=8") == {"seq": 8}
    for bad, msg in [("", "expected"), ("data=2,data=2", "expected"), ("gpu=2", "expected"),
                     ("data=x", "must be an integer"), ("seq=0", ">= 1"), ("data2", "expected")]:
        with pytest.raises(KvqError, match=msg):
            parse_mesh(bad)


def test_rules_and_param_axes() -> None:
    assert ShardingRules().kv_heads == "model" and ShardingRules().cache_tokens == "seq"
    assert ShardingRules.from_dict({"vocab": None}).vocab is None
    with pytest.raises(KvqError, match="mesh axes are"):
        ShardingRules(batch="rows")
    with pytest.raises(KvqError, match="unknown logical axes"):
        ShardingRules.from_dict({"tokens": "seq"})
    assert param_axes("layers.3.wq") == ("embed", "heads") and param_axes("embed") == ("vocab", "embed")
    assert param_axes("layers.0.post_attn_norm") == ("embed",)


def test_one_device_mesh_and_errors() -> None:
    mesh = make_mesh()
    assert dict(mesh.shape) == {"data": 1, "model": 1, "seq": 1}
    with pytest.raises(KvqError, match="needs 2 devices, 1 available"):
        make_mesh(seq=2)
    with pytest.raises(KvqError, match="go together"):
        initialize("localhost:1234", None, 0)
    with pytest.raises(KvqError, match="process-id must be in"):
        initialize("localhost:1234", 2, 2)
    with pytest.raises(KvqError, match="host:port"):
        initialize("localhost", 2, 0)


def test_cli_bad_mesh_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("hello " * 50)
    assert main(["eval", "--model", "nonexistent-model-name", "--text", str(text), "--mesh", "data=x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err


def _env(devices: int = 8) -> dict[str, str]:
    env = dict(os.environ, KVQ_MULTIDEVICE="1", JAX_PLATFORMS="cpu", XLA_FLAGS="")
    set_test_env(env, devices)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    # Not a worker of this xdist run: inherited, these would make the 8-device session's tests wait
    # for the machine lock that the test which started it holds (tests/conftest.py).
    for key in [key for key in env if key.startswith("PYTEST_XDIST_")]:
        del env[key]
    return env


@pytest.mark.whole_machine
def test_eight_device_session() -> None:
    """tests/multidevice on 8 CPU devices: sharded generate/eval equal one device (fp, K4V2, a mixed
    plan; data=4, data=2/seq=4, model=3, seq=8), cache layout and bytes, no cache all-gather in HLO."""
    # One process (-n 0), the other worker paused (`whole_machine`): 8 device threads then have both
    # cores. -v and the durations name every test, and a test stuck 10 minutes dumps its stacks, so
    # a slow or hung CI run says where it was.
    cmd = [sys.executable, "-m", "pytest", "-v", "-n", "0", "-p", "no:cacheprovider", "--durations=8",
           "-o", "faulthandler_timeout=600", str(HERE / "multidevice")]
    try:
        r = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=2400)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"8-device session past {e.timeout} s:\n{_what_it_said(e.stdout, e.stderr)}")
    assert r.returncode == 0, f"exit {r.returncode}:\n{_what_it_said(r.stdout, r.stderr)}"
    assert " passed" in r.stdout and "failed" not in r.stdout


def _what_it_said(out: str | bytes | None, err: str | bytes | None) -> str:
    """A failed subprocess's report: its stdout's tail, XLA's own log lines (a fatal rendezvous timeout
    names the collective) and the first stack dump (faulthandler's timeout dump says where it hung),
    then the tail of stderr; tails alone lose the start of a crash."""
    text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else b or ""
    out, err = text(out), text(err)
    xla = [line[:300] for line in err.splitlines() if re.match(r"[FEW]\d{4} ", line)]
    dump = err.find("Timeout (")
    dump = err[dump:dump + 3000] if dump >= 0 else ""
    return "\n".join([out[-5000:], "--- XLA log ---", *xla[:20], "--- first stack dump ---", dump,
                      "--- stderr tail ---", err[-1500:]])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.whole_machine
def test_two_processes_give_the_tokens_of_one() -> None:
    """jax.distributed on localhost: 2 processes x 4 CPU devices, one 8-device mesh; process 0 alone
    prints, and its tokens equal a single process's."""
    from flax import nnx

    sys.path.insert(0, str(HERE / "multidevice"))
    try:
        from test_mesh import CFG, PLANS, prompts
    finally:
        sys.path.pop(0)
    from kvq_jax.decode import generate
    from kvq_jax.model import Transformer

    port = str(_free_port())
    env = _env(devices=4)
    worker = str(HERE / "multidevice" / "multiprocess_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, port, str(i)], env=env, cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, _what_it_said(out, err)
    # Only our tagged lines count: gloo logs to stdout in formats that vary across versions.
    tag = "kvq-result: "
    ours = lambda out: [l[len(tag):] for l in out.splitlines() if l.startswith(tag)]
    assert ours(outs[1][0]) == []  # only process 0 prints
    assert len(ours(outs[0][0])) == 1, outs[0][0][-3000:]
    got = json.loads(ours(outs[0][0])[0])
    for name in ("fp", "K4V2"):
        ref = generate(Transformer(CFG, rngs=nnx.Rngs(0)), prompts(), kv=PLANS[name], max_new_tokens=12).tokens
        for mesh in ("data=2,seq=4", "seq=8"):
            assert got[f"{name} {mesh}"] == ref, (name, mesh)
    assert np.asarray(got["fp seq=8"]).shape == (4, 12)
