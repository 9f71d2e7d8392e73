"""Norm and sensitivity analysis of a model's keys and values over calibration text → `KVStats`.

Per layer and KV head: Frobenius and spectral norms and singular values of K (before and after RoPE)
and V, the relative quantization error of K and V at each candidate width (under the plan's grouping),
and the error of the layer's attention output when only its keys, or only its values, are quantized.
The activations come from the model's own forward pass (`Transformer.forward` returns each layer's
`Taps`), so every architecture is analysed as it runs; a layer's attention errors use its own score
scale and sliding window. Weight norms of W_K and W_V come from the parameters. Spectra are exact:
they come from the accumulated Gram matrices `X^T X [D, D]`, so memory does not grow with the number
of tokens.
"""

from __future__ import annotations

import functools
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from kvq_jax import quant
from kvq_jax.cache import init_cache
from kvq_jax.errors import KvqError
from kvq_jax.fisher import attention_variants, fisher_pass, layer_fisher_errors, query_rows
from kvq_jax.model import Taps, Transformer
from kvq_jax.codebook import MAX_LEVELS, lloyd_levels, strict_levels
from kvq_jax.plan import CODEBOOK_BITS, DEFAULT_BLOCK, ROTATIONS, DenseKV
from kvq_jax.rotations import hadamard
from kvq_jax.stats import (CODEBOOK_BASE, CODEBOOK_OPTIONS, DEFAULT_BITS, HADAMARD_CODEBOOK, PREROPE_CODEBOOK,
                           VALUE_OPTIONS, KVStats)

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef",))
def capture(graphdef, state, tokens: Array) -> tuple[Taps, ...]:
    """Each layer's `Taps` (q, k before/after RoPE, v, attention output) from the model's own forward
    pass over windows `[B, T]` into a full-precision cache."""
    model = nnx.merge(graphdef, state)
    cache = init_cache(model.cfg, DenseKV("float32"), tokens.shape[0], tokens.shape[1])
    return model.forward(tokens, cache)[2]


def _qdq(x: Array, bits: float, axis: str, group: int, scale_dtype) -> Array:
    """Quantize-dequantize x `[B, T, H, D]` with the cache's grouping (token axis = T)."""
    xt = x.transpose(0, 2, 1, 3)  # [B, H, T, D]
    codes, s, z = quant.quantize(xt, bits, axis, group, scale_dtype=scale_dtype)
    return quant.dequantize(codes, s, z, axis, group).transpose(0, 2, 1, 3)


@functools.partial(jax.jit, static_argnames=("bits", "key_axis", "value_axis", "group_k", "group_v", "scale_dtype",
                                             "scale", "window"))
def _layer_sums(q, k_pre, k, v, *, bits: tuple[float, ...], key_axis: str, value_axis: str,
                group_k: int, group_v: int, scale_dtype: str, scale: float | None = None,
                window: int = 0) -> dict[str, Array]:
    """Sums over a batch of windows for one layer (all `[H, ...]`, H = KV heads)."""
    f32 = lambda a: a.astype(jnp.float32)
    q, k_pre, k, v = map(f32, (q, k_pre, k, v))
    gram = lambda x: jnp.einsum("bthd,bthe->hde", x, x)
    sq = lambda x: jnp.sum(x * x, axis=(0, 1, 3))
    hkv = k.shape[2]
    t = q.shape[1]
    per_head = lambda e: jnp.sum(e.reshape(e.shape[:-2] + (hkv, -1, e.shape[-1])), axis=(-5, -4, -2, -1))
    out = {"k_gram": gram(k), "v_gram": gram(v), "kpre_gram": gram(k_pre), "k_sq": sq(k), "v_sq": sq(v)}
    sd = jnp.dtype(scale_dtype)
    k_hats = [_qdq(k, b, key_axis, group_k, sd) for b in bits]
    v_hats = [_qdq(v, b, value_axis, group_v, sd) for b in bits]

    def reduce(a: Array, ref: Array, outs: Array) -> tuple[Array, Array]:
        real = query_rows(a, t)[None, :, None, None]
        return per_head(jnp.where(real, ref * ref, 0.0)), per_head(jnp.where(real, (outs - ref) ** 2, 0.0))

    # every token quantized (the tensor's own error, not the cache's protocol): keys, then values
    attn_sq, errs = attention_variants(q, k, v, [(kh, None) for kh in k_hats] + [(None, vh) for vh in v_hats],
                                       (jnp.zeros(t), jnp.full(t, t)), scale, window, reduce)
    errs = jnp.sum(errs, axis=0)  # [2 nb, Hkv]
    out.update(attn_sq=jnp.sum(attn_sq, axis=0), k_qerr=jnp.stack([sq(kh - k) for kh in k_hats], -1),
               v_qerr=jnp.stack([sq(vh - v) for vh in v_hats], -1), k_attn=errs[:len(bits)].T,
               v_attn=errs[len(bits):].T)
    return out


def _weight_norms(w: np.ndarray, n_heads: int, head_dim: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Per-head and whole-matrix Frobenius / spectral norms of a projection `[dim, H*D]`."""
    heads = w.reshape(w.shape[0], n_heads, head_dim).transpose(1, 0, 2)
    fro = np.sqrt(np.sum(heads.astype(np.float64) ** 2, axis=(1, 2)))
    spec = np.array([np.linalg.norm(h, 2) for h in heads.astype(np.float64)])
    return fro, spec, float(np.linalg.norm(w.astype(np.float64))), float(np.linalg.norm(w.astype(np.float64), 2))


def _spectrum(gram: np.ndarray) -> np.ndarray:
    """Singular values (descending) of X from its Gram matrix `[H, D, D]` → `[H, D]`."""
    ev = np.linalg.eigvalsh(gram.astype(np.float64))[:, ::-1]
    return np.sqrt(np.clip(ev, 0.0, None))


def analyze(model: Transformer, windows: np.ndarray, *, bits: Sequence[float] = DEFAULT_BITS,
            key_axis: str = "channel", value_axis: str = "token", group_k: int = 64, group_v: int = 64,
            scale_dtype: str = "bfloat16", batch: int = 2, progress: bool = True,
            meta: dict | None = None, sink: int = 4, residual: int = 128, fisher: bool = True,
            rotations: Sequence[str] | None = None, score_from: int = 0) -> KVStats:
    """Runs the model over calibration windows `[W, T]` and collects `KVStats`.

    With `fisher`, also the loss-aware errors `k_fisher_err`/`v_fisher_err` (see `kvq_jax.fisher`)
    for a cache with this `sink` and `residual` (one extra forward and backward pass per batch),
    unrotated and under each of `rotations` (default: every rotation the model allows; Hadamard
    needs a power-of-two head_dim; "prerope" measures keys only, values are not rotated by it), so
    the allocator can choose the keys' and the values' rotation of each layer. With "prerope", also
    keys before RoPE with a learned codebook per layer and width (`kvq_jax.codebook`, widths in
    `plan.CODEBOOK_BITS`), and with "hadamard" values after the rotation with theirs: the levels are
    learned on the same windows in a first pass. `score_from`: the Fisher errors count only queries at
    window positions >= it, i.e. decoding after a prompt of that many tokens (0: every position).
    """
    cfg = model.cfg
    bits = tuple(sorted(float(b) for b in bits))
    if not bits:
        raise KvqError("--bits is empty")
    for b in bits:
        quant.qmax(b)  # validates the width
    w, t = windows.shape
    if key_axis == "channel" and t % group_k:
        raise KvqError(f"calibration window {t} is not a multiple of the key group {group_k}")
    if value_axis == "channel" and t % group_v:
        raise KvqError(f"calibration window {t} is not a multiple of the value group {group_v}")
    for ax, g in ((key_axis, group_k), (value_axis, group_v)):
        if ax == "token" and cfg.head_dim % g:
            raise KvqError(f"head_dim {cfg.head_dim} is not divisible by the group {g}")
    graphdef, state = nnx.split(model)
    groups = [g for ax, g in ((key_axis, group_k), (value_axis, group_v)) if ax == "channel"]
    block = max(groups, default=DEFAULT_BLOCK)  # the cache's flush block (KVPlan.block)
    if fisher and (sink < 0 or residual < block or residual % block):
        raise KvqError(f"residual {residual} must be a positive multiple of the block {block}, sink >= 0")
    if fisher and not 0 <= score_from < t:
        raise KvqError(f"--score-from must be in [0, {t}) for {t}-token calibration windows, got {score_from}")
    fisher = fisher and t > sink + residual  # shorter windows never read a quantized token
    # A layer is measured as the cache holds it: its own score scale and window; a local layer has no
    # sink (see cache.init_cache).
    geometry = [dict(scale=cfg.scale, window=cfg.window(i)) for i in range(cfg.n_layers)]
    fisher_kw = [dict(bits=bits, key_axis=key_axis, value_axis=value_axis, group_k=group_k, group_v=group_v,
                      sink=0 if g["window"] else sink, residual=residual, block=block, scale_dtype=scale_dtype,
                      score_from=score_from, **g)
                 for g in geometry]
    allowed = tuple(r for r in ROTATIONS if r != "hadamard" or cfg.head_dim & (cfg.head_dim - 1) == 0)
    bad = [r for r in (rotations or ()) if r not in allowed]
    if bad:
        raise KvqError(f"cannot measure rotation {bad[0]!r} on this model (allowed: {', '.join(allowed)})")
    rotations = ("none",) + tuple(r for r in (allowed if rotations is None else rotations) if r != "none")
    # learned codebooks: keys before RoPE, values after Hadamard (the options the quantizer screen
    # found to win), where that rotation is measured and a width takes a codebook
    book_bits = [j for j, b in enumerate(bits) if b in CODEBOOK_BITS]
    books = {kind: fisher and bool(book_bits) and base in rotations for kind, base in CODEBOOK_BASE.items()}
    rotations = rotations + tuple(opt for kind, opt in CODEBOOK_OPTIONS.items() if books[kind])
    levels = {kind: np.zeros((cfg.n_layers, len(bits), MAX_LEVELS)) for kind in books}  # batch means
    fisher_k = {r: np.zeros((cfg.n_layers, len(bits))) for r in rotations if r != HADAMARD_CODEBOOK}
    fisher_v = {r: np.zeros((cfg.n_layers, len(bits))) for r in rotations if r in VALUE_OPTIONS}
    totals: list[dict[str, np.ndarray]] = [{} for _ in range(cfg.n_layers)]
    kw = dict(bits=bits, key_axis=key_axis, value_axis=value_axis, group_k=group_k, group_v=group_v,
              scale_dtype=scale_dtype)
    h = jnp.asarray(hadamard(cfg.head_dim), jnp.float32) if books["v"] else None
    starts = range(0, w, batch)
    bar = tqdm(total=len(starts) * cfg.n_layers * (2 if fisher else 1), desc="analyze", file=sys.stderr,
               disable=not progress, unit="layer", leave=False)
    for s in starts:
        toks = jnp.asarray(windows[s: s + batch])
        for i, tap in enumerate(capture(graphdef, state, toks)):
            sums = jax.device_get(_layer_sums(tap.q, tap.k_pre, tap.k, tap.v, **kw, **geometry[i]))
            for name, val in sums.items():
                totals[i][name] = totals[i].get(name, 0.0) + np.asarray(val, np.float64)
            learn = {"k": (tap.k_pre, key_axis, group_k),
                     "v": (tap.v.astype(jnp.float32) @ h if books["v"] else None, value_axis, group_v)}
            for kind, (x, axis, group) in learn.items():
                for j in book_bits if books[kind] else ():
                    lv = lloyd_levels(x, bits=bits[j], axis=axis, group=group, sink=fisher_kw[i]["sink"],
                                      scale_dtype=scale_dtype)
                    levels[kind][i, j, :lv.shape[0]] += np.asarray(lv, np.float64) / len(starts)
            bar.update(1)
    for kind in (k for k in books if books[k]):  # the batches' levels, averaged, as a plan stores them
        for i in range(cfg.n_layers):
            for j in book_bits:
                n = quant.qmax(bits[j]) + 1
                levels[kind][i, j, :n] = strict_levels(levels[kind][i, j, :n])
    for s in starts if fisher else ():  # a second pass: the codebook errors need the final levels
        toks = jnp.asarray(windows[s: s + batch])
        _, grads, (fq, fk, fv) = fisher_pass(graphdef, state, toks)
        for i in range(cfg.n_layers):
            for r in rotations:
                book = {kind: jnp.asarray(levels[kind][i], jnp.float32) if r == opt else None
                        for kind, opt in CODEBOOK_OPTIONS.items()}
                rotate = next((CODEBOOK_BASE[kind] for kind, opt in CODEBOOK_OPTIONS.items() if r == opt), r)
                ke, ve = layer_fisher_errors(
                    fq[i], fk[i], fv[i], grads[i], rotate=rotate,
                    rope=cfg.rope(i) if rotate == "prerope" else None,
                    k_levels=book["k"], v_levels=book["v"], **fisher_kw[i])
                if ke is not None:
                    fisher_k[r][i] += np.asarray(ke, np.float64)
                if ve is not None:
                    fisher_v[r][i] += np.asarray(ve, np.float64)
            bar.update(1)
    bar.close()
    stack = lambda name: np.stack([tt[name] for tt in totals])
    k_sq, v_sq, attn_sq = stack("k_sq"), stack("v_sq"), stack("attn_sq")
    wk = [_weight_norms(np.asarray(b.attn.wk.w.get_value()), cfg.n_kv_heads, cfg.head_dim) for b in model.layers]
    wv = [_weight_norms(np.asarray(b.attn.wv.w.get_value()), cfg.n_kv_heads, cfg.head_dim) for b in model.layers]
    k_sv = np.stack([_spectrum(tt["k_gram"]) for tt in totals])
    v_sv = np.stack([_spectrum(tt["v_gram"]) for tt in totals])
    kpre_sv = np.stack([_spectrum(tt["kpre_gram"]) for tt in totals])
    tiny = 1e-30
    per_window = lambda e, r: np.maximum(e[r] / w, 0.0) if fisher and r in e else None  # nats per window
    info = dict(meta or {})
    info.update(model=cfg.name, n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                bits=list(bits), calib_windows=int(w), calib_tokens=int(w * t), key_axis=key_axis,
                value_axis=value_axis, group_k=group_k, group_v=group_v, scale_dtype=scale_dtype,
                sink=sink, residual=residual, score_from=score_from)
    return KVStats(
        bits=np.asarray(bits, np.float64),
        k_fro=np.sqrt(k_sq), k_spec=k_sv[:, :, 0], v_fro=np.sqrt(v_sq), v_spec=v_sv[:, :, 0],
        k_sv=k_sv, v_sv=v_sv,
        wk_fro=np.stack([x[0] for x in wk]), wk_spec=np.stack([x[1] for x in wk]),
        wv_fro=np.stack([x[0] for x in wv]), wv_spec=np.stack([x[1] for x in wv]),
        wk_fro_layer=np.asarray([x[2] for x in wk]), wk_spec_layer=np.asarray([x[3] for x in wk]),
        wv_fro_layer=np.asarray([x[2] for x in wv]), wv_spec_layer=np.asarray([x[3] for x in wv]),
        k_qerr=stack("k_qerr") / np.maximum(k_sq, tiny)[..., None],
        v_qerr=stack("v_qerr") / np.maximum(v_sq, tiny)[..., None],
        k_attn_err=stack("k_attn").sum(1) / np.maximum(attn_sq.sum(1), tiny)[:, None],
        v_attn_err=stack("v_attn").sum(1) / np.maximum(attn_sq.sum(1), tiny)[:, None],
        k_attn_err_head=stack("k_attn") / np.maximum(attn_sq, tiny)[..., None],
        v_attn_err_head=stack("v_attn") / np.maximum(attn_sq, tiny)[..., None],
        k_fro_prerope=np.sqrt(np.stack([np.trace(tt["kpre_gram"], axis1=1, axis2=2) for tt in totals])),
        k_spec_prerope=kpre_sv[:, :, 0], k_sv_prerope=kpre_sv,
        k_fisher_err=per_window(fisher_k, "none"), v_fisher_err=per_window(fisher_v, "none"),
        k_fisher_err_hadamard=per_window(fisher_k, "hadamard"),
        v_fisher_err_hadamard=per_window(fisher_v, "hadamard"),
        k_fisher_err_prerope=per_window(fisher_k, "prerope"),
        k_fisher_err_prerope_codebook=per_window(fisher_k, PREROPE_CODEBOOK),
        k_levels_prerope=levels["k"] if books["k"] else None,
        v_fisher_err_hadamard_codebook=per_window(fisher_v, HADAMARD_CODEBOOK),
        v_levels_hadamard=levels["v"] if books["v"] else None,
        meta=info,
    )
