"""A separate pytest session on 8 CPU devices: `tests/test_sharding.py` runs it in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before jax is imported), so the rest of the
suite keeps one device."""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
