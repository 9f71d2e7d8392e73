"""Orbax save/restore of converted params, so a model file is dequantized only once."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from kvq_jax.config import ModelConfig
from kvq_jax.errors import KvqError

FORMAT_VERSION = 1
_MARKER = "kvq_checkpoint.json"  # present only in directories this module wrote
_PARAMS = "params"
_CONFIG = "config.json"


def cache_dir_for(model_path: str | os.PathLike) -> Path:
    """Where the converted params of `model_path` live: `<stem>-<size>-<hash of path+mtime>`.

    Under `$KVQ_JAX_CACHE` or `~/.cache/kvq_jax`. A modified file gets a new directory.
    """
    p = Path(model_path).resolve()
    try:
        if p.is_dir():  # an HF directory: its files together
            stats = [f.stat() for f in sorted(p.iterdir()) if f.is_file()]
            size = sum(s.st_size for s in stats)
            mtime = max((s.st_mtime_ns for s in stats), default=0)
        else:
            st = p.stat()
            size, mtime = st.st_size, st.st_mtime_ns
    except OSError:
        raise KvqError(f"model file not found: {p}") from None
    digest = hashlib.sha256(f"{p}\0{mtime}".encode()).hexdigest()[:12]
    root = Path(os.environ.get("KVQ_JAX_CACHE") or Path.home() / ".cache" / "kvq_jax")
    return root / f"{p.stem}-{size}-{digest}"


def _is_ours(directory: Path) -> bool:
    return (directory / _MARKER).is_file()


def save_params(
    params: dict[str, np.ndarray], cfg: ModelConfig, directory: str | os.PathLike
) -> Path:
    """Writes `params` (orbax) and `cfg` (JSON) to `directory` atomically.

    Replaces an earlier checkpoint written here, never anything else.
    """
    import orbax.checkpoint as ocp  # heavy import: only when saving

    target = Path(directory).absolute()
    if target.exists() and not (_is_ours(target) or (target.is_dir() and not any(target.iterdir()))):
        raise KvqError(f"refusing to overwrite {target}: not a kvq_jax checkpoint")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a crash never leaves a half checkpoint in place.
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp / _PARAMS, {k: np.asarray(v) for k, v in params.items()})
            ckpt.wait_until_finished()
        cfg.save_json(tmp / _CONFIG)
        marker = {
            "format": FORMAT_VERSION,
            "params": {k: [str(np.asarray(v).dtype), list(np.shape(v))] for k, v in params.items()},
        }
        (tmp / _MARKER).write_text(json.dumps(marker))
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if _is_ours(target):  # a concurrent writer of the same params won the race
                return target
            raise
    except OSError as e:
        raise KvqError(f"cannot write checkpoint {target}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def restore_params(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, np.ndarray]] | None:
    """Reads a checkpoint written by `save_params`; None when absent, stale or unreadable."""
    d = Path(directory).absolute()
    if not _is_ours(d):
        return None
    try:
        marker: dict[str, Any] = json.loads((d / _MARKER).read_text())
        if marker.get("format") != FORMAT_VERSION:
            return None
        with open(d / _CONFIG) as f:
            cfg = ModelConfig.from_dict(json.load(f))
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(d / _PARAMS)
        params = {k: np.asarray(v) for k, v in restored.items()}
    except Exception:  # a damaged cache entry is re-converted, not fatal
        return None
    expected = marker.get("params", {})
    if set(params) != set(expected) or any(
        list(params[k].shape) != expected[k][1] for k in params
    ):
        return None
    return cfg, params
