"""GGUF file -> (ModelConfig, canonical numpy params, Tokenizer). Quantized tensors are dequantized."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize

from kvq_jax.config import ModelConfig, RopeScaling
from kvq_jax.errors import KvqError
from kvq_jax.tokenizer import Tokenizer

SUPPORTED_TYPES = frozenset(
    {QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K}
)

# canonical per-layer name -> (GGUF name, transpose for `x @ w`)
_LAYER_TENSORS = {
    "attn_norm": ("attn_norm.weight", False),
    "wq": ("attn_q.weight", True),
    "wk": ("attn_k.weight", True),
    "wv": ("attn_v.weight", True),
    "wo": ("attn_output.weight", True),
    "mlp_norm": ("ffn_norm.weight", False),
    "w_gate": ("ffn_gate.weight", True),
    "w_up": ("ffn_up.weight", True),
    "w_down": ("ffn_down.weight", True),
}
_LAYER_BIASES = {"bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias"}
# Gemma 3's extra norms (llama.cpp's converter stores every Gemma norm as 1 + w: used as is).
_GEMMA3_TENSORS = {
    "q_norm": ("attn_q_norm.weight", False),
    "k_norm": ("attn_k_norm.weight", False),
    "post_attn_norm": ("post_attention_norm.weight", False),
    "post_mlp_norm": ("post_ffw_norm.weight", False),
}


def open_gguf(path: str | os.PathLike) -> GGUFReader:
    """Opens a GGUF file; every failure becomes a one-line KvqError."""
    p = Path(path)
    if not p.is_file():
        raise KvqError(f"model file not found: {p}")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise KvqError(f"cannot read {p}: {e.strerror}") from None
    if magic != b"GGUF":
        raise KvqError(f"not a GGUF file: {p}")
    try:
        return GGUFReader(p)
    except Exception as e:  # gguf raises ValueError/IndexError/... on truncated or corrupt files
        raise KvqError(f"corrupt or truncated GGUF file {p}: {_one_line(e)}") from None


def _field_value(field: Any) -> Any:
    """A reader field as plain python (str, int, float, bool or list of them)."""
    types = field.types
    if not types:
        return None

    def scalar(part: np.ndarray, t: GGUFValueType) -> Any:
        if t == GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        v = part.tolist()[0]
        return bool(v) if t == GGUFValueType.BOOL else v

    if types[0] == GGUFValueType.ARRAY:
        sub = types[-1]
        if sub == GGUFValueType.ARRAY:
            return None  # nested arrays: not used by any key we read
        if sub != GGUFValueType.STRING and field.data:
            # Numeric arrays: contiguous parts, one ndarray per element; concatenate once.
            vals = np.concatenate([field.parts[i] for i in field.data]).tolist()
            return [bool(v) for v in vals] if sub == GGUFValueType.BOOL else vals
        return [scalar(field.parts[i], sub) for i in field.data]
    return scalar(field.parts[-1], types[0])


def gguf_metadata(reader: GGUFReader) -> dict[str, Any]:
    """All GGUF key/values as plain python values (the `GGUF.*` header pseudo-keys excluded)."""
    try:
        return {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except Exception as e:
        raise KvqError(f"corrupt GGUF metadata: {_one_line(e)}") from None


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The key/values of a GGUF file's header, as `gguf_metadata` returns them, without the tensors.

    A direct parse of the header (strings and arrays read in one pass): gguf's reader builds one
    numpy view per string, ~30 s for Gemma's 262k-token vocabulary; this takes well under a second.
    """
    import struct

    def fail(why: str) -> KvqError:
        return KvqError(f"corrupt or truncated GGUF file {path}: {why}")

    try:
        buf = memoryview(Path(path).read_bytes())
    except OSError as e:
        raise KvqError(f"cannot read {path}: {e.strerror}") from None
    if bytes(buf[:4]) != b"GGUF":
        raise KvqError(f"not a GGUF file: {path}")
    at = 4

    def take(fmt: str) -> Any:
        nonlocal at
        n = struct.calcsize(fmt)
        if at + n > len(buf):
            raise fail("header runs past the end")
        (v,) = struct.unpack_from(fmt, buf, at)
        at += n
        return v

    def string() -> str:
        nonlocal at
        n = take("<Q")
        if at + n > len(buf):
            raise fail("string runs past the end")
        v = bytes(buf[at:at + n]).decode("utf-8", errors="replace")
        at += n
        return v

    def value(t: int) -> Any:
        nonlocal at
        if t == 8:
            return string()
        if t == 9:
            sub, n = take("<I"), take("<Q")
            if sub == 8:
                return [string() for _ in range(n)]
            if sub not in _NUMPY:
                if sub == 9:
                    raise fail("nested arrays are not supported")
                raise fail(f"unknown value type {sub}")
            dt = np.dtype(_NUMPY[sub])
            if at + n * dt.itemsize > len(buf):
                raise fail("array runs past the end")
            arr = np.frombuffer(buf, dt, n, at)
            at += n * dt.itemsize
            return [bool(v) for v in arr.tolist()] if sub == 7 else arr.tolist()
        if t not in _SCALARS:
            raise fail(f"unknown value type {t}")
        return take(_SCALARS[t])

    version = take("<I")
    if version < 2:
        raise KvqError(f"GGUF version {version} is not supported: {path}")
    take("<Q")  # tensor count
    meta = {}
    for _ in range(take("<Q")):
        key = string()
        meta[key] = value(take("<I"))
    return meta


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation ([out, ...] layout) back to HF rotate-half order."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise KvqError(f"cannot un-permute a tensor of {rows} rows for {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequant(t: Any) -> np.ndarray:
    ttype = QT(t.tensor_type)
    if ttype not in SUPPORTED_TYPES:
        raise KvqError(f"unsupported GGUF tensor type {ttype.name} in {t.name}")
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    try:
        if ttype == QT.F32:
            w = np.asarray(t.data, dtype=np.float32)
        elif ttype == QT.F16:
            w = np.asarray(t.data).astype(np.float32)
        else:
            w = dequantize(t.data, ttype)
        return w.reshape(shape)
    except Exception as e:
        raise KvqError(f"cannot decode GGUF tensor {t.name}: {_one_line(e)}") from None


def load_gguf_params(
    reader: GGUFReader, cfg: ModelConfig, dtype: Any = np.float32
) -> dict[str, np.ndarray]:
    """Dequantizes the GGUF tensors into the canonical parameter dict (see docs/architecture.md)."""
    tensors = {t.name: t for t in reader.tensors}
    dt = np.dtype(dtype)

    def get(name: str, canon: str, shape: tuple[int, ...], transpose: bool,
            n_rope_heads: int | None = None) -> np.ndarray:
        if name not in tensors:
            raise KvqError(f"GGUF file lacks tensor {name}")
        w = _dequant(tensors[name])
        # GGUF [out, in] rows are RoPE-permuted for llama; undo before transposing.
        if n_rope_heads is not None:
            w = _unpermute_rope(w, n_rope_heads)
        if transpose:
            w = w.T
        if w.shape != shape:
            raise KvqError(f"GGUF tensor {name} has shape {w.shape} for {canon}, expected {shape}")
        return np.ascontiguousarray(w, dtype=dt)

    c = cfg
    q_out, kv_out = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    permuted = c.arch == "llama"  # qwen2 and gemma3 GGUFs use NeoX RoPE: stored in HF order
    params = {
        "embed": get("token_embd.weight", "embed", (c.vocab_size, c.dim), False),
        "final_norm": get("output_norm.weight", "final_norm", (c.dim,), False),
    }
    if not c.tie_embeddings:
        params["lm_head"] = get("output.weight", "lm_head", (c.vocab_size, c.dim), False)
    shapes = {
        "attn_norm": (c.dim,), "wq": (c.dim, q_out), "wk": (c.dim, kv_out), "wv": (c.dim, kv_out),
        "wo": (q_out, c.dim), "mlp_norm": (c.dim,), "w_gate": (c.dim, c.hidden_dim),
        "w_up": (c.dim, c.hidden_dim), "w_down": (c.hidden_dim, c.dim),
        "q_norm": (c.head_dim,), "k_norm": (c.head_dim,), "post_attn_norm": (c.dim,), "post_mlp_norm": (c.dim,),
    }
    layer_tensors = {**_LAYER_TENSORS, **(_GEMMA3_TENSORS if c.arch == "gemma3" else {})}
    rope_heads = {"wq": c.n_heads, "wk": c.n_kv_heads, "bq": c.n_heads, "bk": c.n_kv_heads}
    for i in range(c.n_layers):
        for canon, (suffix, transpose) in layer_tensors.items():
            params[f"layers.{i}.{canon}"] = get(
                f"blk.{i}.{suffix}", f"layers.{i}.{canon}", shapes[canon], transpose,
                rope_heads.get(canon) if permuted else None,
            )
        if c.qkv_bias:
            for canon, suffix in _LAYER_BIASES.items():
                shape = (q_out,) if canon == "bq" else (kv_out,)
                params[f"layers.{i}.{canon}"] = get(
                    f"blk.{i}.{suffix}", f"layers.{i}.{canon}", shape, False,
                    rope_heads.get(canon) if permuted else None,
                )
    return params


def _with_rope_freqs(cfg: ModelConfig, t: Any) -> ModelConfig:
    """Llama 3.1+ GGUF files store their RoPE scaling as per-frequency divisors (`rope_freqs`, what
    llama.cpp's converter computes from HF's `llama3` parameters); ignoring them is silently wrong."""
    if cfg.rope_scaling is not None:
        raise KvqError(f"this GGUF file has both rope_freqs and {cfg.arch}.rope.scaling.* "
                       f"({cfg.rope_scaling.kind}); combining them is not supported")
    f = _dequant(t).reshape(-1)
    if f.shape[0] != cfg.head_dim // 2:
        raise KvqError(f"GGUF rope_freqs has {f.shape[0]} entries, head_dim {cfg.head_dim} needs {cfg.head_dim // 2}")
    return cfg.replace(rope_scaling=RopeScaling("factors", freq_factors=tuple(float(x) for x in f)))


def read_gguf(
    path: str | os.PathLike, dtype: Any = np.float32
) -> tuple[ModelConfig, dict[str, np.ndarray], Tokenizer]:
    """Reads a GGUF model file: config from metadata, dequantized params, tokenizer."""
    reader = open_gguf(path)
    meta = gguf_metadata(reader)
    names = {t.name for t in reader.tensors}
    cfg = ModelConfig.from_gguf_metadata(
        meta, has_output_weight="output.weight" in names,
        name=str(meta.get("general.name") or Path(path).stem),
    )
    if "rope_freqs.weight" in names:
        cfg = _with_rope_freqs(cfg, next(t for t in reader.tensors if t.name == "rope_freqs.weight"))
    tok = Tokenizer.from_gguf_metadata(meta)
    # The embedding decides the logits width (some files pad it beyond the token list).
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is not None and len(embd.shape) == 2 and int(embd.shape[1]) != cfg.vocab_size:
        cfg = cfg.replace(vocab_size=int(embd.shape[1]))
    eos = tuple(dict.fromkeys((*cfg.eos_ids, *tok.eos_ids)))
    if eos != cfg.eos_ids:
        cfg = cfg.replace(eos_ids=eos)
    tok.eos_ids = eos  # one stop set for the model and the tokenizer
    params = load_gguf_params(reader, cfg, dtype)
    return cfg, params, tok


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__
