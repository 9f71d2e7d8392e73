"""Cross-check: kvq_jax fp perplexity vs HF transformers (PyTorch) on the same GGUF weights.

Needs `pip install torch transformers accelerate` (not a kvq_jax dependency). transformers dequantizes the GGUF
itself (its own loader and Q/K un-permutation), so this checks our loader and model independently.
Both score the same token windows (kvq_jax's tokenizer and BOS protocol; the HF tokenizer is compared too).

python benchmarks/check_ppl_vs_hf.py --text ../shared/data/wiki_squad_dev.txt [--model gemma3-270m] [--context 512 --windows 6]
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", required=True)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--model", default="smollm2-135m", help="a model name or a GGUF file")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvq_jax.evaluate import evaluate, text_windows
    from kvq_jax.loading import load, resolve_model

    text = open(args.text, encoding="utf-8").read()
    path = resolve_model(args.model)
    model, tok = load(path)
    ours = evaluate(model, tok, text, context=args.context, windows=args.windows, progress=False)
    windows = text_windows(tok, text, args.context, args.windows)

    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32)
    hf.eval()
    hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    sample = text[:2000]
    same_tokens = hf_tok(sample, add_special_tokens=False)["input_ids"] == tok.encode(sample)
    nll = 0.0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor(w[None, :], dtype=torch.long)
            logits = hf(ids).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1)
            nll -= lp.gather(-1, ids[0, 1:, None]).sum().item()
    hf_ppl = math.exp(nll / (windows.shape[0] * (args.context - 1)))
    print(json.dumps({
        "kvq_jax_ppl": ours["ppl"], "hf_transformers_ppl": hf_ppl,
        "rel_diff": abs(ours["ppl"] - hf_ppl) / hf_ppl, "tokenizers_agree_on_sample": same_tokens,
        "windows": int(windows.shape[0]), "context": args.context, "bos": bool(tok.uses_bos),
        "model": model.cfg.name,
    }))


if __name__ == "__main__":
    from entry import run

    run(main)
