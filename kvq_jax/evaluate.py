"""Perplexity, KL and top-1 agreement of a (quantized) cache against the fp cache.

Protocol: the text is tokenized and cut into non-overlapping windows of `context` tokens, each starting
with BOS where the model's files ask for it (Gemma; not SmolLM2); the first `windows` are scored. With
a cache, the first `prefill` tokens of each window are prefilled (in one call, or in calls of
`prefill_chunk` tokens) and the rest are fed one at a time through the cache (teacher forcing); every
token after the first of each window is scored.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from kvq_jax import staging
from kvq_jax.cache import init_cache
from kvq_jax.config import ModelConfig
from kvq_jax.errors import KvqError
from kvq_jax.model import Transformer
from kvq_jax.plan import DenseKV, KVPlan
from kvq_jax.sharding import to_host
from kvq_jax.tokenizer import Tokenizer

Array = jax.Array


def text_windows(tok: Tokenizer, text: str, context: int, windows: int) -> np.ndarray:
    """`[W, context]` int32: the first `windows` non-overlapping windows of the text.

    For a model whose files ask for BOS (`tok.uses_bos`: Gemma) each window is BOS + context - 1 text
    tokens, as the model saw text in training; otherwise context text tokens (SmolLM2, Qwen2).
    """
    if context < 2:
        raise KvqError(f"--context must be >= 2, got {context}")
    if windows < 1:
        raise KvqError(f"--windows must be >= 1, got {windows}")
    ids = np.asarray(tok.encode(text, add_bos=False), np.int32)
    width = context - 1 if tok.uses_bos else context
    n = min(windows, len(ids) // width)
    if n == 0:
        raise KvqError(f"the text has {len(ids)} tokens, fewer than one window of {width}")
    out = ids[: n * width].reshape(n, width)
    return np.concatenate([np.full((n, 1), tok.bos_id, np.int32), out], axis=1) if tok.uses_bos else out


def _logprobs(logits: Array) -> Array:
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def _token_stats(lp: Array, lp_ref: Array, target: Array) -> tuple[Array, Array, Array, Array]:
    """Per position: NLL, reference NLL, KL(ref || this), top-1 agreement."""
    nll = -jnp.take_along_axis(lp, target[..., None], axis=-1)[..., 0]
    nll_ref = -jnp.take_along_axis(lp_ref, target[..., None], axis=-1)[..., 0]
    kl = jnp.sum(jnp.exp(lp_ref) * (lp_ref - lp), axis=-1)
    top1 = (jnp.argmax(lp, -1) == jnp.argmax(lp_ref, -1)).astype(jnp.float32)
    return nll, nll_ref, kl, top1


_SCORE_BLOCK = 256  # positions whose logits [B, block, V] exist at once


def _score(model: Transformer, h: Array, h_ref: Array, target: Array, valid: Array) -> Array:
    """Summed (NLL, reference NLL, KL, top-1) `[4]` over the valid positions of hidden states
    `[B, T, dim]`, the LM head applied `_SCORE_BLOCK` positions at a time (bounded memory)."""
    def block(a):
        hb, rb, tb, vb = a
        stats = _token_stats(_logprobs(model.logits(hb)), _logprobs(model.logits(rb)), tb)
        return jnp.stack([jnp.sum(jnp.where(vb, x, 0.0)) for x in stats])

    t = h.shape[1]
    if t <= _SCORE_BLOCK:
        return block((h, h_ref, target, valid))
    n = -(-t // _SCORE_BLOCK)
    pad = n * _SCORE_BLOCK - t

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(x.shape[0], n, _SCORE_BLOCK, *x.shape[2:]), 1, 0)

    return jnp.sum(jax.lax.map(block, tuple(split(x) for x in (h, h_ref, target, valid))), axis=0)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _full_forward_nll(graphdef, state, tokens: Array, cache) -> Array:
    """Sum of NLL of tokens 1.. of every window, with one full-precision forward pass."""
    model = nnx.merge(graphdef, state)
    h, _ = model.hidden(tokens, cache)
    valid = jnp.ones(tokens[:, 1:].shape, bool)
    return _score(model, h[:, :-1], h[:, :-1], tokens[:, 1:], valid)[0]


def _prefill_chunked(model: Transformer, tokens: Array, cache, chunk: int, impl: str, protocol: str):
    """Hidden states `[B, P, dim]` of tokens `[B, P]` fed into the empty `cache` in calls of `chunk`
    (0: one call), under the `staging` protocol."""
    b, p = tokens.shape
    if chunk == 0 or chunk >= p:
        return model.hidden(tokens, cache, attention_impl=impl)
    n = -(-p // chunk)
    staged = protocol == "exact" and staging.can_stage(cache, np.zeros(b))
    if staged:
        cache, rest = staging.stage(cache, n * chunk, model.embed.get_value().dtype)
    xs = jnp.pad(tokens, ((0, 0), (0, n * chunk - p))).reshape(b, n, chunk).transpose(1, 0, 2)

    def step(cache, a):
        x, i = a
        n_new = jnp.full((b,), jnp.clip(p - i * chunk, 0, chunk), jnp.int32)
        return model.hidden(x, cache, n_new, attention_impl=impl)[::-1]

    cache, h = jax.lax.scan(step, cache, (xs, jnp.arange(n)))  # h [n, B, chunk, dim]
    if staged:
        cache = staging.absorb(rest, cache, jnp.full((b,), p, jnp.int32))
    return h.transpose(1, 0, 2, 3).reshape(b, n * chunk, -1)[:, :p], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "prefill", "chunk", "impl", "progress", "protocol"))
def _teacher_forced(graphdef, state, tokens: Array, cache, *, prefill: int, chunk: int, impl: str,
                    progress: Callable[[Array], None] | None, protocol: str) -> tuple[Array, Any]:
    """Feeds windows `[B, T]` through the empty `cache`: the first `prefill` tokens as a prompt, the
    rest one at a time (teacher forcing). Returns the hidden states `[B, T - 1, dim]` that predict
    tokens 1.. and the filled cache."""
    model = nnx.merge(graphdef, state)
    h, cache = _prefill_chunked(model, tokens[:, :prefill], cache, chunk, impl, protocol)

    def step(cache, t):
        x = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)
        hs, cache = model.hidden(x, cache, attention_impl=impl)
        if progress is not None:
            jax.debug.callback(progress, t)  # a counter: order does not matter (and ordered effects are single-device)
        return cache, hs[:, 0]

    cache, hd = jax.lax.scan(step, cache, jnp.arange(prefill, tokens.shape[1] - 1))  # hd [steps, B, dim]
    return jnp.concatenate([h, jnp.moveaxis(hd, 0, 1).astype(h.dtype)], axis=1), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "prefill"))
def _scores(graphdef, state, h: Array, h_ref: Array, tokens: Array, *, prefill: int) -> tuple[Array, Array]:
    """Summed (NLL, reference NLL, KL, top-1) `[4]` over every scored token, and over the prompt's."""
    model = nnx.merge(graphdef, state)
    target = tokens[:, 1:]
    valid = jnp.ones(target.shape, bool)
    pre = _score(model, h[:, :prefill], h_ref[:, :prefill], target[:, :prefill], valid[:, :prefill])
    dec = _score(model, h[:, prefill:], h_ref[:, prefill:], target[:, prefill:], valid[:, prefill:])
    return pre + dec, pre


def kv_name(kv: KVPlan | DenseKV) -> str:
    if isinstance(kv, DenseKV):
        return "fp" if kv.dtype == "float32" else "bf16"
    return kv.describe()


def elements_held(cfg: ModelConfig, rows: int, tokens: int) -> int:
    """K and V elements a cache really holds for `rows` rows of `tokens` positions (a sliding-window
    layer holds its window only): the denominator of stored bits per cached element."""
    from kvq_jax.allocate import layer_tokens_at

    return 2 * rows * cfg.n_kv_heads * cfg.head_dim * sum(layer_tokens_at(cfg, tokens))


def bits_report(cfg: ModelConfig, kv: KVPlan | DenseKV, nbytes: int, rows: int, tokens: int) -> dict[str, float]:
    """`data_bits`: the plan's mean nominal width over its K and V tensors (32/16 for a dense fp32/bf16
    cache: the element budget); `data_bits_held`: the same widths averaged over the elements the cache
    holds at `tokens` (a sliding-window layer holds its window only: what a memory budget,
    `--target-context`, spends; equal to `data_bits` when every layer holds every position);
    `stored_bits`: the cache's real bytes (codes, scales, zeros, sink, window, padding; and a plan's
    codebooks) per element it holds; `effective_bits`: the same bytes per element of a cache where
    every layer held every position."""
    from kvq_jax.allocate import layer_tokens_at

    if isinstance(kv, DenseKV):
        data = held_data = 32.0 if kv.dtype == "float32" else 16.0
    else:
        data, held_data = kv.mean_data_bits(), kv.mean_data_bits(layer_tokens_at(cfg, tokens))
        nbytes += kv.codebook_bytes()
    full = 2 * cfg.n_layers * rows * cfg.n_kv_heads * cfg.head_dim * tokens
    return {"data_bits": data, "data_bits_held": held_data,
            "stored_bits": nbytes * 8 / elements_held(cfg, rows, tokens), "effective_bits": nbytes * 8 / full}


def bf16_bytes(model: Transformer, batch: int, tokens: int) -> int:
    """Bytes of K and V for `tokens` positions stored dense in bf16."""
    c = model.cfg
    return 2 * c.n_layers * batch * c.n_kv_heads * c.head_dim * tokens * 2


def evaluate(model: Transformer, tok: Tokenizer, text: str, *, context: int = 512, windows: int = 6,
             kv: KVPlan | DenseKV = DenseKV("float32"), prefill: int = 64, attention_impl: str = "auto",
             progress: bool = True, model_name: str | None = None,
             prefill_chunk: int | None = None, mesh: Any = None, rules: Any = None,
             prefill_protocol: str | None = None) -> dict[str, Any]:
    """Scores the text with one cache; returns the JSON-ready result dict.

    `mesh` (`kvq_jax.make_mesh`) spreads the windows (rows), heads and cache tokens over devices as
    `rules` say; the parameters are laid out on it in place.

    `prefill_chunk` feeds the `prefill` tokens in calls of that many tokens (0: one call; None: the
    library default). One shot attends to them at full precision; so do chunks under
    `prefill_protocol` "exact" (the default: a staged full-precision copy of the prompt's K/V, the
    numbers of one shot), while under "cached" chunks attend to the quantized earlier chunks, as
    decoding does.
    """
    return next(evaluate_plans(model, tok, text, [kv], context=context, windows=windows, prefill=prefill,
                               attention_impl=attention_impl, progress=progress, model_name=model_name,
                               prefill_chunk=prefill_chunk, mesh=mesh, rules=rules,
                               prefill_protocol=prefill_protocol))


def evaluate_plans(model: Transformer, tok: Tokenizer, text: str, kvs: Sequence[KVPlan | DenseKV], *,
                   context: int = 512, windows: int = 6, prefill: int = 64, attention_impl: str = "auto",
                   progress: bool = True, model_name: str | None = None, prefill_chunk: int | None = None,
                   mesh: Any = None, rules: Any = None, prefill_protocol: str | None = None) -> Iterator[dict[str, Any]]:
    """`evaluate` for each cache of `kvs` in turn, yielding each result as it is ready. The fp
    reference stream (the same windows through a float32 cache) is run once and shared."""
    from kvq_jax.attention import resolve_impl
    from kvq_jax.decode import check_prefill_chunk

    chunk = check_prefill_chunk(prefill_chunk)
    protocol = staging.check_protocol(prefill_protocol)
    impl = resolve_impl(attention_impl)
    if context > model.cfg.max_seq_len:
        raise KvqError(f"--context {context} exceeds the model's context of {model.cfg.max_seq_len} tokens")
    if any(not (isinstance(kv, DenseKV) and kv.dtype == "float32") for kv in kvs) and not 1 <= prefill < context:
        raise KvqError(f"--prefill must be in [1, {context - 1}], got {prefill}")
    data = text_windows(tok, text, context, windows)
    n_win = data.shape[0]
    scored = n_win * (context - 1)
    n_steps = context - 1 - prefill
    tokens = jnp.asarray(data)
    cfg = model.cfg
    if mesh is not None:
        from kvq_jax.sharding import prepare

        prepare(model, mesh, n_win, rules)
    graphdef, state = nnx.split(model)
    dtype = model.embed.get_value().dtype

    def run(kv: KVPlan | DenseKV, chunk: int, impl: str) -> tuple[Array, Any, float]:
        """The windows through a fresh `kv` cache: hidden states, the filled cache, seconds taken."""
        cache = init_cache(cfg, kv, n_win, context, dtype, mesh=mesh, rules=rules)
        bar = tqdm(total=n_steps, desc=f"eval {kv_name(kv)}", file=sys.stderr, disable=not progress,
                   unit="tok", leave=False)
        cb = (lambda t: bar.update(1)) if progress else None
        fn = _teacher_forced.lower(graphdef, state, tokens, cache, prefill=prefill, chunk=chunk,
                                   impl=impl, progress=cb, protocol=protocol).compile()
        t0 = time.perf_counter()
        h, cache = fn(state, tokens, cache)
        h = jax.block_until_ready(h)
        bar.close()
        return h, cache, time.perf_counter() - t0

    h_ref = None
    for kv in kvs:
        result: dict[str, Any] = {
            "model": model_name or cfg.name, "kv": kv_name(kv), "windows": n_win, "context": context,
            "tokens_scored": scored, "attention": impl, "bos": tok.uses_bos,
        }
        if mesh is not None:
            result["mesh"] = dict(mesh.shape)
        if isinstance(kv, DenseKV) and kv.dtype == "float32":
            cache = init_cache(cfg, kv, n_win, context, dtype, mesh=mesh, rules=rules)
            fn = _full_forward_nll.lower(graphdef, state, tokens, cache).compile()
            t0 = time.perf_counter()
            nll = float(to_host(fn(state, tokens, cache)))
            dt = time.perf_counter() - t0
            ppl = math.exp(nll / scored)
            result.update(ppl=ppl, ppl_fp=ppl, kl_vs_fp=0.0, top1_agreement=1.0,
                          kv_cache_bytes=cache.nbytes(), kv_cache_bytes_bf16=bf16_bytes(model, n_win, context),
                          **bits_report(cfg, kv, cache.nbytes(), n_win, context), tokens_per_s=scored / dt)
            yield result
            continue
        if h_ref is None:  # the fp cache's own stream: one-shot prefill, then the same steps
            h_ref, _, _ = run(DenseKV("float32"), 0, "xla")
        h, cache, dt = run(kv, chunk, impl)
        t0 = time.perf_counter()
        sums, pre = (to_host(x) for x in _scores(graphdef, state, h, h_ref, tokens, prefill=prefill))
        dt += time.perf_counter() - t0
        nll, nll_ref, kl, top1 = (float(x) for x in sums)
        # The tokens fed one at a time after the prefill: each reads a cache that holds the window so far
        # quantized (a one-shot prefill's own tokens attend to the prompt at full precision).
        d_nll, d_ref, d_kl, d_top1 = (float(x) - float(y) for x, y in zip(sums, pre))
        dec = max(n_win * n_steps, 1)
        result.update(
            prefill=prefill, prefill_chunk=chunk,
            prefill_protocol=protocol if 0 < chunk < prefill else "one shot",
            ppl=math.exp(nll / scored), ppl_fp=math.exp(nll_ref / scored),
            kl_vs_fp=kl / scored, tokens_decoded=n_win * n_steps, ppl_decoded=math.exp(d_nll / dec),
            ppl_fp_decoded=math.exp(d_ref / dec), kl_vs_fp_decoded=d_kl / dec, top1_decoded=d_top1 / dec,
            top1_agreement=top1 / scored, kv_cache_bytes=cache.nbytes(),
            kv_cache_bytes_bf16=bf16_bytes(model, n_win, context),
            **bits_report(cfg, kv, cache.nbytes(), n_win, context), tokens_per_s=scored / dt,
        )
        if not all(math.isfinite(result[k]) for k in ("ppl", "ppl_fp", "kl_vs_fp")):
            raise KvqError("evaluation produced a non-finite result (see --kv settings)")
        yield result
