"""Passkey ("needle") retrieval at long context: can the model read one fact back out of the cache?

Protocol. Each case is a haystack prompt of `length` tokens: an instruction, filler sentences (built
in, or consecutive sentences of a text file from a seeded offset), and at `depth` (0 = right after
the instruction, 1 = at the end) the needle " The pass key is 12345. Remember it. The pass key is
12345." The haystack is prefilled into the cache (one shot or in chunks); then the question " What is
the pass key? The pass key is" is fed as a continuation of that cache, so it reads the needle from
the stored (quantized) keys and values, not from a full-precision one-shot prompt, and the greedy
completion is checked: the first number in it must be the key. `length` counts every prompt token
(haystack + question). Keys, offsets and filler depend only on (seed, length, depth, trial).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from kvq_jax import staging
from kvq_jax.cache import init_cache
from kvq_jax.decode import check_prefill_chunk, generate, prefill, round_up
from kvq_jax.errors import KvqError
from kvq_jax.evaluate import bits_report, kv_name
from kvq_jax.model import Transformer
from kvq_jax.plan import DenseKV, KVPlan
from kvq_jax.tokenizer import Tokenizer

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.")
BUILTIN_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again.")
NEEDLE = " The pass key is {key}. Remember it. The pass key is {key}."
QUESTION = " What is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class NeedleCase:
    haystack: list[int]  # prompt tokens before the question (BOS, instruction, filler, needle)
    question: list[int]
    key: str
    depth: float  # the depth asked for
    needle_at: float  # where the needle's first token landed, as a fraction of the haystack


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]


class Filler:
    """Sentences to fill a haystack with, tokenized once each (a leading space, as in running text)."""

    def __init__(self, tok: Tokenizer, text: str | None = None) -> None:
        self.builtin = text is None
        self.sentences = _sentences(BUILTIN_FILLER if text is None else text)
        if not self.sentences:
            raise KvqError("the filler text has no sentences")
        self._tok = tok
        self._ids: dict[int, list[int]] = {}

    def ids(self, i: int) -> list[int]:
        i %= len(self.sentences)
        if i not in self._ids:
            self._ids[i] = self._tok.encode(" " + self.sentences[i])
        return self._ids[i]

    def take(self, start: int, budget: int) -> list[list[int]]:
        """Whole sentences from sentence `start` on (wrapping around) while they fit in `budget` tokens."""
        out, used, i = [], 0, start
        while True:
            s = self.ids(i)
            if used + len(s) > budget:
                return out
            out.append(s)
            used += len(s)
            i += 1


def make_case(tok: Tokenizer, filler: Filler, length: int, depth: float, seed: int, trial: int) -> NeedleCase:
    """One haystack of `length` prompt tokens with the needle at `depth` in [0, 1]."""
    if not 0.0 <= depth <= 1.0:
        raise KvqError(f"needle depths must be in [0, 1], got {depth}")
    rng = np.random.default_rng([seed, length, round(depth * 1000), trial])
    key = str(int(rng.integers(10_000, 100_000)))
    head = tok.encode(INTRO, add_bos=tok.uses_bos)
    needle = tok.encode(NEEDLE.format(key=key))
    question = tok.encode(QUESTION)
    budget = length - len(head) - len(needle) - len(question)
    if budget < 0:
        raise KvqError(f"needle length {length} is too short: the instruction, needle and question "
                       f"alone take {length - budget} tokens")
    start = 0 if filler.builtin else int(rng.integers(0, len(filler.sentences)))
    sents = filler.take(start, budget)
    total = sum(len(s) for s in sents)
    # The needle goes between sentences, after the first sentence boundary at or past depth x filler.
    split, seen = len(sents), 0
    for j, s in enumerate(sents):
        if seen >= depth * total:
            split = j
            break
        seen += len(s)
    before = [t for s in sents[:split] for t in s]
    after = [t for s in sents[split:] for t in s]
    haystack = head + before + needle + after
    return NeedleCase(haystack, question, key, depth, (len(head) + len(before)) / len(haystack))


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def needle(model: Transformer, tok: Tokenizer, *, lengths: Sequence[int], depths: Sequence[float],
           trials: int = 2, kv: KVPlan | DenseKV = DenseKV("float32"), filler_text: str | None = None,
           seed: int = 0, max_new_tokens: int = 12, batch: int = 8, prefill_chunk: int | None = None,
           attention_impl: str = "auto", progress: bool = True,
           prefill_protocol: str | None = None) -> dict[str, Any]:
    """Runs the grid `lengths` x `depths` x `trials` with cache `kv`; returns the JSON-ready result.

    `batch` cases go through the model together (one compiled prefill and decode per length).
    `stored_bits` per length: the cache's bytes x 8 over the K/V elements it holds at that length
    (codes, scales, zeros, sink, window and padding all counted; sliding-window layers hold their
    window only).
    """
    from kvq_jax.attention import resolve_impl

    cfg = model.cfg
    chunk = check_prefill_chunk(prefill_chunk)
    protocol = staging.check_protocol(prefill_protocol)
    impl = resolve_impl(attention_impl)
    if not lengths or not depths:
        raise KvqError("give at least one needle length and one depth")
    if trials < 1 or batch < 1 or max_new_tokens < 1:
        raise KvqError(f"--trials, --batch and max_new_tokens must be >= 1 (got {trials}, {batch}, {max_new_tokens})")
    for n in lengths:
        if n + max_new_tokens > cfg.max_seq_len:
            raise KvqError(f"needle length {n} + {max_new_tokens} answer tokens exceeds the model's "
                           f"context of {cfg.max_seq_len}")
    filler = Filler(tok, filler_text)
    dtype = model.embed.get_value().dtype
    cells, per_length = [], []
    bar = tqdm(total=len(lengths) * len(depths) * trials, desc=f"needle {kv_name(kv)}", unit="case",
               file=sys.stderr, disable=not progress, leave=False)
    for length in lengths:
        cases = [make_case(tok, filler, length, d, seed, t) for d in depths for t in range(trials)]
        answers, nbytes = [], 0
        for g in range(0, len(cases), batch):
            group = cases[g:g + batch]
            capacity = round_up(max(len(c.haystack) + len(c.question) for c in group) + max_new_tokens, 64)
            cache = init_cache(cfg, kv, len(group), min(capacity, cfg.max_seq_len), dtype)
            _, cache = prefill(model, [c.haystack for c in group], cache, chunk=chunk, attention_impl=impl, protocol=protocol)
            out = generate(model, [c.question for c in group], cache=cache, max_new_tokens=max_new_tokens,
                           attention_impl=impl)
            nbytes += out.cache.nbytes()
            answers += [tok.decode(t) for t in out.tokens]
            bar.update(len(group))
        ok = [first_number(a) == c.key for a, c in zip(answers, cases)]
        for i, d in enumerate(depths):
            sl = slice(i * trials, (i + 1) * trials)
            cells.append({"length": length, "depth": d, "trials": trials, "correct": int(sum(ok[sl])),
                          "accuracy": float(np.mean(ok[sl])),
                          "needle_at": float(np.mean([c.needle_at for c in cases[sl]])),
                          "answers": answers[sl], "keys": [c.key for c in cases[sl]]})
        per_length.append({"length": length, "kv_cache_bytes": nbytes,
                           **bits_report(cfg, kv, nbytes, len(cases), length)})
    bar.close()
    return {
        "task": "needle", "model": cfg.name, "kv": kv_name(kv), "attention": impl,
        "filler": "built-in" if filler.builtin else "text", "seed": seed, "trials": trials,
        "prefill_chunk": chunk, "prefill_protocol": protocol, "lengths": list(lengths), "depths": list(depths),
        "accuracy": float(np.mean([c["accuracy"] for c in cells])), "cells": cells, "per_length": per_length,
    }


def heatmap(runs: Sequence[dict[str, Any]], path: str | Path) -> None:
    """One panel per run (e.g. fp and the cache side by side): accuracy over depth x length."""
    from kvq_jax.report import figure

    fig = figure(3.2 * len(runs) + 0.8, 3.4)
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, run in zip(axes, runs):
        lengths, depths = run["lengths"], run["depths"]
        grid = np.zeros((len(depths), len(lengths)))
        for c in run["cells"]:
            grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["accuracy"]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (i, j), a in np.ndenumerate(grid):
            ax.text(j, i, f"{a:.0%}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{run.get('label', run['kv'])}\n{run['accuracy']:.0%} of {len(run['cells']) * run['trials']}",
                     fontsize=8)
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="accuracy")
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise KvqError(f"cannot write {path}: {e.strerror or e}") from None
