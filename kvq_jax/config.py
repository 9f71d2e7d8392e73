"""Static model configuration: a frozen, hashable dataclass usable as a jit static argument."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import yaml

from kvq_jax.errors import KvqError

SUPPORTED_ARCHS = ("llama", "qwen2", "gemma3")
_HF_TYPES = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
GEMMA3_LOCAL_THETA = 10000.0  # llama.cpp and HF: local layers keep the base RoPE
GEMMA3_PATTERN = 6  # every 6th layer is global (5, 11, 17 of 18)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: `linear` (positions / factor), `llama3` (Llama 3.1's smooth band
    between `low_freq_factor` and `high_freq_factor` wavelengths of `original_max_position`), or
    `factors`: one divisor per frequency (`freq_factors [D/2]`, GGUF's `rope_freqs` tensor, which is
    how llama.cpp's converter stores Llama 3.1+ scaling)."""

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    freq_factors: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "llama3", "factors"):
            raise KvqError(f"unsupported RoPE scaling {self.kind!r} (supported: linear, llama3, factors)")
        object.__setattr__(self, "freq_factors", tuple(float(x) for x in self.freq_factors))
        bad = not self.factor > 0 or (self.kind == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor)
        if self.kind == "factors":
            bad = bad or not self.freq_factors or not all(math.isfinite(x) and x > 0 for x in self.freq_factors)
        elif self.freq_factors:
            bad = True
        if bad:
            raise KvqError(f"bad RoPE scaling parameters: {self}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RopeScaling":
        try:
            return cls(**d)
        except TypeError as e:
            raise KvqError(f"bad rope_scaling: {e}") from None

    @classmethod
    def from_hf(cls, d: Mapping[str, Any] | None) -> "RopeScaling | None":
        """HF `rope_scaling` (`rope_type` or the older `type`); None or `default` means none."""
        if not d:
            return None
        kind = d.get("rope_type", d.get("type"))
        if kind == "default":
            return None
        if kind == "linear":
            return cls("linear", float(d["factor"]))
        if kind == "llama3":
            return cls("llama3", float(d["factor"]), float(d.get("low_freq_factor", 1.0)),
                       float(d.get("high_freq_factor", 4.0)),
                       int(d.get("original_max_position_embeddings", 8192)))
        raise KvqError(f"unsupported RoPE scaling {kind!r} (supported: linear, llama3)")

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], arch: str) -> "RopeScaling | None":
        """GGUF `{arch}.rope.scaling.*`. Llama 3.1 files carry `rope_freqs` instead (see gguf_loader)."""
        kind = meta.get(f"{arch}.rope.scaling.type")
        factor = meta.get(f"{arch}.rope.scaling.factor")
        if kind in (None, "none") and not factor:
            return None
        if kind in (None, "linear"):
            return None if float(factor) == 1.0 else cls("linear", float(factor))
        raise KvqError(f"unsupported GGUF RoPE scaling {kind!r} (supported: linear)")


def _hf_gemma3(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The Gemma 3 fields of an HF config: window, which layers are local, local RoPE, query scale."""
    n = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types:
        if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
            raise KvqError(f"bad layer_types in config.json: {types!r}")
        local = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    else:
        pattern = int(cfg.get("sliding_window_pattern", GEMMA3_PATTERN))
        local = tuple(i for i in range(n) if (i + 1) % pattern)
    if cfg.get("attn_logit_softcapping"):
        raise KvqError("attention logit soft-capping (Gemma 2) is not supported")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise KvqError(f"unsupported Gemma activation {act!r} (supported: gelu_pytorch_tanh)")
    scalar = cfg.get("query_pre_attn_scalar")
    cap = cfg.get("final_logit_softcapping")
    return dict(sliding_window=int(cfg.get("sliding_window") or 0) if local else 0, local_layers=local,
                rope_local_theta=float(cfg.get("rope_local_base_freq", GEMMA3_LOCAL_THETA)),
                query_scale=None if scalar is None or float(scalar) == int(cfg.get("head_dim") or 0) else float(scalar) ** -0.5,
                final_logit_softcap=None if not cap else float(cap))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder (llama, qwen2, gemma3).

    `qkv_bias` is True for qwen2 (biases on the Q/K/V projections). `local_layers` attend to the last
    `sliding_window` positions only (RoPE base `rope_local_theta`, no scaling); the others are global
    (`rope_theta`, `rope_scaling`). `query_scale` multiplies q·k (default head_dim ** -0.5);
    `final_logit_softcap` caps the logits as `c * tanh(x / c)` where set.
    """

    arch: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    qkv_bias: bool = False
    max_seq_len: int = 8192
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    name: str = "model"
    sliding_window: int = 0
    local_layers: tuple[int, ...] = ()
    rope_local_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    query_scale: float | None = None
    final_logit_softcap: float | None = None

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise KvqError(
                f"unsupported architecture {self.arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})"
            )
        object.__setattr__(self, "local_layers", tuple(sorted(int(i) for i in self.local_layers)))
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        if self.rope_scaling is not None and self.rope_scaling.kind == "factors" \
                and len(self.rope_scaling.freq_factors) != self.head_dim // 2:
            raise KvqError(f"RoPE freq_factors has {len(self.rope_scaling.freq_factors)} entries, "
                           f"head_dim {self.head_dim} needs {self.head_dim // 2}")
        if self.local_layers and not (self.sliding_window >= 1 and 0 <= self.local_layers[0]
                                      and self.local_layers[-1] < self.n_layers):
            raise KvqError(f"local_layers {list(self.local_layers)} need a sliding_window >= 1 and "
                           f"indices in [0, {self.n_layers})")
        if self.n_heads % self.n_kv_heads:
            raise KvqError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise KvqError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.n_heads // self.n_kv_heads

    def window(self, layer: int) -> int:
        """Positions a layer attends to (its sliding window), 0 for a global layer."""
        return self.sliding_window if layer in self.local_layers else 0

    def rope(self, layer: int) -> tuple[float, RopeScaling | None]:
        """RoPE base and scaling of a layer."""
        if layer in self.local_layers:
            return self.rope_local_theta, None
        return self.rope_theta, self.rope_scaling

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5 if self.query_scale is None else self.query_scale

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_ids"] = list(self.eos_ids)
        d["local_layers"] = list(self.local_layers)
        if self.rope_scaling is not None:
            d["rope_scaling"]["freq_factors"] = list(self.rope_scaling.freq_factors)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise KvqError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        d = dict(d)
        if "eos_ids" in d:
            d["eos_ids"] = tuple(int(x) for x in d["eos_ids"])
        if "local_layers" in d:
            d["local_layers"] = tuple(int(x) for x in d["local_layers"])
        if isinstance(d.get("rope_scaling"), Mapping):
            d["rope_scaling"] = RopeScaling.from_dict(d["rope_scaling"])
        try:
            return cls(**d)
        except TypeError as e:
            raise KvqError(f"bad model config: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "ModelConfig":
        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f))

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], name: str = "model") -> "ModelConfig":
        """Builds a config from an HF `config.json` dict (Llama, Qwen2, Gemma 3 text)."""
        mt = cfg.get("model_type", "")
        if mt == "gemma3" and isinstance(cfg.get("text_config"), Mapping):
            cfg = {**cfg["text_config"], "model_type": "gemma3_text"}  # the text tower of Gemma 3 4B+
        if mt not in _HF_TYPES:
            raise KvqError(f"unsupported architecture {mt!r} (supported: {', '.join(_HF_TYPES)})")
        arch = _HF_TYPES[mt]
        extra: dict[str, Any] = {}
        if arch == "gemma3":
            extra = _hf_gemma3(cfg)
        n_heads = int(cfg["num_attention_heads"])
        dim = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            arch=arch,
            vocab_size=int(cfg["vocab_size"]),
            dim=dim,
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads", n_heads)),
            head_dim=int(cfg.get("head_dim") or dim // n_heads),
            hidden_dim=int(cfg["intermediate_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", arch == "gemma3")),
            qkv_bias=arch == "qwen2",
            max_seq_len=int(cfg.get("max_position_embeddings", 8192)),
            bos_id=cfg.get("bos_token_id"),
            eos_ids=eos_ids,
            name=name,
            rope_scaling=RopeScaling.from_hf(cfg.get("rope_scaling")),
            **extra,
        )

    @classmethod
    def from_gguf_metadata(
        cls, meta: Mapping[str, Any], has_output_weight: bool, name: str = "model"
    ) -> "ModelConfig":
        """Builds a config from GGUF key/values (`{arch}.block_count`, ...)."""
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise KvqError(f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")

        def get(key: str, default: Any = None) -> Any:
            full = f"{arch}.{key}"
            if full in meta:
                return meta[full]
            if default is None:
                raise KvqError(f"GGUF metadata lacks {full!r}")
            return default

        dim = int(get("embedding_length"))
        n_heads = int(get("attention.head_count"))
        vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eos_ids = () if eos is None else (int(eos),)
        # im_end ends a chat turn even where the file names another EOS.
        tokens = meta.get("tokenizer.ggml.tokens") or ()
        if "<|im_end|>" in tokens:
            im_end = list(tokens).index("<|im_end|>")
            if im_end not in eos_ids:
                eos_ids = eos_ids + (im_end,)
        head_dim = int(meta.get(f"{arch}.attention.key_length") or dim // n_heads)
        bos = meta.get("tokenizer.ggml.bos_token_id")
        n_layers = int(get("block_count"))
        extra: dict[str, Any] = {}
        if arch == "gemma3":
            # llama.cpp fixes what the file does not say: the 5-local-1-global pattern and the local
            # RoPE base; Gemma 3 scales queries by query_pre_attn_scalar ** -0.5 = head_dim ** -0.5.
            extra = dict(sliding_window=int(get("attention.sliding_window")),
                         local_layers=tuple(i for i in range(n_layers) if (i + 1) % GEMMA3_PATTERN),
                         rope_local_theta=GEMMA3_LOCAL_THETA)
            if n_layers == 62:  # Gemma 3 27B: query_pre_attn_scalar = dim / heads, as llama.cpp sets it
                extra["query_scale"] = (dim / n_heads) ** -0.5
            cap = meta.get(f"{arch}.final_logit_softcapping")
            if cap:
                extra["final_logit_softcap"] = float(cap)
        return cls(
            arch=arch,
            vocab_size=int(vocab),
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            hidden_dim=int(get("feed_forward_length")),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            tie_embeddings=not has_output_weight,
            qkv_bias=arch == "qwen2",
            max_seq_len=int(get("context_length", 8192)),
            bos_id=None if bos is None else int(bos),
            eos_ids=eos_ids,
            name=name,
            rope_scaling=RopeScaling.from_gguf(meta, arch),
            **extra,
        )

    def save_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)


def tiny_config(arch: str = "llama", **kw: Any) -> ModelConfig:
    """A small random-weight config for unit tests."""
    base = dict(
        arch=arch, vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64,
        hidden_dim=128, norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=arch in ("llama", "gemma3"),
        qkv_bias=arch == "qwen2", max_seq_len=512, bos_id=1, eos_ids=(2,), name=f"tiny-{arch}",
    )
    base.update(kw)
    return ModelConfig(**base)
