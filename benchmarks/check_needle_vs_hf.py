"""Cross-check: the fp model's needle answers vs HF transformers (PyTorch) on the same GGUF weights.

Needs `pip install torch transformers accelerate` (not a kvq_jax dependency). Each case is the needle
prompt `kvq_jax.needle` builds (same seed, length, depth and trial); both models answer it greedily
from the same token ids, so a miss of the fp cache at long context can be told apart from a bug of
ours: if transformers gives the same answer, the model itself misses.

python benchmarks/check_needle_vs_hf.py --model gemma3-270m --length 16384 --depths 0 0.5 [--trials 2]
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", help="a model name or a GGUF file")
    ap.add_argument("--length", type=int, required=True)
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--new-tokens", type=int, default=12, help="greedy answer tokens (needle's default)")
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from kvq_jax.decode import generate
    from kvq_jax.loading import load, resolve_model
    from kvq_jax.needle import Filler, first_number, make_case

    path = resolve_model(args.model)
    model, tok = load(path)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                              attn_implementation="sdpa")
    hf.eval()
    filler = Filler(tok)
    rows = []
    for depth in args.depths:
        for trial in range(args.trials):
            case = make_case(tok, filler, args.length, depth, args.seed, trial)
            prompt = case.haystack + case.question
            ours = generate(model, [prompt], max_new_tokens=args.new_tokens, prefill_chunk=args.prefill_chunk,
                            attention_impl="xla").tokens[0]
            ours = [int(t) for t in ours if t >= 0]
            with torch.no_grad():
                out = hf.generate(torch.tensor([prompt]), max_new_tokens=args.new_tokens, do_sample=False)
            theirs = [int(t) for t in out[0, len(prompt):]]
            n = min(len(ours), len(theirs))
            row = {"length": args.length, "depth": depth, "trial": trial, "key": case.key,
                   "kvq_jax": tok.decode(ours), "transformers": tok.decode(theirs),
                   "kvq_jax_correct": first_number(tok.decode(ours)) == case.key,
                   "transformers_correct": first_number(tok.decode(theirs)) == case.key,
                   "same_tokens": ours[:n] == theirs[:n]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"cases": len(rows), "same_tokens": sum(r["same_tokens"] for r in rows),
                      "kvq_jax_correct": sum(r["kvq_jax_correct"] for r in rows),
                      "transformers_correct": sum(r["transformers_correct"] for r in rows)}))


if __name__ == "__main__":
    from entry import run

    run(main)
