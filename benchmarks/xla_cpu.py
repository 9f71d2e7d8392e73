"""Why the XLA packed path looks the way it does on CPU: one layer's packed-body attention at a long
context, by batch, for loop chunk sizes and for two ways of taking q·k (issue 3).

python benchmarks/xla_cpu.py [--context 8192] [--batches 1 8 16] [--kv K4V2] [--out FILE]

`scores=gemv` is the shipped `attention.chunk_scores` (one matrix-vector product per query head);
`scores=batched` is the single batched `[R, D] x [n, D]^T` einsum it replaced. `dense` is the fp32
attention over the same number of tokens (the fp cache's read). Shapes are SmolLM2's (3 KV heads,
3 query heads each, head_dim 64); the packed words and scales are random. Each JSON line is the best
and median of 8 rounds of 8 calls (ms per layer), rounds interleaved across variants so a noisy
machine slows them alike. In isolation one layer's dense cache fits in the CPU's cache at small
batches, so `dense` is optimistic there; the whole-model numbers are `benchmarks/speed.py`'s.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvq_jax import attention
from kvq_jax.cache import init_cache
from kvq_jax.config import tiny_config
from kvq_jax.plan import parse_kv

from jsonl import emit
from kernel import _dense, _random_layer  # the kernel benchmark's random fill and dense read


def _batched_scores(q, k):
    return jnp.einsum("bhrd,bhnd->bhrn", q, k)


def _packed(scores):
    def f(q, layer, n_valid):
        shipped = attention.chunk_scores
        attention.chunk_scores = scores  # read at trace time by packed_xla
        try:
            return attention.packed_xla(q, layer, n_valid)
        finally:
            attention.chunk_scores = shipped
    return jax.jit(f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--chunks", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--kv", default="K4V2")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = tiny_config(n_layers=1, n_heads=9, n_kv_heads=3, head_dim=64)
    gemv, batched = _packed(attention.chunk_scores), _packed(_batched_scores)
    for b in args.batches:
        rng = np.random.default_rng(b)
        layer = _random_layer(init_cache(cfg, parse_kv(args.kv, 1), b, args.context).layers[0], b)
        q = jnp.asarray(rng.standard_normal((b, 3, 3, 64)) / 8, jnp.float32)
        n = jnp.full((b,), args.context - 256, jnp.int32)
        kd = jnp.asarray(rng.standard_normal((b, 3, args.context, 64)), jnp.float32)
        runs = {("dense", "-", 0): (_dense, (q, kd, kd, n))}
        for c in args.chunks:
            lay = layer.replace(chunk=min(c, layer.body_capacity))
            runs[("packed", "gemv", c)] = (gemv, (q, lay, n))
            runs[("packed", "batched", c)] = (batched, (q, lay, n))
        times = {key: [] for key in runs}
        for fn, a in runs.values():
            jax.block_until_ready(fn(*a))
        for _ in range(8):
            for key, (fn, a) in runs.items():
                ts = []
                for _ in range(8):
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(*a))
                    ts.append(time.perf_counter() - t0)
                times[key].append(1e3 * float(np.median(ts)))
        for (path, scores, c), t in times.items():
            rec = dict(kv=args.kv if path == "packed" else "fp32", path=path, scores=scores, chunk=c,
                       batch=b, context=args.context, best_ms=min(t), median_ms=float(np.median(t)),
                       device=jax.devices()[0].device_kind, jax=jax.__version__)
            emit(rec, args.out)


if __name__ == "__main__":
    from entry import run

    run(main)
