"""The benchmarks' one output format: a JSON line on stdout, appended to `--out` when given."""

from __future__ import annotations

import json
from typing import Any


def emit(rec: dict[str, Any], out: str | None) -> None:
    """Prints `rec` as one JSON line and appends the same line to `out` (if any)."""
    line = json.dumps(rec)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")
