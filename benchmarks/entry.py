"""The benchmarks' one entry point: a bad model, text or plan, or a file that cannot be read or
written, is one line on stderr and exit 2; so is a `kvq_jax` installed from other code than this
checkout's (a non-editable install left behind), whose numbers would not be this code's."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import kvq_jax
from kvq_jax.errors import KvqError


def run(main: Callable[[], object]) -> None:
    """Calls a benchmark's `main`; a `KvqError` (the library's user errors) or an `OSError` ends it
    with one line."""
    stale = _stale_install()
    if stale:
        _fail(stale)
    try:
        main()
    except KvqError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))


def _stale_install() -> str | None:
    """Why the imported packages are not this checkout's code, or None (the same files: an editable
    install, or one made from this checkout as it is)."""
    repo = Path(__file__).resolve().parents[1]
    used = Path(kvq_jax.__file__).resolve().parents[1]
    if used == repo or not (repo / "kvq_jax" / "__init__.py").is_file():
        return None
    for pkg in ("kvq_jax", "pallas_kernels"):
        for mine in sorted((repo / pkg).glob("*.py")):
            theirs = used / pkg / mine.name
            if not theirs.is_file() or theirs.read_bytes() != mine.read_bytes():
                return (f"the kvq_jax imported from {used} is not this checkout's code ({pkg}/{mine.name} differs): "
                        f"pip install -e {repo}")
    return None


def _fail(msg: str) -> None:
    print(f"{os.path.basename(sys.argv[0])}: error: {msg}", file=sys.stderr)
    sys.exit(2)
