"""HF model directory (config.json, *.safetensors, tokenizer.json) -> (ModelConfig, params, Tokenizer)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Iterator

import ml_dtypes
import numpy as np
from safetensors import safe_open

from kvq_jax.config import ModelConfig
from kvq_jax.errors import KvqError
from kvq_jax.tokenizer import Tokenizer

# canonical per-layer name -> (HF name under model.layers.N., transpose for `x @ w`)
_LAYER_TENSORS = {
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
}
_LAYER_BIASES = {"bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias",
                 "bv": "self_attn.v_proj.bias"}
# Gemma 3: the norm after attention is post_attention_layernorm (Llama's name for the pre-MLP norm).
_GEMMA3_TENSORS = {
    "attn_norm": ("input_layernorm.weight", False),
    "post_attn_norm": ("post_attention_layernorm.weight", False),
    "mlp_norm": ("pre_feedforward_layernorm.weight", False),
    "post_mlp_norm": ("post_feedforward_layernorm.weight", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
}
_GEMMA_PREFIXES = ("model.", "model.language_model.", "language_model.model.")
_RAW_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise KvqError(f"missing {path.name} in {path.parent}") from None
    except (OSError, ValueError) as e:
        raise KvqError(f"cannot read {path}: {' '.join(str(e).split())}") from None
    if not isinstance(d, dict):
        raise KvqError(f"{path} is not a JSON object")
    return d


def _read_raw(path: Path, name: str) -> np.ndarray:
    """Reads one tensor straight from the safetensors layout (numpy has no bf16 of its own)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        info = header[name]
        if info["dtype"] not in _RAW_DTYPES:
            raise KvqError(f"unsupported safetensors dtype {info['dtype']} for {name} in {path.name}")
        start, end = info["data_offsets"]
        f.seek(8 + n + start)
        buf = f.read(end - start)
    return np.frombuffer(buf, dtype=_RAW_DTYPES[info["dtype"]]).reshape(info["shape"])


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    for path in files:
        try:
            with safe_open(os.fspath(path), framework="np") as f:
                for name in f.keys():
                    try:
                        arr = f.get_tensor(name)
                    except TypeError:  # bf16 without a numpy dtype registered
                        arr = _read_raw(path, name)
                    yield name, arr
        except KvqError:
            raise
        except Exception as e:
            raise KvqError(f"cannot read {path}: {' '.join(str(e).split())[:300]}") from None


def load_hf_params(
    directory: str | os.PathLike, cfg: ModelConfig, dtype: Any = np.float32
) -> dict[str, np.ndarray]:
    """Reads `*.safetensors` of an HF directory into the canonical parameter dict."""
    d = Path(directory)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise KvqError(f"no *.safetensors files in {d}")
    raw = dict(_iter_safetensors(files))
    dt = np.dtype(dtype)

    c = cfg
    gemma = c.arch == "gemma3"
    # Gemma 3 multimodal checkpoints nest the text model; take whichever prefix the file uses.
    root = next((p for p in _GEMMA_PREFIXES if p + "embed_tokens.weight" in raw), "model.") if gemma else "model."

    def get(name: str, canon: str, shape: tuple[int, ...], transpose: bool) -> np.ndarray:
        if name.startswith("model."):
            name = root + name[len("model."):]
        if name not in raw:
            raise KvqError(f"{d.name} lacks tensor {name}")
        w = raw[name].T if transpose else raw[name]
        if w.shape != shape:
            raise KvqError(f"tensor {name} has shape {w.shape} for {canon}, expected {shape}")
        w = np.asarray(w, dtype=np.float32)
        if gemma and canon.endswith("norm"):
            w = w + 1.0  # Gemma's RMSNorm multiplies by 1 + w; the model multiplies by its weight
        return np.ascontiguousarray(w, dtype=dt)

    q_out, kv_out = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    params = {
        "embed": get("model.embed_tokens.weight", "embed", (c.vocab_size, c.dim), False),
        "final_norm": get("model.norm.weight", "final_norm", (c.dim,), False),
    }
    if not c.tie_embeddings:
        params["lm_head"] = get("lm_head.weight", "lm_head", (c.vocab_size, c.dim), False)
    shapes = {
        "attn_norm": (c.dim,), "wq": (c.dim, q_out), "wk": (c.dim, kv_out), "wv": (c.dim, kv_out),
        "wo": (q_out, c.dim), "mlp_norm": (c.dim,), "w_gate": (c.dim, c.hidden_dim),
        "w_up": (c.dim, c.hidden_dim), "w_down": (c.hidden_dim, c.dim),
        "q_norm": (c.head_dim,), "k_norm": (c.head_dim,), "post_attn_norm": (c.dim,), "post_mlp_norm": (c.dim,),
    }
    layer_tensors = {**_LAYER_TENSORS, **_GEMMA3_TENSORS} if gemma else _LAYER_TENSORS
    for i in range(c.n_layers):
        pre = f"model.layers.{i}."
        for canon, (suffix, transpose) in layer_tensors.items():
            params[f"layers.{i}.{canon}"] = get(pre + suffix, f"layers.{i}.{canon}",
                                                shapes[canon], transpose)
        if c.qkv_bias:
            for canon, suffix in _LAYER_BIASES.items():
                shape = (q_out,) if canon == "bq" else (kv_out,)
                params[f"layers.{i}.{canon}"] = get(pre + suffix, f"layers.{i}.{canon}", shape, False)
    return params


def read_hf_dir(
    path: str | os.PathLike, dtype: Any = np.float32
) -> tuple[ModelConfig, dict[str, np.ndarray], Tokenizer]:
    """Reads an HF model directory: config, params (HF order, no RoPE permutation), tokenizer."""
    d = Path(path)
    if not d.is_dir():
        raise KvqError(f"model directory not found: {d}")
    try:
        cfg = ModelConfig.from_hf_config(_read_json(d / "config.json"), name=d.name)
    except KeyError as e:
        raise KvqError(f"config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise KvqError(f"bad config.json: {' '.join(str(e).split())}") from None

    tok_cfg = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
    jinja = d / "chat_template.jinja"  # newer transformers save the template beside
    if "chat_template" not in tok_cfg and jinja.is_file():
        tok_cfg["chat_template"] = jinja.read_text(encoding="utf-8")
    gen = _read_json(d / "generation_config.json") if (d / "generation_config.json").is_file() else {}
    eos: list[Any] = [*cfg.eos_ids]
    for v in (gen.get("eos_token_id"), tok_cfg.get("eos_token_id")):
        eos += v if isinstance(v, list) else ([] if v is None else [v])
    tok_cfg["eos_token_id"] = eos
    if cfg.bos_id is not None:
        tok_cfg.setdefault("bos_token_id", cfg.bos_id)
    if not (d / "tokenizer.json").is_file():
        raise KvqError(f"missing tokenizer.json in {d}")
    tok = Tokenizer.from_file(d / "tokenizer.json", tok_cfg)

    eos_ids = tuple(dict.fromkeys((*cfg.eos_ids, *tok.eos_ids)))
    cfg = cfg.replace(eos_ids=eos_ids)
    tok.eos_ids = eos_ids  # one stop set for the model and the tokenizer
    params = load_hf_params(d, cfg, dtype)
    return cfg, params, tok
