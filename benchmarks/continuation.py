"""Continuing a cache vs re-prefilling it, and one-shot vs chunked prefill (issue 9).

    python benchmarks/continuation.py --text ../shared/data/wiki_squad_dev.txt ttft [--histories 500 2000 6000]
    python benchmarks/continuation.py --text ../shared/data/wiki_squad_dev.txt prefill [--tokens 512 2048 8192]

`ttft`: time to the first token of turn 2 (a 40-token user turn after a history of N tokens), with the
cache of turn 1 continued vs the whole history re-prefilled from an empty cache; both compiled first.
`prefill`: prefill time and the process's peak RSS for an N-token prompt, one shot and in chunks (each
configuration in its own subprocess, so RSS is its own; `--protocol exact|cached` for the chunks). One
JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jsonl import emit  # noqa: E402


def _ids(tok, path: str, n: int) -> list[int]:
    ids = tok.encode(Path(path).read_text(encoding="utf-8"), add_bos=False)
    if len(ids) < n:
        raise SystemExit(f"the text has {len(ids)} tokens, {n} needed")
    return ids[:n]


def ttft(args) -> None:
    import jax

    import kvq_jax
    from kvq_jax.decode import generate

    model, tok = kvq_jax.load()
    turn = _ids(tok, args.text, 40 + max(args.histories))[-40:]
    for kv_name in args.kv:
        kv = kvq_jax.parse_kv(kv_name, model.cfg.n_layers)
        for n in args.histories:
            history = _ids(tok, args.text, n)
            cap = n + 40 + 8

            def first_turn():
                cache = kvq_jax.init_cache(model.cfg, kv, 1, cap)
                return generate(model, [history], max_new_tokens=1, cache=cache, prefill_chunk=args.chunk)

            def continued(res):
                t0 = time.perf_counter()
                out = generate(model, [turn], max_new_tokens=1, cache=res.cache, prefill_chunk=args.chunk)
                jax.block_until_ready(out.cache.lengths)
                return time.perf_counter() - t0

            def reprefill():
                cache = kvq_jax.init_cache(model.cfg, kv, 1, cap)
                t0 = time.perf_counter()
                out = generate(model, [history + turn], max_new_tokens=1, cache=cache, prefill_chunk=args.chunk)
                jax.block_until_ready(out.cache.lengths)
                return time.perf_counter() - t0

            continued(first_turn())  # compiles
            reprefill()
            t_cont = min(continued(first_turn()) for _ in range(2))
            t_full = min(reprefill() for _ in range(2))
            emit({"bench": "ttft_turn2", "kv": kv_name, "history": n, "turn_tokens": len(turn),
                  "prefill_chunk": args.chunk, "continued_s": t_cont, "reprefill_s": t_full,
                  "speedup": t_full / t_cont}, args.out)


def prefill_one(args) -> None:
    import jax
    import numpy as np

    import kvq_jax
    from kvq_jax.decode import prefill

    model, tok = kvq_jax.load()
    kv = kvq_jax.parse_kv(args.kv[0], model.cfg.n_layers)
    n = args.tokens[0]
    rows = [_ids(tok, args.text, n)]
    run = lambda: jax.block_until_ready(prefill(model, rows, kvq_jax.init_cache(model.cfg, kv, 1, n + 64),
                                                chunk=args.chunk, protocol=args.protocol))
    run()  # compiles
    t0 = time.perf_counter()
    logits, _ = run()
    dt = time.perf_counter() - t0
    emit({"bench": "prefill", "kv": args.kv[0], "tokens": n, "prefill_chunk": args.chunk,
          "prefill_protocol": args.protocol if args.chunk else "one shot", "prefill_s": dt,
          "tokens_per_s": n / dt, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "finite": bool(np.isfinite(np.asarray(logits)).all())}, args.out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", required=True)
    ap.add_argument("--kv", nargs="+", default=["fp", "K4V2"])
    ap.add_argument("--chunk", type=int, default=0)
    ap.add_argument("--out", help="append the JSON lines to this file")
    ap.add_argument("--histories", type=int, nargs="+", default=[500, 2000, 6000])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 512])
    ap.add_argument("--protocol", default="exact", choices=("exact", "cached"), help="chunked prefill protocol")
    ap.add_argument("what", choices=("ttft", "prefill", "_prefill_one"))
    args = ap.parse_args()
    if args.what == "ttft":
        ttft(args)
    elif args.what == "_prefill_one":
        prefill_one(args)
    else:  # one subprocess per configuration: its peak RSS is its own
        for kv in args.kv:
            for n in args.tokens:
                for c in args.chunks:
                    subprocess.run([sys.executable, __file__, "--text", args.text, "--kv", kv, "--tokens", str(n),
                                    "--chunk", str(c), "--protocol", args.protocol, *(["--out", args.out] if args.out else []), "_prefill_one"], check=True)


if __name__ == "__main__":
    from entry import run

    run(main)
