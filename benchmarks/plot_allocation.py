"""ppl cost vs stored bits, one series per allocation method, from an allocation.jsonl.

python benchmarks/plot_allocation.py benchmarks/results/gemma3/allocation_4096.jsonl \
    --out benchmarks/results/gemma3/ppl_vs_bits_4096.png

x: the cache's real bytes (codes, scales, zeros, sink, window and padding) x 8 per K/V element it
holds (`stored_bits`; older results: computed from `kv_cache_bytes`); y: ppl vs fp in percent.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from kvq_jax.evaluate import elements_held
from kvq_jax.gguf_loader import read_metadata
from kvq_jax.config import ModelConfig
from kvq_jax.loading import resolve_model
from kvq_jax.report import figure


def stored_bits(r: dict, cfg) -> float:
    if "stored_bits" in r:
        return r["stored_bits"]
    return r["kv_cache_bytes"] * 8 / elements_held(cfg, r["windows"], r["context"])


def series_name(r: dict) -> str:
    if r["method"] == "uniform":
        return "uniform KbVb"
    rot = r["label"].split(" rotate=")[1] if " rotate=" in r["label"] else None
    return r["method"] + (" (memory budget)" if "memory@" in r["label"] else "") + (f", rotate {rot}" if rot else "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("jsonl")
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default=None)
    ap.add_argument("--model", default="gemma3-270m", help="the model of the results (its layer windows)")
    args = ap.parse_args()
    cfg = ModelConfig.from_gguf_metadata(read_metadata(resolve_model(args.model)), has_output_weight=False)
    with open(args.jsonl) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[series_name(r)].append(r)
    fig = figure(6.0, 4.0)
    ax = fig.subplots()
    for name, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: stored_bits(r, cfg))
        x = [stored_bits(r, cfg) for r in rs]
        y = [100 * (r["ppl"] / r["ppl_fp"] - 1) for r in rs]
        ax.plot(x, y, "o-" if name != "uniform KbVb" else "s", label=name)
        for r, xi, yi in zip(rs, x, y):
            tag = r["label"] if name == "uniform KbVb" else f"{r['budget']:g}b"
            ax.annotate(tag, (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7)
    first = rows[0]
    ax.set_xlabel(f"stored bits per K/V element held at {first['context']} tokens")
    ax.set_ylabel("ppl vs fp (%)")
    ax.set_title(args.title or f"{first['model']}, {first['windows']} windows of {first['context']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(args.out, dpi=120)
    print(args.out)


if __name__ == "__main__":
    main()
