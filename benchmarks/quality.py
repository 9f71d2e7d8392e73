"""Quality of quantized caches: ppl, KL, top-1, effective bits (issue 3 table; issue 10 for Gemma 3).

python benchmarks/quality.py [--model gemma3-270m] [--text ../shared/data/wiki_squad_dev.txt] [--out benchmarks/results/quality.jsonl]
Each line printed (and appended to --out) is one `kvq-jax eval --json` result.
"""

from __future__ import annotations

import argparse
import os

from kvq_jax.evaluate import evaluate
from kvq_jax.loading import load
from kvq_jax.plan import parse_kv

from jsonl import emit

# (label, --kv, overrides)
CONFIGS = [
    ("fp", "fp", {}),
    ("bf16", "bf16", {}),
    ("K8V8", "K8V8", {}),
    ("K4V4", "K4V4", {}),
    ("K4V2", "K4V2", {}),
    ("K2V4", "K2V4", {}),
    ("K2V2", "K2V2", {}),
    ("K2V2 hadamard", "K2V2", {"rotate": "hadamard"}),
    ("K4V2 per-token keys", "K4V2", {"key_axis": "token"}),
    ("K2V4 per-token keys", "K2V4", {"key_axis": "token"}),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wiki_squad_dev.txt"))
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--only", nargs="*", help="labels to run")
    ap.add_argument("--out", default=None)
    ap.add_argument("--model", default="smollm2-135m", help="a model name or a GGUF file")
    args = ap.parse_args()
    text = open(args.text, encoding="utf-8").read()
    model, tok = load(args.model)
    for label, spec, over in CONFIGS:
        if args.only and label not in args.only:
            continue
        kv = parse_kv(spec, model.cfg.n_layers, **over)
        r = evaluate(model, tok, text, context=args.context, windows=args.windows, kv=kv,
                     prefill=args.prefill, progress=False)
        r["label"] = label
        emit(r, args.out)


if __name__ == "__main__":
    from entry import run

    run(main)
