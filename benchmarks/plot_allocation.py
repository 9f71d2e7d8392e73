"""ppl cost vs stored bits, one series per allocation method, from an allocation.jsonl.

python benchmarks/plot_allocation.py benchmarks/results/gemma3/allocation_4096.jsonl \
    --out benchmarks/results/gemma3/ppl_vs_bits_4096.png

x: bits the cache really stores per K/V element (`effective_bits`: codes, scales, zeros, sink,
window and padding, over the elements of a full-context cache); y: ppl vs fp in percent.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from kvq_jax.report import figure


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
    args = ap.parse_args()
    with open(args.jsonl) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[series_name(r)].append(r)
    fig = figure(6.0, 4.0)
    ax = fig.subplots()
    for name, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["effective_bits"])
        x = [r["effective_bits"] for r in rs]
        y = [100 * (r["ppl"] / r["ppl_fp"] - 1) for r in rs]
        ax.plot(x, y, "o-" if name != "uniform KbVb" else "s", label=name)
        for r, xi, yi in zip(rs, x, y):
            tag = r["label"] if name == "uniform KbVb" else f"{r['budget']:g}b"
            ax.annotate(tag, (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7)
    first = rows[0]
    ax.set_xlabel(f"stored bits per K/V element at {first['context']} tokens")
    ax.set_ylabel("ppl vs fp (%)")
    ax.set_title(args.title or f"{first['model']}, {first['windows']} windows of {first['context']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(args.out, dpi=120)
    print(args.out)


if __name__ == "__main__":
    main()
