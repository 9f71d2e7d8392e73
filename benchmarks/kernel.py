"""Decode attention over one layer's cache: the fused Pallas kernel vs the XLA packed path vs dense
bf16 attention, plus the cost of a KIVI flush (issue 5).

python benchmarks/kernel.py [--contexts 4096 32768 131072] [--batches 1 16] [--kv K4V2]
                            [--impls pallas xla bf16] [--hbm-gbps 3350] [--out FILE]

Shapes are SmolLM2's (3 KV heads, 3 query heads per KV head, head_dim 64) unless overridden. The
packed cache holds random words and scales (the kernel's cost does not depend on the values).
`bytes_read` counts what the path must read: packed words + scales/zeros for the packed paths, the
bf16 K and V for the dense one. Each line printed is one JSON result; `roofline` is the achieved
bytes/s over `--hbm-gbps` (H100 SXM: 3350, H200: 4800). The flush lines time one `cache.append`
that quantizes and packs a block of G tokens against one that does not.
"""

from __future__ import annotations

import argparse
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvq_jax import attention, cache as kvcache, packing
from kvq_jax.cache import QuantLayer, init_cache
from kvq_jax.config import tiny_config
from kvq_jax.plan import parse_kv

import jsonl


def _time(fn, *args, iters: int) -> float:
    """Median seconds of `fn(*args)` after a compile and a warm-up call."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def _random_layer(layer: QuantLayer, seed: int) -> QuantLayer:
    """Random packed words (uniform digits) and positive scales, so no path can shortcut zeros."""
    rng = np.random.default_rng(seed)

    def fill(t):
        if t.spec.dense:
            return t
        base, p = packing.code_base(t.spec.bits), packing.digits_per_word(t.spec.bits)
        digits = rng.integers(0, base, t.words.shape + (p,), dtype=np.uint64)
        words = (digits * (base ** np.arange(p, dtype=np.uint64))).sum(-1).astype(np.uint32)
        scale = rng.uniform(0.01, 0.1, t.scale.shape).astype(np.float32)
        zero = rng.uniform(-1.0, 0.0, t.zero.shape).astype(np.float32)
        return t.replace(words=jnp.asarray(words), scale=jnp.asarray(scale, t.scale.dtype),
                         zero=jnp.asarray(zero, t.zero.dtype))

    return layer.replace(k=fill(layer.k), v=fill(layer.v))


def _packed_bytes(t, n: int) -> int:
    """Bytes of words + scales + zeros that describe the first n body tokens."""
    s = t.spec
    words = -(-n // packing.digits_per_word(s.bits)) * t.words.shape[3] * 4
    rows = -(-n // s.group) if s.axis == "channel" else n
    meta = 2 * rows * t.scale.shape[3] * t.scale.dtype.itemsize
    return t.words.shape[0] * t.words.shape[1] * (words + meta)


@functools.partial(jax.jit, static_argnames=("impl",))
def _packed(q, layer, n_valid, *, impl: str):
    if impl == "xla":
        return attention.packed_xla(q, layer, n_valid)
    return attention.packed_pallas(q, layer, n_valid, interpret=impl == "pallas_interpret")


@jax.jit
def _dense(q, k, v, n_valid):
    mask = jnp.arange(k.shape[2])[None, :] < n_valid[:, None]
    return attention._segment(q, k, v, mask)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--kv", default="K4V2")
    ap.add_argument("--impls", nargs="+", default=["pallas", "xla", "bf16"],
                    choices=["pallas", "pallas_interpret", "xla", "bf16"])
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--n-rep", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--hbm-gbps", type=float, default=0.0, help="peak memory bandwidth for the roofline")
    ap.add_argument("--no-flush", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    cfg = tiny_config(n_layers=1, n_heads=args.kv_heads * args.n_rep, n_kv_heads=args.kv_heads,
                      head_dim=args.head_dim)
    plan = parse_kv(args.kv, 1, residual=128, sink=0)
    device = jax.devices()[0].device_kind

    def emit(rec: dict) -> None:
        rec.update(device=device, backend=jax.default_backend(), jax=jax.__version__)
        jsonl.emit(rec, args.out)

    for ctx in args.contexts:
        for b in args.batches:
            rng = np.random.default_rng(ctx + b)
            q = jnp.asarray(rng.standard_normal((b, args.kv_heads, args.n_rep, args.head_dim)) / 8, jnp.float32)
            n_valid = jnp.full((b,), ctx, jnp.int32)
            base = dict(kv=args.kv, context=ctx, batch=b, kv_heads=args.kv_heads, n_rep=args.n_rep,
                        head_dim=args.head_dim)
            layer = None
            for impl in args.impls:
                if impl == "bf16":
                    shape = (b, args.kv_heads, ctx, args.head_dim)
                    k = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
                    v = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
                    sec = _time(_dense, q, k, v, n_valid, iters=args.iters)
                    nbytes = k.nbytes + v.nbytes
                    del k, v
                else:
                    if layer is None:
                        layer = _random_layer(init_cache(cfg, plan, b, ctx).layers[0], ctx)
                    sec = _time(functools.partial(_packed, impl=impl), q, layer, n_valid, iters=args.iters)
                    nbytes = _packed_bytes(layer.k, ctx) + _packed_bytes(layer.v, ctx)
                rec = dict(base, impl=impl, ms=1e3 * sec, bytes_read=nbytes, gbps=nbytes / sec / 1e9)
                if args.hbm_gbps:
                    rec["roofline"] = rec["gbps"] / args.hbm_gbps
                emit(rec)

    if args.no_flush:
        return
    # Flush cost: one append that quantizes + packs a block of G tokens vs one that only writes the ring.
    b = max(args.batches)
    layer = _random_layer(init_cache(cfg, plan, b, 4096).layers[0], 0)
    g, r = layer.block, layer.residual
    kn = jnp.asarray(np.random.default_rng(1).standard_normal((b, args.kv_heads, 1, args.head_dim)), jnp.float32)
    app = jax.jit(kvcache.append)
    t_flush = _time(app, layer, kn, kn, jnp.full((b,), r + 2 * g, jnp.int32), iters=args.iters)
    t_plain = _time(app, layer, kn, kn, jnp.full((b,), r + 2 * g + 1, jnp.int32), iters=args.iters)
    emit(dict(kv=args.kv, batch=b, block=g, impl="flush", flush_append_ms=1e3 * t_flush,
              plain_append_ms=1e3 * t_plain,
              amortised_flush_ms_per_token=1e3 * max(t_flush - t_plain, 0.0) / g))


if __name__ == "__main__":
    from entry import run

    run(main)
