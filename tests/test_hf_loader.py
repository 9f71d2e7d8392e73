"""HF directory loader: the same weights via HF and GGUF give the same canonical params."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from kvq_jax.config import ModelConfig
from kvq_jax.errors import KvqError
from kvq_jax.gguf_loader import read_gguf
from kvq_jax.hf_loader import read_hf_dir
from kvq_jax.tokenizer import Tokenizer


def _helpers() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "_kvq_test_gguf_helpers", Path(__file__).with_name("test_gguf.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


H = _helpers()
_HF_LAYER = {
    "attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight", "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight",
    "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias",
}
_HF_GEMMA3 = {
    "post_attn_norm": "post_attention_layernorm.weight", "mlp_norm": "pre_feedforward_layernorm.weight",
    "post_mlp_norm": "post_feedforward_layernorm.weight", "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
}
BF16_KEY = "layers.0.w_up"


def write_hf_dir(d: Path, cfg: ModelConfig, params: dict[str, np.ndarray], tok: Tokenizer) -> None:
    """A minimal HF checkpoint: config.json, two safetensors shards (one bf16 tensor), tokenizer."""
    d.mkdir(parents=True, exist_ok=True)
    gemma = cfg.arch == "gemma3"
    extra = dict(
        layer_types=["sliding_attention" if cfg.window(i) else "full_attention" for i in range(cfg.n_layers)],
        sliding_window=cfg.sliding_window, rope_local_base_freq=cfg.rope_local_theta,
        query_pre_attn_scalar=cfg.head_dim, hidden_activation="gelu_pytorch_tanh",
    ) if gemma else {}
    (d / "config.json").write_text(json.dumps({
        **extra, "model_type": "gemma3_text" if gemma else cfg.arch, "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.hidden_dim, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_seq_len, "bos_token_id": cfg.bos_id,
        "eos_token_id": list(cfg.eos_ids),
    }))
    # HF Gemma norms store w for a multiplier of 1 + w.
    shift = lambda key, w: w - 1.0 if gemma and key.endswith("norm") else w
    hf: dict[str, np.ndarray] = {"model.embed_tokens.weight": params["embed"],
                                 "model.norm.weight": shift("final_norm", params["final_norm"])}
    if "lm_head" in params:
        hf["lm_head.weight"] = params["lm_head"]
    names = {**_HF_LAYER, **(_HF_GEMMA3 if gemma else {})}
    for key, w in params.items():
        if key.startswith("layers."):
            _, i, canon = key.split(".")
            hf[f"model.layers.{i}.{names[canon]}"] = np.ascontiguousarray(shift(key, w.T if w.ndim == 2 else w))
    bf_name = "model.layers.0.mlp.up_proj.weight"
    hf[bf_name] = hf[bf_name].astype(ml_dtypes.bfloat16)
    names = sorted(hf)
    half = len(names) // 2
    save_file({k: hf[k] for k in names[:half]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: hf[k] for k in names[half:]}, str(d / "model-00002-of-00002.safetensors"))
    tok.backend.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": tok.chat_template, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_hf_matches_gguf(tmp_path: Path, arch: str) -> None:
    """Same weights through both loaders; for gemma3 the HF norms are w, the GGUF ones 1 + w."""
    meta = H.tiny_tokenizer_meta()
    # gemma3 GGUF: llama.cpp's fixed pattern makes every layer of a 2-layer model local.
    kw = dict(sliding_window=8, local_layers=(0, 1)) if arch == "gemma3" else {}
    cfg = H.tiny_cfg(arch, name="x", **kw)
    params = H.random_params(cfg, seed=7)
    # The bf16 tensor: both paths must see the same (bf16-rounded) values.
    params[BF16_KEY] = params[BF16_KEY].astype(ml_dtypes.bfloat16).astype(np.float32)

    gguf_path = tmp_path / "m.gguf"
    H.write_gguf(gguf_path, cfg, H.gguf_tensors(cfg, params), meta)
    g_cfg, g_params, g_tok = read_gguf(gguf_path)

    write_hf_dir(tmp_path / "hf", cfg, params, g_tok)
    h_cfg, h_params, h_tok = read_hf_dir(tmp_path / "hf")

    assert h_cfg.name == "hf"
    assert h_cfg == g_cfg.replace(name="hf")
    assert set(h_params) == set(g_params) == set(params)
    for k in params:
        assert h_params[k].dtype == np.float32
        np.testing.assert_array_equal(h_params[k], g_params[k], err_msg=k)
        np.testing.assert_array_equal(h_params[k], params[k], err_msg=k)
    text = "The capital of France is Paris. <|im_start|>user 123"
    assert h_tok.encode(text) == g_tok.encode(text)
    assert h_tok.chat_prompt("Hi") == g_tok.chat_prompt("Hi")
    assert (h_tok.bos_id, h_tok.eos_ids) == (g_tok.bos_id, g_tok.eos_ids)


def test_hf_dtype_and_tied_extra_lm_head(tmp_path: Path) -> None:
    cfg = H.tiny_cfg()
    params = H.random_params(cfg)
    tok = Tokenizer.from_gguf_metadata(H.tiny_tokenizer_meta())
    write_hf_dir(tmp_path, cfg, {**params, "lm_head": params["embed"]}, tok)  # saved anyway
    got_cfg, got, _ = read_hf_dir(tmp_path)
    assert got_cfg.tie_embeddings and "lm_head" not in got
    _, half, _ = read_hf_dir(tmp_path, dtype=np.float16)
    assert half["layers.1.wq"].dtype == np.float16


def _broken(tmp_path: Path) -> Path:
    cfg = H.tiny_cfg()
    d = tmp_path / "broken"
    write_hf_dir(d, cfg, H.random_params(cfg), Tokenizer.from_gguf_metadata(H.tiny_tokenizer_meta()))
    return d


def test_hf_errors(tmp_path: Path) -> None:
    with pytest.raises(KvqError, match="not found"):
        read_hf_dir(tmp_path / "nothing")
    d = _broken(tmp_path)
    (d / "tokenizer.json").unlink()
    with pytest.raises(KvqError, match="missing tokenizer.json"):
        read_hf_dir(d)

    d = _broken(tmp_path)
    for f in d.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(KvqError, match="no \\*.safetensors"):
        read_hf_dir(d)

    d = _broken(tmp_path)
    shard = d / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(KvqError, match="cannot read"):
        read_hf_dir(d)

    d = _broken(tmp_path)
    shard.unlink()
    with pytest.raises(KvqError, match="lacks tensor"):
        read_hf_dir(d)

    d = _broken(tmp_path)
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(KvqError, match="unsupported architecture"):
        read_hf_dir(d)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(KvqError, match="config.json lacks 'num_attention_heads'"):
        read_hf_dir(d)
    (d / "config.json").write_text("{oops")
    with pytest.raises(KvqError, match="cannot read"):
        read_hf_dir(d)
    (d / "config.json").unlink()
    with pytest.raises(KvqError, match="missing config.json"):
        read_hf_dir(d)


def test_raw_bf16_reader(tmp_path: Path) -> None:
    """The fallback used when numpy has no bfloat16 registered reads the bytes as written."""
    from kvq_jax.hf_loader import _read_raw

    x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)
    save_file({"a": x, "b": np.ones(5, np.float16)}, str(tmp_path / "t.safetensors"))
    got = _read_raw(tmp_path / "t.safetensors", "a")
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(_read_raw(tmp_path / "t.safetensors", "b"), np.ones(5, np.float16))
