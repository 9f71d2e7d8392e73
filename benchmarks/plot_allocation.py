"""ppl cost vs stored bits, one series per allocation method, from allocation.jsonl files.

python benchmarks/plot_allocation.py benchmarks/results/gemma3/allocation_4096.jsonl \
    --out benchmarks/results/gemma3/ppl_vs_bits_4096.png

x: the cache's real bytes (codes, scales, zeros, sink, window and padding) x 8 per K/V element it
holds (`stored_bits`; older results: computed from `kv_cache_bytes`); y: ppl vs fp in percent, of the
tokens fed through the cache after the prefill (`ppl_decoded`: they read the quantized window) where
the results have it (`--metric all`: every token of the window; `--metric kl`: the decoded tokens'
KL from the fp model, steadier than a ppl over ~1k tokens).
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
from tables import codebooks  # benchmarks/tables.py: which layers' keys and values carry a codebook


def stored_bits(r: dict, cfg) -> float:
    if "stored_bits" in r:
        return r["stored_bits"]
    return r["kv_cache_bytes"] * 8 / elements_held(cfg, r["windows"], r["context"])


def series_name(r: dict) -> str:
    if r["method"] == "uniform":
        rot = r["label"].split(" ", 1)[1] if " " in r["label"] else None  # "K4V2 prerope"
        return "uniform KbVb" + (f", {rot}" if rot else "")
    rot = r["label"].split(" rotate=")[1] if " rotate=" in r["label"] else None
    return (r["method"] + (" (memory budget)" if "memory@" in r["label"] else "") + (f", rotate {rot}" if rot else "")
            + {(True, False): " + key codebooks", (False, True): " + value codebooks",
               (True, True): " + K/V codebooks"}.get(tuple(n > 0 for n in codebooks(r)), ""))


def cost(r: dict, metric: str) -> float:
    """ppl vs fp in percent: of the decoded tokens (when measured) or of every token; or the decoded
    tokens' KL vs fp."""
    if metric == "kl":
        return r["kl_vs_fp_decoded"]
    if metric == "decoded" and "ppl_decoded" in r:
        return 100 * (r["ppl_decoded"] / r["ppl_fp_decoded"] - 1)
    return 100 * (r["ppl"] / r["ppl_fp"] - 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("jsonl", nargs="+", help="allocation.jsonl files of one model and protocol (their series together)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default=None)
    ap.add_argument("--model", default="gemma3-270m", help="the model of the results (its layer windows)")
    ap.add_argument("--metric", default="decoded", choices=("decoded", "all", "kl"))
    ap.add_argument("--suffixes", nargs="+", default=None,
                    help="one per jsonl file, appended to its series' names (e.g. '' ', calibrated at 8192')")
    args = ap.parse_args()
    if args.suffixes is not None and len(args.suffixes) != len(args.jsonl):
        ap.error(f"--suffixes needs one entry per jsonl file ({len(args.jsonl)}), got {len(args.suffixes)}")
    cfg = ModelConfig.from_gguf_metadata(read_metadata(resolve_model(args.model)), has_output_weight=False)
    rows, groups = [], defaultdict(list)
    for path, suffix in zip(args.jsonl, args.suffixes or [""] * len(args.jsonl)):
        with open(path) as f:
            file_rows = [json.loads(line) for line in f if line.strip()]
        rows += file_rows
        for r in file_rows:
            groups[series_name(r) + suffix].append(r)
    fig = figure(6.0, 4.0)
    ax = fig.subplots()
    for name, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: stored_bits(r, cfg))
        x = [stored_bits(r, cfg) for r in rs]
        y = [cost(r, args.metric) for r in rs]
        uniform = name.startswith("uniform")
        ax.plot(x, y, "o-" if not uniform else "s", label=name)
        for r, xi, yi in zip(rs, x, y):
            tag = r["label"].split()[0] if uniform else f"{r['budget']:g}b"
            ax.annotate(tag, (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7)
    first = rows[0]
    ax.set_xlabel(f"stored bits per K/V element held at {first['context']} tokens")
    decoded = args.metric in ("decoded", "kl") and "ppl_decoded" in first
    after = f", the {first['context'] - first['prefill'] - 1} tokens after the prefill" if decoded else ""
    ax.set_ylabel(("KL vs fp (nats/token)" if args.metric == "kl" else "ppl vs fp (%)") + after)
    ax.set_title(args.title or f"{first['model']}, {first['windows']} windows of {first['context']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(args.out, dpi=120)
    print(args.out)


if __name__ == "__main__":
    from entry import run

    run(main)
