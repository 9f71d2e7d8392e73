"""Static model configuration: a frozen, hashable dataclass usable as a jit static argument."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import yaml

from kvq_jax.errors import KvqError

SUPPORTED_ARCHS = ("llama", "qwen2")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder.

    `qkv_bias` is True for qwen2 (biases on the Q/K/V projections).
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

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise KvqError(
                f"unsupported architecture {self.arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})"
            )
        if self.n_heads % self.n_kv_heads:
            raise KvqError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise KvqError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.n_heads // self.n_kv_heads

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_ids"] = list(self.eos_ids)
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
        """Builds a config from an HF `config.json` dict (LlamaForCausalLM / Qwen2ForCausalLM)."""
        mt = cfg.get("model_type", "")
        if mt not in SUPPORTED_ARCHS:
            raise KvqError(f"unsupported architecture {mt!r} (supported: {', '.join(SUPPORTED_ARCHS)})")
        if cfg.get("rope_scaling"):
            raise KvqError("rope_scaling is not supported yet")
        n_heads = int(cfg["num_attention_heads"])
        dim = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            arch=mt,
            vocab_size=int(cfg["vocab_size"]),
            dim=dim,
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads", n_heads)),
            head_dim=int(cfg.get("head_dim") or dim // n_heads),
            hidden_dim=int(cfg["intermediate_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=mt == "qwen2",
            max_seq_len=int(cfg.get("max_position_embeddings", 8192)),
            bos_id=cfg.get("bos_token_id"),
            eos_ids=eos_ids,
            name=name,
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
        return cls(
            arch=arch,
            vocab_size=int(vocab),
            dim=dim,
            n_layers=int(get("block_count")),
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
        )

    def save_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)


def tiny_config(arch: str = "llama", **kw: Any) -> ModelConfig:
    """A small random-weight config for unit tests."""
    base = dict(
        arch=arch, vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64,
        hidden_dim=128, norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=arch == "llama",
        qkv_bias=arch == "qwen2", max_seq_len=512, bos_id=1, eos_ids=(2,), name=f"tiny-{arch}",
    )
    base.update(kw)
    return ModelConfig(**base)
