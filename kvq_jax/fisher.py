"""Loss-aware sensitivity: Fisher-weighted attention-output error under the cache's protocol.

For layer l, tensor K (or V) and width b:

    e(l, b) = 1/2 * sum over calibration tokens of  F_l * (A_l(quantized) - A_l)^2

A_l `[B, T, Hq, D]` is the layer's attention output (before W_o). "Quantized" follows the cache: a query
at position t sees the sink and its recent window in full precision and only the older body tokens
`[S, S + Q(t))` quantized (Q(t) = G * ceil(max(0, t - S - R) / G): what the cache holds packed when
the token at position t arrives, read before it is written), with
the plan's grouping. F_l = (dNLL/dA_l)^2 is the empirical Fisher diagonal of the calibration NLL, from
one backward pass. To second order e is the rise in NLL (in nats) that quantizing only that tensor
causes, so errors of different layers and of K vs V share one unit and add up, which the relative
attention-output error (`KVStats.k_attn_err`) does not: it weighs a layer the loss ignores like
one it depends on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvq_jax import quant
from kvq_jax.attention import DIFFERENTIABLE
from kvq_jax.rotations import Rope, apply_rope, hadamard
from kvq_jax.cache import init_cache
from kvq_jax.plan import CODEBOOK_BITS, DenseKV

Array = jax.Array
_NEG = -1e30


def quantized_prefix(t: int, sink: int, residual: int, block: int) -> np.ndarray:
    """`[T]` int: Q(t), the body tokens a query at position t reads in quantized form."""
    m = np.maximum(np.arange(t) - sink - residual, 0)
    return block * ((m + block - 1) // block)


def protocol_span(t: int, sink: int, residual: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """`([T], [T])` int: query t reads keys `[lo[t], hi[t])` quantized, `[S, S + Q(t))`."""
    return np.full(t, sink), sink + quantized_prefix(t, sink, residual, block)


def qdq_body(x: Array, bits: float, axis: str, group: int, sink: int, block: int,
             scale_dtype: jnp.dtype, levels: Array | None = None) -> Array:
    """x `[B, T, H, D]` with body tokens `[S, T)` quantize-dequantized in the cache's blocks (with a
    codebook of `levels`, see `kvq_jax.quant`)."""
    b, t, h, d = x.shape
    body = x[:, sink:].transpose(0, 2, 1, 3)  # [B, H, Tb, D]
    n = body.shape[2]
    pad = -(-n // block) * block - n  # padded tokens are never read (Q(t) is a multiple of block)
    body = jnp.pad(body, ((0, 0), (0, 0), (0, pad), (0, 0)))
    codes, s, z = quant.quantize(body, bits, axis, group, scale_dtype=scale_dtype, levels=levels)
    deq = quant.dequantize(codes, s, z, axis, group, levels=levels)[:, :, :n].transpose(0, 2, 1, 3)
    return jnp.concatenate([x[:, :sink], deq.astype(x.dtype)], axis=1)


# Queries per step of the error pass. Small blocks keep a block's scores in the CPU's cache: 64 ran
# fastest (Gemma 3 at 2048 tokens: 0.8 s per window layer, 3.1 s per global one; 256: 1.3 s, 4.5 s).
_QUERY_BLOCK = 64
# A global layer's query blocks go in this many bands, each attending over the keys its last query
# sees (static shapes: one program per band), so causal attention does ~(1 + 1/n)/2 of the square
# instead of all of it.
_CAUSAL_BANDS = 4


def _query_blocks(t: int) -> tuple[int, int]:
    """`(bq, nb)`: T queries go in nb blocks of bq (the last one padded)."""
    bq = min(_QUERY_BLOCK, t)
    return bq, -(-t // bq)


Variant = tuple[Array | None, Array | None]  # (k_hat, v_hat) `[B, T, Hkv, D]`; None: the exact tensor


def attention_variants(q: Array, k: Array, v: Array, variants: Sequence[Variant],
                       span: tuple[Array, Array] | None, scale: float | None, window: int,
                       reduce: Callable[[Array, Array, Array], Any], first: int = 0) -> Any:
    """`reduce(a, out_fp, outs)` over blocks of queries starting at a: `out_fp [B, bq, Hq, D]` the
    full-precision attention, `outs [N, B, bq, Hq, D]` that of each of the N `variants` `(k_hat,
    v_hat)`, whose keys `[lo[t], hi[t])` replace k/v for query t (None: that tensor stays exact; q,
    k, v, span, scale and window as in `mixed_attention`). A variant with exact keys reuses the fp
    weights, one with exact values the fp values' product: one or two products each, not three.
    Each block attends over the keys it can see (a sliding window's last `window + bq - 1`; in a
    global layer, the keys up to the end of its band of blocks), so memory is linear in T and so is
    a window layer's work. Returns the results (any pytree) stacked `[n_blocks, ...]`; the last
    block's rows past T are padding (queries of zeros): `reduce` masks them (`query_rows(a, t)`).
    Blocks whose queries all sit before position `first` are skipped (not in the result).
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    lo, hi = (jnp.zeros(t, jnp.int32),) * 2 if span is None else (jnp.asarray(x, jnp.int32) for x in span)
    bq, nb = _query_blocks(t)
    pad = nb * bq - t
    qs = jnp.pad(q * (d ** -0.5 if scale is None else scale), ((0, 0), (0, pad), (0, 0), (0, 0)))
    lo, hi = jnp.pad(lo, (0, pad)), jnp.pad(hi, (0, pad))

    def block(i: Array, n_keys: int) -> Array:
        a = i * bq
        start = jnp.clip(a + bq - n_keys, 0, t - n_keys)  # the first key any query of the block sees
        keys = lambda x, axis=1: jax.lax.dynamic_slice_in_dim(x, start, n_keys, axis=axis)
        qb = jax.lax.dynamic_slice_in_dim(qs, a, bq, axis=1).reshape(b, bq, hkv, hq // hkv, d)
        qi = (a + jnp.arange(bq))[:, None]
        si = (start + jnp.arange(n_keys))[None, :]
        quantized = (si >= jax.lax.dynamic_slice_in_dim(lo, a, bq)[:, None]) & (
            si < jax.lax.dynamic_slice_in_dim(hi, a, bq)[:, None])
        visible = (si <= qi) & ((qi - si < window) if window else True)
        kb, vb = keys(k), keys(v)
        pv = lambda p, x: jnp.einsum("bhrqk,bkhd->bqhrd", p, x)
        s_fp = jnp.einsum("bqhrd,bkhd->bhrqk", qb, kb)
        p_fp = jax.nn.softmax(jnp.where(visible, s_fp, _NEG), axis=-1)
        out_fp = pv(p_fp, vb)

        def variant(kh: Array | None, vh: Array | None) -> Array:
            if kh is None:  # exact keys: the fp weights and their output
                p, out = p_fp, out_fp
            else:
                s = jnp.where(quantized, jnp.einsum("bqhrd,bkhd->bhrqk", qb, keys(kh)), s_fp)
                p = jax.nn.softmax(jnp.where(visible, s, _NEG), axis=-1)
                out = pv(p, vb)
            if vh is not None:  # the quantized values' share: what they change where they are read
                out = out + pv(jnp.where(quantized, p, 0.0), keys(vh) - vb)
            return out.reshape(b, bq, hq, d)

        outs = jnp.stack([variant(kh, vh) for kh, vh in variants])
        return reduce(a, out_fp.reshape(b, bq, hq, d), outs)

    skip = min(first // bq, nb - 1)
    if window and window + bq - 1 < t:
        return jax.lax.map(lambda i: block(i, window + bq - 1), jnp.arange(skip, nb))
    # Band j: blocks [ends[j-1], ends[j]), whose queries see no key past ends[j] * bq.
    ends = sorted({-(-nb * (j + 1) // _CAUSAL_BANDS) for j in range(_CAUSAL_BANDS)})
    parts = [jax.lax.map(lambda i, end=end: block(i, min(t, end * bq)), jnp.arange(max(lo_, skip), end))
             for lo_, end in zip([0] + ends[:-1], ends) if end > skip]
    return jax.tree_util.tree_map(lambda *x: jnp.concatenate(x), *parts)


def query_rows(a: Array, t: int) -> Array:
    """`[bq]` bool: which rows of the query block starting at `a` are real positions (< t)."""
    return a + jnp.arange(_query_blocks(t)[0]) < t


def mixed_attention(q: Array, k: Array, v: Array, k_hat: Array, v_hat: Array,
                    span: tuple[Array, Array] | None, scale: float | None = None, window: int = 0) -> Array:
    """Causal attention where query t reads `k_hat`/`v_hat` at keys `[lo[t], hi[t])`, else k/v.

    q `[B, T, Hq, D]`, k/v/k_hat/v_hat `[B, T, Hkv, D]`, span `(lo [T], hi [T])` (`protocol_span`;
    None: no key quantized) → `[B, T, Hq, D]`. Scores are scaled by `scale` (default D ** -0.5);
    `window` > 0 limits query t to keys (t - window, t].
    """
    b, t, hq, d = q.shape
    out = attention_variants(q, k, v, [(k_hat, v_hat)], span, scale, window, lambda a, fp, o: o[0])
    return out.transpose(1, 0, 2, 3, 4).reshape(b, -1, hq, d)[:, :t]


def fisher_weighted_errors(q: Array, k: Array, v: Array, variants: Sequence[Variant], fisher: Array,
                           span: tuple[Array, Array], scale: float | None = None, window: int = 0,
                           first: int = 0) -> Array:
    """`[N]`: `1/2 sum fisher * (mixed_attention(k_hat, v_hat) - attention)^2` per variant.

    variants as in `attention_variants`, fisher `[B, T, Hq, D]`; the other arguments as in
    `mixed_attention`. The full-precision scores are computed once per block for all variants.
    `first`: only queries at positions >= it count (the blocks wholly before it are skipped).
    """
    t = q.shape[1]
    bq, nb = _query_blocks(t)
    fisher = fisher * (jnp.arange(t) >= first)[None, :, None, None]
    fw = jnp.pad(fisher, ((0, 0), (0, nb * bq - t), (0, 0), (0, 0)))  # padded rows weigh 0

    def reduce(a: Array, out_fp: Array, outs: Array) -> Array:
        f = jax.lax.dynamic_slice_in_dim(fw, a, bq, axis=1)
        return 0.5 * jnp.sum(f * (outs - out_fp) ** 2, axis=(1, 2, 3, 4))

    return jnp.sum(attention_variants(q, k, v, variants, span, scale, window, reduce, first), axis=0)


_NLL_BLOCK = 256  # positions whose logits [B, block, V] exist at once (Gemma's vocabulary is 262k)


def nll(graphdef, state, tokens: Array, probes: tuple[Array, ...]) -> tuple[Array, tuple[Array, Array, Array]]:
    """Summed NLL of tokens 1.. of every window `[B, T]`, through the model's own forward pass (a
    full-precision cache), with `probes [B, T, Hq, D]` per layer added to the attention outputs; and
    each layer's q, k, v stacked `[L, B, T, H, D]`."""
    model = nnx.merge(graphdef, state)
    b, t = tokens.shape
    cache = init_cache(model.cfg, DenseKV("float32"), b, t)
    h, _, taps = model.forward(tokens, cache, attention_impl=DIFFERENTIABLE, probes=probes)
    n = -(-(t - 1) // _NLL_BLOCK)
    pad = n * _NLL_BLOCK - (t - 1)
    hb = jnp.pad(h[:, :-1], ((0, 0), (0, pad), (0, 0))).reshape(b, n, _NLL_BLOCK, -1).transpose(1, 0, 2, 3)
    tb = jnp.pad(tokens[:, 1:], ((0, 0), (0, pad))).reshape(b, n, _NLL_BLOCK).transpose(1, 0, 2)
    vb = (jnp.arange(n * _NLL_BLOCK) < t - 1).reshape(n, 1, _NLL_BLOCK)

    @jax.checkpoint  # recomputed in the backward pass: no [B, T, V] log-softmax is kept for it
    def block(a):
        x, tok, valid = a
        lp = jax.nn.log_softmax(model.logits(x), axis=-1)
        return -jnp.sum(jnp.where(valid, jnp.take_along_axis(lp, tok[..., None], axis=-1)[..., 0], 0.0))

    value = jnp.sum(jax.lax.map(block, (hb, tb, vb)))
    stack = lambda name: jnp.stack([getattr(tp, name) for tp in taps])
    return value, (stack("q"), stack("k"), stack("v"))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def fisher_pass(graphdef, state, tokens: Array) -> tuple[Array, Array, tuple[Array, Array, Array]]:
    """`nll` at zero probes, its gradient w.r.t. every layer's attention output `[L, B, T, Hq, D]`,
    and each layer's q, k, v."""
    b, t = tokens.shape
    cfg = nnx.merge(graphdef, state).cfg
    probes = tuple(jnp.zeros((b, t, cfg.n_heads, cfg.head_dim), jnp.float32) for _ in range(cfg.n_layers))
    f = lambda p: nll(graphdef, state, tokens, p)
    (value, qkv), grads = jax.value_and_grad(f, has_aux=True)(probes)
    return value, jnp.stack(grads), qkv


@functools.partial(jax.jit, static_argnames=("bits", "key_axis", "value_axis", "group_k", "group_v",
                                             "sink", "residual", "block", "scale_dtype", "scale", "window",
                                             "rotate", "rope", "score_from"))
def layer_fisher_errors(q: Array, k: Array, v: Array, grad: Array, *, bits: tuple[float, ...],
                        key_axis: str, value_axis: str, group_k: int, group_v: int, sink: int,
                        residual: int, block: int, scale_dtype: str, scale: float | None = None,
                        window: int = 0, rotate: str = "none", rope: Rope | None = None,
                        k_levels: Array | None = None, v_levels: Array | None = None,
                        score_from: int = 0) -> tuple[Array | None, Array | None]:
    """`[nb]` Fisher-weighted errors of one layer's keys and of its values, summed over the batch.

    A sliding-window layer (`window` > 0) has no sink in the cache: pass `sink=0`. `rotate`
    "hadamard": the cache holds k @ H and v @ H, so the quantization error is that of the rotated
    tensors, rotated back (H is orthonormal and symmetric); "prerope": the cache holds the keys
    before the layer's RoPE `rope` (window position t at position t), rotated forward when read,
    and the values as they are (their errors are the unrotated ones: None is returned for them).
    `k_levels [nb, 16]`: the keys are stored with the codebook `k_levels[j, :qmax + 1]` at each
    width `bits[j]` that takes one (`plan.CODEBOOK_BITS`, uniform codes at the others); only the
    keys are measured then (None is returned for the values). `v_levels [nb, 16]`: the same for the
    values (with `rotate` "hadamard": the codebook of the rotated values); only the values are
    measured then (None is returned for the keys). `score_from`: only queries at positions >= it are
    scored (where decoding after a `score_from`-token prompt reads the cache); the Fisher weights
    still come from the whole window's NLL, which is what an error at those positions changes."""
    q, k, v, grad = (a.astype(jnp.float32) for a in (q, k, v, grad))
    k_qdq = v_qdq = qdq_body
    if rotate == "hadamard":
        h = jnp.asarray(hadamard(k.shape[-1]), jnp.float32)
        k_qdq = v_qdq = lambda x, *a: qdq_body(x @ h, *a) @ h
    elif rotate == "prerope":
        if rope is None:
            raise ValueError("rotate='prerope' needs the layer's rope")
        pos = jnp.arange(k.shape[1])[None, :, None]  # [1, T, 1] against [B, T, H]
        k_qdq = lambda x, *a: apply_rope(qdq_body(apply_rope(x, pos, rope, inverse=True), *a), pos, rope)
    if k_levels is not None and v_levels is not None:
        raise ValueError("measure key codebooks and value codebooks in separate calls")
    if v_levels is not None and rotate == "prerope":
        raise ValueError("rotate='prerope' measures keys only: value codebooks need rotate 'none' or 'hadamard'")
    sd = jnp.dtype(scale_dtype)
    keys = v_levels is None
    values = rotate != "prerope" and k_levels is None
    book = lambda table, j, b: table[j, :quant.qmax(b) + 1] if table is not None and b in CODEBOOK_BITS else None
    k_hats = [k_qdq(k, b, key_axis, group_k, sink, block, sd, book(k_levels, j, b))
              for j, b in enumerate(bits)] if keys else []
    v_hats = [v_qdq(v, b, value_axis, group_v, sink, block, sd, book(v_levels, j, b))
              for j, b in enumerate(bits)] if values else []
    # one pass over the queries for every variant: keys quantized (values exact), then the reverse
    errs = fisher_weighted_errors(q, k, v, [(kh, None) for kh in k_hats] + [(None, vh) for vh in v_hats],
                                  grad * grad, protocol_span(q.shape[1], sink, residual, block), scale, window,
                                  score_from)
    ke, ve = errs[:len(k_hats)], errs[len(k_hats):]
    return (ke if keys else None), (ve if values else None)
