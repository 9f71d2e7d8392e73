"""Markdown tables for the README from the benchmark outputs in benchmarks/results/.

python benchmarks/tables.py [--dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import re

from kvq_jax.plan import split_rotation


def _rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _pct(a: float, b: float) -> str:
    return f"{100 * (a / b - 1):+.2f}%"


def _rel(r: dict) -> str:
    return _pct(r["ppl"], r["ppl_fp"])


def quality(rows: list[dict]) -> str:
    out = ["| cache | ppl | vs fp | KL vs fp | top-1 | effective bits @512 | bytes @512 ×6 |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['label']} | {r['ppl']:.3f} | {_rel(r)} | {r['kl_vs_fp']:.4f} | "
                   f"{r['top1_agreement']:.3f} | {r['effective_bits']:.2f} | {r['kv_cache_bytes'] / 2**20:.1f} MiB |")
    return "\n".join(out)


def allocation(rows: list[dict]) -> str:
    out = ["| budget | plan | data bits spent | ppl | vs fp | KL vs fp | top-1 |",
           "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    order = {"uniform": 0, "norm": 1, "weight-norm": 2, "sensitivity": 3, "fisher": 4}
    for r in sorted(rows, key=lambda r: (r["budget"], order.get(r["method"], 9))):
        name = r["label"] if r["method"] == "uniform" else f"{r['method']} rule"
        out.append(f"| {r['budget']:g} | {name} | {r['spent']:.2f} | {r['ppl']:.3f} | {_rel(r)} | "
                   f"{r['kl_vs_fp']:.4f} | {r['top1_agreement']:.3f} |")
    return "\n".join(out)


def _rotations(per_layer: list[str], codebooks: tuple[int, int] = (0, 0)) -> str:
    """How many layers rotate their keys and their values, and how, with the layers whose keys
    (before RoPE) and values (after Hadamard) carry a codebook: "K prerope 12 (codebook 8),
    hadamard 3; V hadamard 18 (codebook 5)"."""
    sides = [split_rotation(x) for x in per_layer]
    out = []
    for i, name, booked in ((0, "K", "prerope"), (1, "V", "hadamard")):
        counts = [f"{x} {n}" + (f" (codebook {codebooks[i]})" if x == booked and codebooks[i] else "")
                  for x in ("hadamard", "prerope") if (n := sum(s[i] == x for s in sides))]
        if counts:
            out.append(f"{name} " + ", ".join(counts))
    return "; ".join(out) or "none"


def codebooks(r: dict) -> tuple[int, int]:
    """Layers whose keys, and whose values, carry a learned codebook, from the plan's description
    ("K 3b/channel/64+codebook×8, ...; V ...")."""
    def count(part: str) -> int:
        if "+codebook" in part and "×" not in part:  # one spec for every layer
            return len(r["k_bits"])
        return sum(int(n) for n in re.findall(r"\+codebook×(\d+)", part))

    keys, _, values = r["kv"].partition("; V ")
    return count(keys), count(values.split("; ")[0])


def long_context(rows: list[dict]) -> str:
    """An allocation.jsonl at long context: the decoded tokens (after the prefill, reading the
    quantized window) first, every token of the window after."""
    out = ["| cache | data bits | stored bits / element | ppl, decoded tokens | vs fp | KL | top-1 | "
           "ppl, all tokens: vs fp | rotations |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in sorted(rows, key=lambda r: (r["budget"], r["method"] != "uniform", r["label"])):
        rots = _rotations(r.get("rotate") or [], codebooks(r))
        out.append(f"| {r['label']} | {r['spent']:.2f} | {r['stored_bits']:.2f} | {r['ppl_decoded']:.3f} | "
                   f"{_pct(r['ppl_decoded'], r['ppl_fp_decoded'])} | {r['kl_vs_fp_decoded']:.4f} | "
                   f"{r['top1_decoded']:.4f} | {_rel(r)} | {rots} |")
    return "\n".join(out)


def speed(rows: list[dict]) -> str:
    out = ["| context | batch | cache | prefill tok/s | decode tok/s | ms / step | cache bytes | bf16 bytes |",
           "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        m = re.search(r"K (\S+?)b/\S+; V (\S+?)b/", r["kv"])  # "30 layers: K 4b/channel/64; V 2b/..."
        kv = f"K{m.group(1)}V{m.group(2)}" if m else r["kv"]
        out.append(f"| {r['context']} | {r['batch']} | {kv} | {r['prefill_tokens_per_s']:.0f} | "
                   f"{r['decode_tokens_per_s']:.1f} | {r['decode_ms_per_step']:.1f} | "
                   f"{r['kv_cache_bytes'] / 2**20:.1f} MiB | {r['kv_cache_bytes_bf16'] / 2**20:.1f} MiB |")
    return "\n".join(out)


def kernel(rows: list[dict]) -> str:
    out = ["| device | context | batch | path | ms | bytes read | GB/s |",
           "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        if r["impl"] == "flush":
            continue
        out.append(f"| {r['device']} | {r['context']} | {r['batch']} | {r['impl']} | {r['ms']:.3f} | "
                   f"{r['bytes_read'] / 2**20:.1f} MiB | {r['gbps']:.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    for name, fn in (("quality", quality), ("allocation", allocation), ("speed", speed), ("kernel", kernel)):
        rows = _rows(os.path.join(args.dir, f"{name}.jsonl"))
        if rows:
            print(f"### {name}\n\n{fn(rows)}\n")
    long_dir = os.path.join(args.dir, "long_context")
    for model in sorted(os.listdir(long_dir)) if os.path.isdir(long_dir) else ():  # smollm2, gemma3, gemma3_16k
        rows = _rows(os.path.join(long_dir, model, "allocation.jsonl"))
        if rows:
            print(f"### long context, {model}\n\n{long_context(rows)}\n")


if __name__ == "__main__":
    from entry import run

    run(main)
