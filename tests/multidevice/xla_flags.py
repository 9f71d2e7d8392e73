"""XLA_FLAGS for the multi-device test processes, in one place: the 8-device session's conftest, the
2-process worker, and `tests/test_sharding.py`, which starts both with them."""

from __future__ import annotations

# XLA:CPU's multithreaded Eigen (the intra-op pool that the simulated devices share) can wedge on CI
# runners: one device then never reaches a collective, the others wait, and XLA aborts the process
# after its rendezvous timeouts (stop 26's CI: SIGABRT in test_chunked_prefill_on_meshes), or the
# session outlives its own timeout (stops 24 and 25). It never wedged here. Single-threaded Eigen per
# device avoids it, and 8 devices on 2 cores lose nothing by it. The raised timeouts keep a device
# that is merely slow (scheduling, not a wedge) from being taken for a dead one.
ROBUST = ("--xla_cpu_multi_thread_eigen=false",
          "--xla_cpu_collective_call_terminate_timeout_seconds=1200",
          "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300",
          "--xla_cpu_collective_timeout_seconds=1200")


def xla_flags_for(flags: str, devices: int) -> str:
    """`flags` plus `devices` simulated CPU devices and the flags above, each unless already set."""
    out = flags.split()
    for flag in (f"--xla_force_host_platform_device_count={devices}", *ROBUST):
        if not any(f.split("=")[0] == flag.split("=")[0] for f in out):
            out.append(flag)
    return " ".join(out)
