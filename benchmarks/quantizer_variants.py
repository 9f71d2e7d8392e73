"""Quantizer variants beyond uniform min-max, screened by their Fisher-weighted error on held-out text.

For every layer, the predicted rise in NLL (kvq_jax.fisher: attention-output error under the cache's
sink/window protocol, weighted by the loss's Fisher diagonal) when only its keys, or only its values,
are stored with a variant, summed over layers, at 2 and 3 bits:

  keys:   uniform after RoPE (what the cache did), Hadamard, before RoPE ("prerope"), before RoPE
          + Hadamard, learned codebooks (Lloyd-Max levels on group-normalised values, free or with the
          group min/max kept as end levels), the best of {after, Hadamard, before RoPE} per layer;
  values: uniform, Hadamard, learned codebooks (free, fixed ends; fixed ends after Hadamard).

Codebooks are learned per layer, K and V apart, on calibration windows from the first half of the
text; every error is measured on windows from the second half. A variant is worth building into the
cache only if it lowers these errors; the winners are then measured for real (benchmarks/allocation.py).

python benchmarks/quantizer_variants.py --text ../shared/data/wiki_squad_dev.txt [--model gemma3-270m]
"""

from __future__ import annotations

import argparse
import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvq_jax.codebook import lloyd_levels
from kvq_jax.evaluate import text_windows
from kvq_jax.fisher import fisher_pass, mixed_attention, protocol_span, qdq_body
from kvq_jax.loading import load
from kvq_jax.rotations import apply_rope, hadamard

BITS = (2, 3)
G = 64  # group: keys per channel over 64 tokens, values per token over 64 channels (the defaults)
SINK, RESIDUAL = 4, 128


def qdq_codebook(x, levels, axis: str, sink: int, bits: int):
    """x `[B, T, H, D]` with body tokens quantized to the nearest of `levels` within each group, in the
    cache's blocks (`fisher.qdq_body`, which the analysis measures with)."""
    return qdq_body(x, bits, axis, G, sink, G, jnp.bfloat16, jnp.asarray(levels, jnp.float32))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--calib-windows", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/quantizer_variants.jsonl")
    args = ap.parse_args()
    model, tok = load(args.model)
    cfg = model.cfg
    text = open(args.text, encoding="utf-8").read()
    half = len(text) // 2
    gd, st = nnx.split(model)
    t = args.context
    h_mat = jnp.asarray(hadamard(cfg.head_dim), jnp.float32)
    pos = jnp.arange(t)[None, :, None]

    def layer_inputs(toks):
        _, grads, (q, k, v) = fisher_pass(gd, st, toks)
        return grads, q, k, v

    books = {}
    for w in text_windows(tok, text[:half], t, args.calib_windows):
        _, _, k, v = layer_inputs(jnp.asarray(w[None]))
        for i in range(cfg.n_layers):
            rope = cfg.rope(i)
            kpre = apply_rope(k[i], pos, rope, inverse=True)
            for b in BITS:
                for name, x, axis in (("k", k[i], "channel"), ("kpre", kpre, "channel"), ("v", v[i], "token"),
                                      ("vhad", v[i] @ h_mat, "token")):
                    for fixed in (False, True):
                        books.setdefault((i, b, name, fixed), []).append(np.asarray(lloyd_levels(
                            x, bits=b, axis=axis, group=G, sink=0 if cfg.window(i) else SINK, fixed_ends=fixed)))
    books = {key: np.mean(v, axis=0) for key, v in books.items()}  # average over calibration windows

    total: dict[tuple[int, str], float] = {}
    for w in text_windows(tok, text[half:], t, args.eval_windows):
        grads, q, k, v = layer_inputs(jnp.asarray(w[None]))
        for i in range(cfg.n_layers):
            rope, window = cfg.rope(i), cfg.window(i)
            sink = 0 if window else SINK
            span = protocol_span(t, sink, RESIDUAL, G)
            ref = mixed_attention(q[i], k[i], v[i], k[i], v[i], None, cfg.scale, window)
            fisher = grads[i] ** 2
            err = lambda kh, vh: float(0.5 * jnp.sum(fisher * (mixed_attention(
                q[i], k[i], v[i], kh, vh, span, cfg.scale, window) - ref) ** 2))
            uni = lambda x, b, axis: qdq_body(x, b, axis, G, sink, G, jnp.bfloat16)
            pre = lambda f: apply_rope(f(apply_rope(k[i], pos, rope, inverse=True)), pos, rope)
            for b in BITS:
                keys = {
                    "uniform": uni(k[i], b, "channel"),
                    "hadamard": uni(k[i] @ h_mat, b, "channel") @ h_mat,
                    "prerope": pre(lambda x: uni(x, b, "channel")),
                    "prerope+hadamard": pre(lambda x: uni(x @ h_mat, b, "channel") @ h_mat),
                    "codebook": qdq_codebook(k[i], books[(i, b, "k", False)], "channel", sink, b),
                    "codebook fixed ends": qdq_codebook(k[i], books[(i, b, "k", True)], "channel", sink, b),
                    "prerope+codebook fixed ends": pre(lambda x: qdq_codebook(x, books[(i, b, "kpre", True)], "channel", sink, b)),
                }
                values = {
                    "uniform": uni(v[i], b, "token"),
                    "hadamard": uni(v[i] @ h_mat, b, "token") @ h_mat,
                    "codebook": qdq_codebook(v[i], books[(i, b, "v", False)], "token", sink, b),
                    "codebook fixed ends": qdq_codebook(v[i], books[(i, b, "v", True)], "token", sink, b),
                    "hadamard+codebook fixed ends": qdq_codebook(v[i] @ h_mat, books[(i, b, "vhad", True)], "token",
                                                                 sink, b) @ h_mat,
                }
                ke = {name: err(x, v[i]) for name, x in keys.items()}
                ke["best of uniform/hadamard/prerope per layer"] = min(ke["uniform"], ke["hadamard"], ke["prerope"])
                ke["best of uniform/hadamard/prerope/prerope+codebook per layer"] = min(
                    ke["best of uniform/hadamard/prerope per layer"], ke["prerope+codebook fixed ends"])
                for name, e in ke.items():
                    total[(b, "K " + name)] = total.get((b, "K " + name), 0.0) + e
                for name, x in values.items():
                    total[(b, "V " + name)] = total.get((b, "V " + name), 0.0) + err(k[i], x)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "a") as f:
        for b in BITS:
            for side in "KV":
                base = total[(b, f"{side} uniform")]
                for (bb, name), e in total.items():
                    if bb == b and name.startswith(side + " "):
                        line = json.dumps({"model": args.model, "bits": b, "tensor": side, "variant": name[2:],
                                           "fisher_err_nats_per_window": e / args.eval_windows,
                                           "vs_uniform": e / base, "context": t,
                                           "calib_windows": args.calib_windows, "eval_windows": args.eval_windows})
                        print(line, flush=True)
                        f.write(line + "\n")


if __name__ == "__main__":
    from entry import run

    run(main)
