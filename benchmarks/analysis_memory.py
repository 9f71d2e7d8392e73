"""Memory and time of the analysis's two long-context steps, by calibration context (issue 12).

python benchmarks/analysis_memory.py [--model gemma3-270m] [--contexts 2048 4096 8192] [--batch 1] [--out FILE]
    [--label TEXT]

`fisher_pass`: the forward + backward pass that gives every layer's Fisher weights (XLA's buffer
assignment after compilation: temporaries, arguments, outputs; nothing is run). `layer_errors`: one
layer's Fisher-weighted errors (`fisher.layer_fisher_errors`, 5 widths, keys and values) on random
q/k/v of the model's shapes, for a sliding-window layer and a global one when the model has both:
XLA's temporaries and the median of 3 timed calls after a warm-up. One JSON line per measurement.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvq_jax.fisher import fisher_pass, layer_fisher_errors
from kvq_jax.loading import load

from jsonl import emit

GB = 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--label", default=None, help="written into every record (e.g. the code version measured)")
    args = ap.parse_args()
    model, _ = load(args.model)
    cfg = model.cfg
    gd, state = nnx.split(model)
    kinds = sorted({cfg.window(i) for i in range(cfg.n_layers)})  # 0 = global
    rng = np.random.default_rng(0)
    tag = {"label": args.label} if args.label else {}
    for t in args.contexts:
        toks = jnp.zeros((args.batch, t), jnp.int32)
        m = fisher_pass.lower(gd, state, toks).compile().memory_analysis()
        emit({"model": cfg.name, "step": "fisher_pass", "context": t, "batch": args.batch,
              "temp_gb": m.temp_size_in_bytes / GB, "args_gb": m.argument_size_in_bytes / GB,
              "out_gb": m.output_size_in_bytes / GB, "backend": jax.default_backend(), **tag}, args.out)
        arr = lambda h: jnp.asarray(rng.standard_normal((args.batch, t, h, cfg.head_dim)), jnp.float32)
        q, k, v, g = arr(cfg.n_heads), arr(cfg.n_kv_heads), arr(cfg.n_kv_heads), arr(cfg.n_heads)
        for window in kinds:
            kw = dict(bits=(1.58, 2, 3, 4, 8), key_axis="channel", value_axis="token", group_k=64, group_v=64,
                      sink=0 if window else 4, residual=128, block=64, scale_dtype="bfloat16", scale=cfg.scale,
                      window=window)
            m = layer_fisher_errors.lower(q, k, v, g, **kw).compile().memory_analysis()
            jax.block_until_ready(layer_fisher_errors(q, k, v, g, **kw))
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                jax.block_until_ready(layer_fisher_errors(q, k, v, g, **kw))
                times.append(time.perf_counter() - t0)
            emit({"model": cfg.name, "step": "layer_errors", "layer": f"window {window}" if window else "global",
                  "context": t, "batch": args.batch, "temp_gb": m.temp_size_in_bytes / GB,
                  "median_s": float(np.median(times)), "backend": jax.default_backend(), **tag}, args.out)


if __name__ == "__main__":
    from entry import run

    run(main)
