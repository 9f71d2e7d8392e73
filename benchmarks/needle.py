"""Needle (passkey) retrieval for several caches on one grid, one heatmap with a panel per cache.

python benchmarks/needle.py --kv fp K4V2 benchmarks/results/plan_fisher_2.5.json \
    --lengths 1024 2048 4096 8000 --out-dir benchmarks/results/needle

Each cache's result is a line of `<out-dir>/<model>_needle.jsonl` (a cache already run on the same
grid there is reused, not rerun); the heatmap is `<out-dir>/<model>_needle.png` (in --kv order), each
panel with every length the file holds for that cache (same depths, trials and filler), so a run at
new lengths grows the grid.
Protocol: `kvq_jax/needle.py`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

from kvq_jax.loading import load
from kvq_jax.needle import heatmap, needle
from kvq_jax.evaluate import kv_name
from kvq_jax.plan import DenseKV, KVPlan, parse_kv


def _identity(kv: KVPlan | DenseKV) -> str:
    """What a result is reused by: a dense cache's name, or a plan's whole JSON (without its free-text
    note), so two plans of one file name, or a plan and its codebook twin, never share results."""
    if isinstance(kv, DenseKV):
        return kv_name(kv)
    return hashlib.sha256(kv.replace(note="").to_json().encode()).hexdigest()[:16]


def _same_cache(r: dict, ident: str, kv: KVPlan | DenseKV, args: argparse.Namespace) -> bool:
    """`r` is a result of this very cache (a plan's whole content, codebooks included; results written
    before identities were recorded: its description) with these depths, trials and filler."""
    return ((r["cache_id"] == ident if "cache_id" in r else r["kv"] == kv_name(kv))
            and r["depths"] == args.depths and r["trials"] == args.trials
            and r["filler"] == ("text" if args.text else "built-in"))


def _with_other_lengths(run: dict, others: list[dict]) -> dict:
    """`run` and the cells of the same cache's results at lengths `run` lacks (the grid grown by later
    runs at new lengths, e.g. 16k after 2k-8k), for the heatmap."""
    cells, per_length, lengths = list(run["cells"]), list(run["per_length"]), list(run["lengths"])
    for r in others:
        new = [n for n in r["lengths"] if n not in lengths]
        cells += [c for c in r["cells"] if c["length"] in new]
        per_length += [p for p in r["per_length"] if p["length"] in new]
        lengths += new
    if len(lengths) == len(run["lengths"]):
        return run
    return dict(run, lengths=sorted(lengths), cells=sorted(cells, key=lambda c: (c["length"], c["depth"])),
                per_length=sorted(per_length, key=lambda p: p["length"]),
                accuracy=float(sum(c["accuracy"] for c in cells) / len(cells)))


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
    ap.add_argument("--group-k", type=int, help="key group of every quantized cache (default: its own)")
    ap.add_argument("--group-v", type=int, help="value group of every quantized cache (default: its own)")
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
    names = [os.path.basename(spec).removesuffix(".json") for spec in args.kv]
    # every cache is checked before the first is run: a bad one is an error, not an hour later
    kvs = [parse_kv(spec, model.cfg.n_layers, group_k=args.group_k, group_v=args.group_v) for spec in args.kv]
    for spec, name, kv in zip(args.kv, names, kvs):
        # plan files of the same name from different folders get their folder in the label
        label = name if names.count(name) == 1 else f"{os.path.basename(os.path.dirname(spec))}/{name}"
        if isinstance(kv, KVPlan) and (args.group_k or args.group_v):
            label += f" (groups {kv.keys[0].group}/{kv.values[0].group})"
        ident = _identity(kv)
        # A result is reused only for this very cache (a plan's whole content, codebooks included;
        # results written before identities were recorded: its description) on the same grid.
        mine = [r for r in earlier if _same_cache(r, ident, kv, args)]
        same = [r for r in mine if r["lengths"] == args.lengths]
        if same:  # this grid was run for this cache already: reuse it (the protocol is deterministic)
            runs.append(_with_other_lengths(dict(same[-1], label=label), mine))
            print(json.dumps({"reused": label, "accuracy": same[-1]["accuracy"]}), flush=True)
            continue
        r = needle(model, tok, lengths=args.lengths, depths=args.depths, trials=args.trials, kv=kv,
                   filler_text=filler, batch=args.batch, prefill_chunk=args.prefill_chunk)
        r["label"], r["cache_id"] = label, ident
        runs.append(_with_other_lengths(r, mine))
        line = json.dumps(r)
        print(json.dumps({k: r[k] for k in ("label", "kv", "accuracy", "per_length")}), flush=True)
        with open(path, "a") as f:
            f.write(line + "\n")
    heatmap(runs, os.path.join(args.out_dir, f"{slug}_needle.png"))


if __name__ == "__main__":
    from entry import run

    run(main)
