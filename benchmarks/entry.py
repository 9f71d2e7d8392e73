"""The benchmarks' one entry point: a bad model, text or plan, or a file that cannot be read or
written, is one line on stderr and exit 2."""

from __future__ import annotations

import os
import sys
from typing import Callable

from kvq_jax.errors import KvqError


def run(main: Callable[[], object]) -> None:
    """Calls a benchmark's `main`; a `KvqError` (the library's user errors) or an `OSError` ends it
    with one line."""
    try:
        main()
    except KvqError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))


def _fail(msg: str) -> None:
    print(f"{os.path.basename(sys.argv[0])}: error: {msg}", file=sys.stderr)
    sys.exit(2)
