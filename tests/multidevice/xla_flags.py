"""The environment of the multi-device test processes, in one place: the 8-device session's conftest,
the 2-process worker, and `tests/test_sharding.py`, which starts both with it."""

from __future__ import annotations

from typing import MutableMapping

# XLA:CPU runs each simulated device's collective thunks on one shared intra-op pool (by default as
# many threads as devices), and a thread in a collective blocks until every device joins it. When a
# program has independent collectives, the pool's threads can all end up in *different* rendezvous,
# with the thunks that would complete them queued behind: a deadlock. Seen here once (stop 27: 8 pool
# threads in AllGather, load 0, in test_chunked_prefill_on_meshes) and in CI three times (stops
# 24-26: timeouts, then XLA's SIGABRT at a rendezvous). A pool of 32 threads (PJRT_NPROC) leaves room
# for 4 independent collectives per device. Single-threaded Eigen keeps matrix products off that
# pool, and the raised timeouts keep a device that is merely slow from being taken for a dead one.
ROBUST = ("--xla_cpu_multi_thread_eigen=false",
          "--xla_cpu_collective_call_terminate_timeout_seconds=1200",
          "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300",
          "--xla_cpu_collective_timeout_seconds=1200")
POOL_THREADS = "32"


def xla_flags_for(flags: str, devices: int) -> str:
    """`flags` plus `devices` simulated CPU devices and the flags above, each unless already set."""
    out = flags.split()
    for flag in (f"--xla_force_host_platform_device_count={devices}", *ROBUST):
        if not any(f.split("=")[0] == flag.split("=")[0] for f in out):
            out.append(flag)
    return " ".join(out)


def set_test_env(environ: MutableMapping[str, str], devices: int) -> None:
    """XLA_FLAGS (above) and the intra-op pool's size, set in `environ` before jax is imported."""
    environ["XLA_FLAGS"] = xla_flags_for(environ.get("XLA_FLAGS", ""), devices)
    environ.setdefault("PJRT_NPROC", POOL_THREADS)
