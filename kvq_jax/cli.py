"""`kvq-jax` command line: generate, chat, eval, bench, analyze.

Every user error prints one line on stderr and exits with status 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from kvq_jax.errors import KvqError
from kvq_jax.plan import join_rotation, split_rotation


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise KvqError(message)


_SEED_MAX = 2**32 - 1  # what both jax.random.key and numpy's default_rng accept everywhere


def _int_in(lo: int, hi: int | None = None):
    """An argparse type: an integer in [lo, hi] (no upper bound if hi is None)."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo or (hi is not None and v > hi):
            want = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"expected an integer {want}, got {v}")
        return v

    return parse


_positive_int, _nonneg_int, _seed = _int_in(1), _int_in(0), _int_in(0, _SEED_MAX)


def _rotation(text: str) -> str:
    try:
        return join_rotation(*split_rotation(text))
    except KvqError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _finite_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def _common(p: argparse.ArgumentParser, kv: bool = True) -> None:
    p.add_argument("--model", help="smollm2-135m (default) | gemma3-270m | a GGUF file | an HF directory")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    if kv:
        p.add_argument("--kv", default="fp", help="fp | bf16 | K<b>V<b> (e.g. K4V2, K1.58V2) | plan JSON file")
        p.add_argument("--key-axis", choices=("token", "channel"))
        p.add_argument("--value-axis", choices=("token", "channel"))
        p.add_argument("--group-k", type=_positive_int)
        p.add_argument("--group-v", type=_positive_int)
        p.add_argument("--residual", type=int, help="recent tokens kept in full precision (default 128)")
        p.add_argument("--sink", type=int, help="first tokens kept in full precision (default 4)")
        p.add_argument("--rotate", type=_rotation,
                       help="rotate cached K/V before quantizing: hadamard (keys and values), prerope "
                            "(keys stored before RoPE, rotated by position when read), or KEYS/VALUES "
                            "(e.g. prerope/hadamard)")
        p.add_argument("--window-dtype", choices=("compute", "bfloat16", "float32"),
                       help="store the sink and recent window in this dtype (default: compute)")
        p.add_argument("--attention", default="auto", choices=("auto", "xla", "pallas", "pallas_interpret"))
        p.add_argument("--mesh", help="devices as data=D,model=M,seq=S (default: all devices on data when "
                                      "the batch divides over them, else one device)")
        p.add_argument("--coordinator", help="multi-host: coordinator host:port, with --num-processes and "
                                             "--process-id (`auto` on TPU pods and SLURM)")
        p.add_argument("--num-processes", type=_positive_int)
        p.add_argument("--process-id", type=_nonneg_int)


def _prefill_chunk(p: argparse.ArgumentParser, default: int | None, what: str, protocol: bool = True) -> None:
    shown = "the library default, see the README" if default is None else default
    p.add_argument("--prefill-chunk", type=_nonneg_int, default=default,
                   help=f"{what} in calls of N tokens; 0 = one shot (default: {shown})")
    if protocol:
        from kvq_jax.staging import DEFAULT_PROTOCOL, PROTOCOLS

        p.add_argument("--prefill-protocol", choices=PROTOCOLS, default=DEFAULT_PROTOCOL,
                       help="what the chunks of a prompt attend to: exact = the earlier chunks at full precision, "
                            "as one shot does (same numbers; holds the prompt's K/V at full precision until "
                            "it is in); cached = the quantized cache, as decoding does (least memory)")


def _sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=_finite_float, default=0.0)
    p.add_argument("--top-k", type=_nonneg_int, default=0, help="0 = off; clamped to the vocabulary")
    p.add_argument("--top-p", type=_finite_float, default=1.0)
    p.add_argument("--seed", type=_seed, default=0)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="kvq-jax", description="Mixed-precision quantized KV caches for JAX LLM inference.")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="answer a prompt")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=_positive_int, default=128)
    _sampling(g)
    g.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, no chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    _prefill_chunk(g, None, "feed the prompt")
    _common(g)

    c = sub.add_parser("chat", help="multi-turn chat over stdin/stdout; the cache carries the history",
                       description="Each stdin line is a user turn; replies stream to stdout. Commands: "
                                   "/reset (forget the history), /stats (one JSON line). EOF ends the chat.")
    c.add_argument("--max-new-tokens", type=_positive_int, default=256)
    c.add_argument("--capacity", type=_positive_int, help="cache positions (default: the model's context)")
    c.add_argument("--system", help="system prompt (default: the chat template's own)")
    _sampling(c)
    _prefill_chunk(c, 64, "feed each turn", protocol=False)
    _common(c)

    e = sub.add_parser("eval", help="perplexity (and KL / top-1 vs the fp cache with --kv), or needle retrieval")
    e.add_argument("--task", default="ppl", choices=("ppl", "needle"),
                   help="ppl: perplexity over --text windows; needle: passkey retrieval over --lengths x "
                        "--depths, fp and --kv side by side")
    e.add_argument("--text", help="UTF-8 text file (ppl: scored; needle: the filler, default built in)")
    e.add_argument("--context", type=_positive_int, default=512)
    e.add_argument("--windows", type=_positive_int, default=6)
    e.add_argument("--prefill", type=_positive_int, default=64,
                   help="tokens of each window prefilled; the rest are fed one at a time")
    _prefill_chunk(e, None, "feed the --prefill tokens (needle: the haystack)")
    e.add_argument("--lengths", default="1024,2048,4096", help="needle: prompt lengths in tokens, comma separated")
    e.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle: depths in [0, 1], comma separated")
    e.add_argument("--trials", type=_positive_int, default=2, help="needle: cases per (length, depth)")
    e.add_argument("--batch", type=_positive_int, default=8, help="needle: cases run together")
    e.add_argument("--seed", type=_seed, default=0, help="needle: keys and filler offsets")
    e.add_argument("--heatmap", help="needle: write the accuracy heatmap (PNG) here")
    e.add_argument("--force", action="store_true", help="replace an existing --heatmap file")
    e.add_argument("--json", action="store_true")
    e.add_argument("--no-progress", action="store_true")
    _common(e)

    b = sub.add_parser("bench", help="prefill and decode throughput, cache bytes")
    b.add_argument("--batch", type=_positive_int, default=1)
    b.add_argument("--context", type=_positive_int, default=512)
    b.add_argument("--new-tokens", type=_positive_int, default=64)
    b.add_argument("--text", help="take the context from this text file instead of random tokens")
    b.add_argument("--seed", type=_seed, default=0)
    b.add_argument("--json", action="store_true")
    _prefill_chunk(b, None, "prefill the context")
    _common(b)

    a = sub.add_parser("analyze", help="K/V norm analysis and budgeted bit allocation → plan JSON")
    a.add_argument("--calib", help="calibration text file (not needed when --stats names existing statistics)")
    a.add_argument("--windows", type=_positive_int, default=8)
    a.add_argument("--context", type=_positive_int, default=512)
    a.add_argument("--batch", type=_positive_int, default=2,
                   help="calibration windows per forward/backward pass (memory grows with batch x context)")
    a.add_argument("--budget", type=_finite_float, default=3.0, help="average data bits per K/V element")
    a.add_argument("--bits", default="1,1.58,2,3,4,6,8", help="allowed widths, comma separated")
    a.add_argument("--method", default="fisher", choices=("fisher", "sensitivity", "norm", "weight-norm"),
                   help="fisher: loss-weighted errors (default); sensitivity: attention-output errors; "
                        "norm / weight-norm: the reference c*2^(-2b) rule")
    a.add_argument("--norm", default="fro", choices=("fro", "spec"), help="norm used by --method norm")
    a.add_argument("--count-overhead", action="store_true", help="count scale/zero bits in the budget")
    a.add_argument("--target-context", type=_positive_int,
                   help="read --budget per element the cache holds at this context (a memory budget: "
                        "sliding-window layers hold only their window); default: per layer element")
    a.add_argument("--score-from", type=_nonneg_int,
                   help="fisher: score only calibration positions >= this, i.e. decoding after a prompt of "
                        "that many tokens (default 0: every position)")
    a.add_argument("--stats", help="reuse (or write) the statistics file (.npz)")
    a.add_argument("--out", required=True, help="plan JSON to write")
    a.add_argument("--report", help="directory for figures and report.md")
    a.add_argument("--force", action="store_true", help="replace an existing --out file")
    a.add_argument("--no-progress", action="store_true")
    _common(a, kv=False)
    # The cache geometry: defaults are the cache's (channel, token, 64, 64, 128, 4); with --stats, the
    # geometry the statistics were measured under.
    a.add_argument("--key-axis", choices=("token", "channel"))
    a.add_argument("--value-axis", choices=("token", "channel"))
    a.add_argument("--group-k", type=_positive_int, help="tokens per key scale (per-channel keys); default 64")
    a.add_argument("--group-v", type=_positive_int, help="channels per value scale (per-token values); default 64")
    a.add_argument("--residual", type=_nonneg_int, help="the plan's full-precision window; default 128")
    a.add_argument("--sink", type=_nonneg_int, help="the plan's full-precision first tokens; default 4")
    a.add_argument("--rotate", default="none", type=lambda t: t if t == "auto" else _rotation(t),
                   help="the plan's rotation (see eval --help); auto: keys' and values' rotations per layer, "
                        "chosen with the widths (--method fisher), and whether prerope keys and Hadamard "
                        "values take a learned codebook")
    a.add_argument("--no-codebooks", action="store_true",
                   help="with --rotate auto: uniform codes only (no learned key or value codebooks)")
    return ap


def _kv(args: argparse.Namespace, n_layers: int):
    from kvq_jax.plan import parse_kv

    for name in ("residual", "sink"):
        v = getattr(args, name)
        if v is not None and v < 0:
            raise KvqError(f"--{name} must be >= 0, got {v}")
    return parse_kv(args.kv, n_layers, key_axis=args.key_axis, value_axis=args.value_axis,
                    group_k=args.group_k, group_v=args.group_v, residual=args.residual, sink=args.sink,
                    rotate=args.rotate, window_dtype=args.window_dtype)


def _read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise KvqError(f"text file not found: {path}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KvqError(f"text file is not UTF-8: {path}") from None


def _load(args: argparse.Namespace):
    from kvq_jax.loading import load

    return load(args.model, dtype=args.dtype)


def _print_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, indent=None, sort_keys=False))


def _utf8(text: str, what: str) -> str:
    """Text from argv or stdin that Python decoded with surrogate escapes: one line if it is not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise KvqError(f"{what} is not valid UTF-8 text") from None
    return text


def _sampler(args: argparse.Namespace):
    from kvq_jax.sampling import SamplerConfig

    return SamplerConfig(args.temperature, args.top_k, args.top_p)


def _write(s: str) -> None:
    sys.stdout.write(s)
    sys.stdout.flush()


def _mesh(args: argparse.Namespace, batch: int):
    """The mesh `--mesh` asks for, checked against the devices; the default when it is not given."""
    import jax

    from kvq_jax import sharding

    if args.mesh is None:
        return sharding.default_mesh(batch) if len(jax.devices()) > 1 else None
    return sharding.make_mesh(**sharding.parse_mesh(args.mesh))


def cmd_generate(args: argparse.Namespace) -> int:
    from kvq_jax.chat import TextStream
    from kvq_jax.decode import generate
    from kvq_jax.evaluate import kv_name

    if not _utf8(args.prompt, "--prompt").strip():
        raise KvqError("empty prompt: give --prompt some text")
    sampler = _sampler(args)
    model, tok = _load(args)
    kv = _kv(args, model.cfg.n_layers)
    chat = not args.no_chat and tok.has_chat_format
    if not args.no_chat and not chat:
        print("kvq-jax: this model has no chat template (a base model): the prompt is completed as plain text",
              file=sys.stderr)
    # A chat template writes its own BOS; raw text gets one where the model's files ask for it.
    ids = tok.encode(tok.chat_prompt(args.prompt), add_bos=False) if chat else tok.encode(args.prompt, add_bos=tok.uses_bos)
    stream = None if args.json else TextStream(tok, _write)
    res = generate(model, [ids], max_new_tokens=args.max_new_tokens, kv=kv, sampler=sampler,
                   seed=args.seed, attention_impl=args.attention, stream=stream,
                   prefill_chunk=args.prefill_chunk, prefill_protocol=args.prefill_protocol, mesh=_mesh(args, 1))
    reply = tok.decode(res.tokens[0])
    if args.json:
        _print_json({"model": model.cfg.name, "kv": kv_name(kv), "prompt": args.prompt, "reply": reply,
                     "new_tokens": len(res.tokens[0]), "stopped_at_eos": res.stopped_at_eos[0]})
    else:
        stream.finish(reply + "\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from kvq_jax.chat import ChatSession

    if args.system is not None:
        _utf8(args.system, "--system")
    model, tok = _load(args)
    if not tok.has_chat_format:
        raise KvqError("this model has no chat template (a base model): use `kvq-jax generate --no-chat`")
    session = ChatSession(model, tok, kv=_kv(args, model.cfg.n_layers), capacity=args.capacity,
                          system=args.system, max_new_tokens=args.max_new_tokens, sampler=_sampler(args),
                          seed=args.seed, attention_impl=args.attention, prefill_chunk=args.prefill_chunk,
                          mesh=_mesh(args, 1))
    tty = sys.stdin.isatty()
    for number, raw in enumerate(iter(sys.stdin.buffer.readline, b""), start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            print(f"kvq-jax: line {number} is not valid UTF-8 text; skipped", file=sys.stderr)
            continue
        if not line:
            continue
        if line == "/reset":
            session.reset()
            print("kvq-jax: history cleared", file=sys.stderr)
        elif line == "/stats":
            _print_json(session.stats())
        else:
            try:
                session.send(line, stream=_write)
                _write("\n")
            except KvqError as e:  # a turn that does not fit: say so, keep the session
                print(f"kvq-jax: {e}", file=sys.stderr)
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
    return 0


def _csv(text: str, kind: type, what: str) -> list:
    try:
        out = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KvqError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not out or any(not math.isfinite(x) for x in out):
        raise KvqError(f"{what} must be comma-separated numbers, got {text!r}")
    return out


def cmd_needle(args: argparse.Namespace) -> int:
    from kvq_jax.needle import heatmap, needle
    from kvq_jax.plan import DenseKV

    lengths = _csv(args.lengths, int, "--lengths")
    depths = _csv(args.depths, float, "--depths")
    if any(n < 1 for n in lengths) or any(not 0 <= d <= 1 for d in depths):
        raise KvqError("--lengths must be positive and --depths in [0, 1]")
    if args.heatmap and Path(args.heatmap).exists() and not args.force:
        raise KvqError(f"{args.heatmap} exists; pass --force to replace it")
    if args.mesh is not None:
        raise KvqError("--task needle runs on one device (no --mesh yet)")
    filler = _read_text(args.text) if args.text else None
    model, tok = _load(args)
    kv = _kv(args, model.cfg.n_layers)
    caches = [("fp", DenseKV("float32"))] + ([] if kv == DenseKV("float32") else [(args.kv, kv)])
    runs = []
    for label, plan in caches:
        r = needle(model, tok, lengths=lengths, depths=depths, trials=args.trials, kv=plan, filler_text=filler,
                   seed=args.seed, batch=args.batch, prefill_chunk=args.prefill_chunk,
                   prefill_protocol=args.prefill_protocol, attention_impl=args.attention, progress=not args.no_progress)
        runs.append({"label": label, **r})
    if args.heatmap:
        heatmap(runs, args.heatmap)
    if args.json:
        _print_json({"task": "needle", "runs": runs})
    else:
        for r in runs:
            print(f"{r['label']:>10}: accuracy {r['accuracy']:.1%} over {len(r['cells']) * r['trials']} cases")
            for c in r["cells"]:
                print(f"{'':>12}length {c['length']:>6}  depth {c['depth']:.2f}: {c['correct']}/{c['trials']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from kvq_jax.evaluate import evaluate

    if args.task == "needle":
        return cmd_needle(args)
    if not args.text:
        raise KvqError("eval --task ppl needs --text FILE")
    text = _read_text(args.text)
    model, tok = _load(args)
    kv = _kv(args, model.cfg.n_layers)
    res = evaluate(model, tok, text, context=args.context, windows=args.windows, kv=kv,
                   prefill=args.prefill, attention_impl=args.attention, progress=not args.no_progress,
                   prefill_chunk=args.prefill_chunk, prefill_protocol=args.prefill_protocol,
                   mesh=_mesh(args, args.windows))
    if args.json:
        _print_json(res)
    else:
        for k, v in res.items():
            print(f"{k:>22}: {v}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import numpy as np

    from kvq_jax.bench import bench

    model, tok = _load(args)
    kv = _kv(args, model.cfg.n_layers)
    tokens = None
    if args.text:
        ids = tok.encode(_read_text(args.text))
        need = args.batch * args.context
        if len(ids) < need:
            raise KvqError(f"--text has {len(ids)} tokens, the benchmark needs {need}")
        tokens = np.asarray(ids[:need], np.int32).reshape(args.batch, args.context)
    res = bench(model, batch=args.batch, context=args.context, new_tokens=args.new_tokens, kv=kv,
                attention_impl=args.attention, seed=args.seed, tokens=tokens, prefill_chunk=args.prefill_chunk,
                prefill_protocol=args.prefill_protocol, mesh=_mesh(args, args.batch))
    if args.json:
        _print_json(res)
    else:
        for k, v in res.items():
            print(f"{k:>22}: {v}")
    return 0


def _parse_bits(text: str) -> tuple[float, ...]:
    try:
        bits = tuple(float(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise KvqError(f"bad --bits {text!r}: expected comma-separated widths like 1,1.58,2,3,4") from None
    if not bits:
        raise KvqError("--bits is empty")
    return bits


def cmd_analyze(args: argparse.Namespace) -> int:
    from kvq_jax.allocate import allocate_detailed, layer_tokens_at
    from kvq_jax.stats import KVStats

    out = Path(args.out)
    if out.exists() and not args.force:
        raise KvqError(f"{out} exists; pass --force to replace it")
    bits = _parse_bits(args.bits)
    stats_path = Path(args.stats) if args.stats else None
    if args.calib is None and (stats_path is None or not stats_path.exists()):
        raise KvqError("analyze needs --calib (a calibration text), or --stats naming existing statistics"
                       + (f" ({stats_path} does not exist)" if stats_path is not None else ""))
    model, tok = _load(args)
    if stats_path is not None and stats_path.exists():
        stats = KVStats.load(stats_path)
        stats.check_reuse(stats_path, model.cfg.name, model.cfg.n_layers, args.score_from)
    else:
        from kvq_jax.analysis import analyze
        from kvq_jax.evaluate import text_windows

        windows = text_windows(tok, _read_text(args.calib), args.context, args.windows)
        geometry = {k: getattr(args, k) for k in ("key_axis", "value_axis", "group_k", "group_v", "residual", "sink")
                    if getattr(args, k) is not None}  # the rest: the analysis's (the cache's) defaults
        stats = analyze(model, windows, bits=bits, progress=not args.no_progress,
                        meta={"calib_file": str(args.calib)}, batch=args.batch, **geometry,
                        score_from=args.score_from or 0,
                        # Saved statistics serve any later plan: they get every rotation's errors.
                        rotations=None if args.rotate == "auto" or stats_path is not None
                        else tuple(set(split_rotation(args.rotate)) - {"none"}))
        if stats_path is not None:
            stats.save(stats_path)
    alloc = allocate_detailed(
        stats, args.budget, method=args.method, bits=bits, norm=args.norm,
        count_overhead=args.count_overhead, key_axis=args.key_axis, value_axis=args.value_axis,
        group_k=args.group_k, group_v=args.group_v, residual=args.residual, sink=args.sink,
        rotate=args.rotate, model_name=model.cfg.name, key_codebooks=False if args.no_codebooks else None,
        value_codebooks=False if args.no_codebooks else None,
        layer_tokens=None if args.target_context is None else layer_tokens_at(model.cfg, args.target_context))
    alloc.plan.save(out)
    summary = {"model": model.cfg.name, "method": args.method, "budget": args.budget, "out": str(out),
               "target_context": args.target_context, "spent": float(alloc.spent),
               "element_bits": float(alloc.plan_element_bits), "k_bits": [float(b) for b in alloc.k_bits],
               "v_bits": [float(b) for b in alloc.v_bits]}
    if args.report:
        from kvq_jax.report import norm_summary, write_report

        summary["report"] = str(write_report(stats, args.report, plans={args.method: alloc.plan}))
        summary["summary"] = norm_summary(stats, "fro")
    _print_json(summary)
    return 0


def _enable_compile_cache() -> None:
    """Persistent XLA cache so a second CLI run skips compilation (opt out: KVQ_JAX_NO_XLA_CACHE=1)."""
    if os.environ.get("KVQ_JAX_NO_XLA_CACHE"):
        return
    import jax

    root = Path(os.environ.get("KVQ_JAX_CACHE", Path.home() / ".cache" / "kvq_jax")) / "xla"
    try:
        root.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(root))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "coordinator", None) or getattr(args, "num_processes", None) or \
                getattr(args, "process_id", None) is not None:
            from kvq_jax.sharding import initialize

            initialize(args.coordinator, args.num_processes, args.process_id)  # before any device use
            import jax

            if jax.process_index() != 0:  # every host runs the command; process 0 speaks for all
                sys.stdout = open(os.devnull, "w")
        _enable_compile_cache()
        return {"generate": cmd_generate, "chat": cmd_chat, "eval": cmd_eval, "bench": cmd_bench,
                "analyze": cmd_analyze}[args.cmd](args)
    except KvqError as e:
        print(f"kvq-jax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvq-jax: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("kvq-jax: error: out of memory (try a smaller --batch or --context)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
