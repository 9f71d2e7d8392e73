"""A separate pytest session on 8 CPU devices: `tests/test_sharding.py` runs it in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 and the flags of `xla_flags.py` (set here too, before
jax is imported), so the rest of the suite keeps one device."""

from __future__ import annotations

import os

from xla_flags import set_test_env

set_test_env(os.environ, 8)

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
