"""Decode throughput of SmolLM2 with the fp cache vs quantized caches (issue 2/3 tables).

python benchmarks/speed.py --contexts 512 4096 8160 --batches 1 8 --kv fp K4V2 [--new-tokens 32]
(8160 + 32 new tokens fill SmolLM2's 8192-token context.)
Prints one `kvq-jax bench --json` result per line.
"""

from __future__ import annotations

import argparse

from kvq_jax.bench import bench
from kvq_jax.loading import load
from kvq_jax.plan import parse_kv

from jsonl import emit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[512])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--kv", nargs="+", default=["fp", "K4V2"])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model, _ = load()
    for ctx in args.contexts:
        for b in args.batches:
            for spec in args.kv:
                r = bench(model, batch=b, context=ctx, new_tokens=args.new_tokens,
                          kv=parse_kv(spec, model.cfg.n_layers), attention_impl=args.attention)
                emit(r, args.out)


if __name__ == "__main__":
    from entry import run

    run(main)
