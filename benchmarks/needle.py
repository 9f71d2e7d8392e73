"""Needle (passkey) retrieval for several caches on one grid, one heatmap with a panel per cache.

python benchmarks/needle.py --kv fp K4V2 benchmarks/results/plan_fisher_2.5.json \
    --lengths 1024 2048 4096 8000 --out-dir benchmarks/results/needle

Each cache's result is a line of `<out-dir>/<model>_needle.jsonl` (a cache already run on the same
grid there is reused, not rerun); the heatmap is `<out-dir>/<model>_needle.png` (in --kv order).
Protocol: `kvq_jax/needle.py`.
"""

from __future__ import annotations

import argparse
import json
import os

from kvq_jax.loading import load
from kvq_jax.needle import heatmap, needle
from kvq_jax.plan import parse_kv


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--kv", nargs="+", default=["fp", "K4V2"], help="caches: fp, K<b>V<b> or plan files")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--text", help="filler text (default: the built-in filler)")
    ap.add_argument("--prefill-chunk", type=int, default=0)
    ap.add_argument("--out-dir", default="benchmarks/results/needle")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    model, tok = load(args.model)
    filler = open(args.text, encoding="utf-8").read() if args.text else None
    slug = os.path.basename(str(args.model)).split(".")[0]
    path = os.path.join(args.out_dir, f"{slug}_needle.jsonl")
    earlier = []
    if os.path.exists(path):
        with open(path) as f:
            earlier = [json.loads(line) for line in f if line.strip()]
    runs = []
    for spec in args.kv:
        label = os.path.basename(spec).removesuffix(".json")
        same = [r for r in earlier if r.get("label") == label and r["lengths"] == args.lengths
                and r["depths"] == args.depths and r["trials"] == args.trials
                and r["filler"] == ("text" if args.text else "built-in")]
        if same:  # this grid was run for this cache already: reuse it (the protocol is deterministic)
            runs.append(same[-1])
            print(json.dumps({"reused": label, "accuracy": same[-1]["accuracy"]}), flush=True)
            continue
        kv = parse_kv(spec, model.cfg.n_layers)
        r = needle(model, tok, lengths=args.lengths, depths=args.depths, trials=args.trials, kv=kv,
                   filler_text=filler, batch=args.batch, prefill_chunk=args.prefill_chunk)
        r["label"] = label
        runs.append(r)
        line = json.dumps(r)
        print(json.dumps({k: r[k] for k in ("label", "kv", "accuracy", "per_length")}), flush=True)
        with open(path, "a") as f:
            f.write(line + "\n")
    heatmap(runs, os.path.join(args.out_dir, f"{slug}_needle.png"))


if __name__ == "__main__":
    main()
