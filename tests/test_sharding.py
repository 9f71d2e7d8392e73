"""Sharding on one device (rules, mesh parsing, errors), and the multi-device checks: an 8-device
pytest session (tests/multidevice) and a 2-process run, each in subprocesses."""

from __future__ import annotations

import json
import os
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


# XLA:CPU aborts the process when a device thread reaches a collective more than its termination
# timeout after the others (its default is tens of seconds): 8 simulated devices on a 2-core CI
# machine, beside the other pytest worker, fell that far behind once (a worker crashed in CI). The
# collectives themselves are fast; only the scheduling is slow, so the timeouts are raised.
COLLECTIVE_TIMEOUTS = ("--xla_cpu_collective_call_terminate_timeout_seconds=1200 "
                       "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300 "
                       "--xla_cpu_collective_timeout_seconds=1200")


def _env(devices: int = 8) -> dict[str, str]:
    env = dict(os.environ, KVQ_MULTIDEVICE="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {COLLECTIVE_TIMEOUTS}")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_eight_device_session() -> None:
    """tests/multidevice on 8 CPU devices: sharded generate/eval equal one device (fp, K4V2, a mixed
    plan; data=4, data=2/seq=4, model=3, seq=8), cache layout and bytes, no cache all-gather in HLO."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "multidevice")],
                       env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


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
        assert p.returncode == 0, err[-3000:]
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
