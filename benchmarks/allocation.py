"""Budgeted allocation (issue 4 table on SmolLM2; issue 10 on Gemma 3 with --model gemma3-270m): calibrate on the first half of the text, evaluate
on the second half; ppl at each data budget for uniform KbVb, the reference norm rule and our
sensitivity rules (attention-output error, and its Fisher-weighted, loss-aware variant).

python benchmarks/allocation.py --text ../shared/data/wiki_squad_dev.txt --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os

from kvq_jax.allocate import allocate_detailed, cache_geometry, layer_tokens_at
from kvq_jax.analysis import analyze
from kvq_jax.evaluate import evaluate_plans, text_windows
from kvq_jax.loading import load
from kvq_jax.plan import ROTATIONS, parse_kv
from kvq_jax.report import write_report
from kvq_jax.stats import KVStats

# Uniform baselines at each budget (K4V2 and K3V3 both spend 3 data bits).
UNIFORM = {2.0: ("K2V2",), 2.5: ("K3V2",), 3.0: ("K3V3", "K4V2"), 4.0: ("K4V4",), 8.0: ("K8V8",)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", required=True)
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.0, 2.5, 3.0, 4.0])
    ap.add_argument("--methods", nargs="+", default=["uniform", "norm", "sensitivity", "fisher"])
    ap.add_argument("--rule-budgets", type=float, nargs="+", default=None,
                    help="the budgets at which the allocation rules run (default: --budgets)")
    ap.add_argument("--model", default="smollm2-135m", help="a model name or a GGUF file")
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--stats", default=None,
                    help="statistics file to use, or to write (default: <out-dir>/<model>_stats.npz)")
    ap.add_argument("--calib-context", type=int, default=None, help="calibration window (default: --context)")
    ap.add_argument("--score-from", type=int, default=None,
                    help="fisher errors only at calibration positions >= this (see kvq-jax analyze --help; "
                         "default 0, or as saved statistics were measured)")
    ap.add_argument("--calib-batch", type=int, default=2, help="calibration windows per analysis pass")
    ap.add_argument("--rotate", default="none", choices=ROTATIONS + ("auto",),
                    help="the allocated plans' rotation (auto: per layer, fisher only)")
    ap.add_argument("--codebooks", default="all", choices=("all", "keys", "none"),
                    help="with --rotate auto: the learned codebooks the allocator may choose (keys: key "
                         "codebooks only; none: uniform codes only)")
    ap.add_argument("--no-codebooks", action="store_const", const="none", dest="codebooks",
                    help="the same as --codebooks none")
    ap.add_argument("--uniform-rotations", nargs="+", default=["none"], choices=ROTATIONS,
                    help="score each uniform KbVb plan under each of these rotations")
    ap.add_argument("--uniform", nargs="+", default=None,
                    help="the uniform plans to score (default: those of each budget, K3V3 and K4V2 at 3)")
    ap.add_argument("--group-k", type=int, default=None,
                    help="key group (tokens per per-channel scale); default 64, or the saved statistics'")
    ap.add_argument("--group-v", type=int, default=None,
                    help="value group (channels per per-token scale); default 64, or the saved statistics'")
    ap.add_argument("--target-context", type=int, default=None,
                    help="also run each rule under a memory budget: bits per element the cache holds at this context")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    text = open(args.text, encoding="utf-8").read()
    half = len(text) // 2
    calib, held_out = text[:half], text[half:]
    model, tok = load(args.model)
    slug = "smollm2" if args.model == "smollm2-135m" else os.path.basename(str(args.model)).split(".")[0]
    given = {g: getattr(args, g) for g in ("group_k", "group_v") if getattr(args, g) is not None}
    stats_path = args.stats or os.path.join(args.out_dir, f"{slug}_stats.npz")
    if os.path.exists(stats_path):
        stats = KVStats.load(stats_path)
        stats.check_reuse(stats_path, model.cfg.name, model.cfg.n_layers, args.score_from)
    else:
        stats = analyze(model, text_windows(tok, calib, args.calib_context or args.context, args.calib_windows),
                        progress=True, batch=args.calib_batch, score_from=args.score_from or 0, **given,
                        meta={"calib_file": os.path.basename(args.text) + " (first half)"})
        stats.save(stats_path)
    # Every plan uses the groups the statistics were measured with, unless given; a rule that reads
    # measured errors refuses groups they were not measured with (any rule run may refuse).
    geometry = cache_geometry(stats, args.methods, **given)
    groups = {g: geometry[g] for g in ("group_k", "group_v")}
    runs = []  # (label, method, budget, plan, data bits spent)
    for budget in args.budgets:
        for method in args.methods:
            if method == "uniform":
                runs += [(spec + ("" if rot == "none" else f" {rot}"), method, budget,
                          parse_kv(spec, model.cfg.n_layers, rotate=rot, **groups), budget)
                         for spec in UNIFORM.get(budget, ()) if args.uniform is None or spec in args.uniform
                         for rot in args.uniform_rotations]
                continue
            if args.rule_budgets is not None and budget not in args.rule_budgets:
                continue
            tag = {"all": "", "keys": "key-codebooks", "none": "no-codebooks"}[args.codebooks]
            rot = ("" if args.rotate == "none" else f" rotate={args.rotate}") + (f" {tag}" if tag else "")
            books = dict(key_codebooks=False if args.codebooks == "none" else None,
                         value_codebooks=False if args.codebooks != "all" else None)
            alloc = allocate_detailed(stats, budget, method=method, model_name=model.cfg.name, rotate=args.rotate, **groups,
                                      **books)
            name = f"{'' if slug == 'smollm2' else slug + '_'}plan_{method}_{budget:g}"
            suffix = ("" if args.rotate == "none" else f"_{args.rotate}") + ("_" + tag.replace("-", "") if tag else "")
            alloc.plan.save(os.path.join(args.out_dir, name + suffix + ".json"))
            runs.append((method + rot, method, budget, alloc.plan, float(alloc.spent)))
            if args.target_context:  # the same average over the elements the cache really holds
                mem = allocate_detailed(stats, budget, method=method, model_name=model.cfg.name, rotate=args.rotate, **groups,
                                        **books,
                                        layer_tokens=layer_tokens_at(model.cfg, args.target_context))
                runs.append((f"{method} memory@{args.target_context}{rot}", method, budget, mem.plan, float(mem.spent)))
    # One fp reference stream for every plan.
    results = evaluate_plans(model, tok, held_out, [kv for *_, kv, _ in runs], context=args.context,
                             windows=args.windows, prefill=args.prefill, progress=True)
    for (label, method, budget, kv, spent), r in zip(runs, results):
        r.update(label=label, method=method, budget=budget, spent=spent,
                 k_bits=[s.bits for s in kv.keys], v_bits=[s.bits for s in kv.values],
                 rotate=[kv.rotation(i) for i in range(kv.n_layers)])
        line = json.dumps(r)
        print(line, flush=True)
        with open(os.path.join(args.out_dir, "allocation.jsonl"), "a") as f:
            f.write(line + "\n")
    # The report shows every rule's plan at 3 bits, whichever methods this run evaluated (fisher only
    # where the calibration windows were long enough to measure its errors).
    plans = {m: allocate_detailed(stats, 3.0, method=m, model_name=model.cfg.name).plan
             for m in ("norm", "sensitivity", "fisher") if m != "fisher" or stats.k_fisher_err is not None}
    report_dir = os.path.join(args.out_dir, "report" if slug == "smollm2" else f"{slug}_report")
    write_report(stats, report_dir, plans=plans)
    print(json.dumps({"report": os.path.join(report_dir, "report.md")}))


if __name__ == "__main__":
    from entry import run

    run(main)
