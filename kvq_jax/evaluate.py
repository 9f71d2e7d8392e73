"""Perplexity, KL and top-1 agreement of a (quantized) cache against the fp cache.

Protocol: the text is tokenized without BOS and cut into non-overlapping windows of `context` tokens;
the first `windows` are scored. With a cache, the first `prefill` tokens of each window are prefilled
and the rest are fed one at a time through the cache (teacher forcing); every token after the first
of each window is scored.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from kvq_jax.cache import init_cache
from kvq_jax.errors import KvqError
from kvq_jax.model import Transformer
from kvq_jax.plan import DenseKV, KVPlan
from kvq_jax.tokenizer import Tokenizer

Array = jax.Array


def text_windows(tok: Tokenizer, text: str, context: int, windows: int) -> np.ndarray:
    """`[W, context]` int32: the first `windows` non-overlapping windows of the text (no BOS)."""
    if context < 2:
        raise KvqError(f"--context must be >= 2, got {context}")
    if windows < 1:
        raise KvqError(f"--windows must be >= 1, got {windows}")
    ids = np.asarray(tok.encode(text, add_bos=False), np.int32)
    n = min(windows, len(ids) // context)
    if n == 0:
        raise KvqError(f"the text has {len(ids)} tokens, fewer than one window of {context}")
    return ids[: n * context].reshape(n, context)


def _logprobs(logits: Array) -> Array:
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def _token_stats(lp: Array, lp_ref: Array, target: Array) -> tuple[Array, Array, Array, Array]:
    """Per position: NLL, reference NLL, KL(ref || this), top-1 agreement."""
    nll = -jnp.take_along_axis(lp, target[..., None], axis=-1)[..., 0]
    nll_ref = -jnp.take_along_axis(lp_ref, target[..., None], axis=-1)[..., 0]
    kl = jnp.sum(jnp.exp(lp_ref) * (lp_ref - lp), axis=-1)
    top1 = (jnp.argmax(lp, -1) == jnp.argmax(lp_ref, -1)).astype(jnp.float32)
    return nll, nll_ref, kl, top1


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _full_forward_nll(graphdef, state, tokens: Array, cache) -> Array:
    """Sum of NLL of tokens 1.. of every window, with one full-precision forward pass."""
    model = nnx.merge(graphdef, state)
    logits, _ = model(tokens, cache)
    lp = _logprobs(logits[:, :-1])
    return -jnp.sum(jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1))


@functools.partial(jax.jit, static_argnames=("graphdef", "prefill", "impl", "progress"))
def _teacher_forced(graphdef, state, tokens: Array, cache, ref_cache, *, prefill: int, impl: str,
                    progress: Callable[[Array], None] | None):
    """Runs the cache and the fp reference cache side by side; returns summed statistics."""
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens[:, :prefill], cache, attention_impl=impl)
    ref_logits, ref_cache = model(tokens[:, :prefill], ref_cache)
    sums = jnp.stack([jnp.sum(x) for x in _token_stats(
        _logprobs(logits), _logprobs(ref_logits), tokens[:, 1: prefill + 1])])
    pre_kl = sums[2]

    def step(carry, t):
        cache, ref_cache, acc = carry
        x = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)
        target = jax.lax.dynamic_slice_in_dim(tokens, t + 1, 1, axis=1)[:, 0]
        lg, cache = model(x, cache, attention_impl=impl, last_only=True)
        rlg, ref_cache = model(x, ref_cache, last_only=True)
        s = _token_stats(_logprobs(lg), _logprobs(rlg), target)
        if progress is not None:
            jax.debug.callback(progress, t, ordered=True)
        return (cache, ref_cache, acc + jnp.stack([jnp.sum(v) for v in s])), None

    steps = jnp.arange(prefill, tokens.shape[1] - 1)
    (cache, _, sums), _ = jax.lax.scan(step, (cache, ref_cache, sums), steps)
    return sums, pre_kl, cache


def kv_name(kv: KVPlan | DenseKV) -> str:
    if isinstance(kv, DenseKV):
        return "fp" if kv.dtype == "float32" else "bf16"
    return kv.describe()


def bf16_bytes(model: Transformer, batch: int, tokens: int) -> int:
    """Bytes of K and V for `tokens` positions stored dense in bf16."""
    c = model.cfg
    return 2 * c.n_layers * batch * c.n_kv_heads * c.head_dim * tokens * 2


def evaluate(model: Transformer, tok: Tokenizer, text: str, *, context: int = 512, windows: int = 6,
             kv: KVPlan | DenseKV = DenseKV("float32"), prefill: int = 64, attention_impl: str = "auto",
             progress: bool = True, model_name: str | None = None) -> dict[str, Any]:
    """Scores the text; returns the JSON-ready result dict."""
    from kvq_jax.attention import resolve_impl

    impl = resolve_impl(attention_impl)
    if context > model.cfg.max_seq_len:
        raise KvqError(f"--context {context} exceeds the model's context of {model.cfg.max_seq_len} tokens")
    data = text_windows(tok, text, context, windows)
    n_win = data.shape[0]
    scored = n_win * (context - 1)
    tokens = jnp.asarray(data)
    graphdef, state = nnx.split(model)
    cfg = model.cfg
    result: dict[str, Any] = {
        "model": model_name or cfg.name, "kv": kv_name(kv), "windows": n_win, "context": context,
        "tokens_scored": scored, "attention": impl,
    }
    dtype = model.embed.get_value().dtype
    if isinstance(kv, DenseKV) and kv.dtype == "float32":
        cache = init_cache(cfg, kv, n_win, context, dtype)
        fn = _full_forward_nll.lower(graphdef, state, tokens, cache).compile()
        t0 = time.perf_counter()
        nll = float(fn(state, tokens, cache))
        dt = time.perf_counter() - t0
        ppl = math.exp(nll / scored)
        result.update(ppl=ppl, ppl_fp=ppl, kl_vs_fp=0.0, top1_agreement=1.0,
                      kv_cache_bytes=cache.nbytes(), kv_cache_bytes_bf16=bf16_bytes(model, n_win, context),
                      effective_bits=cache.nbytes() * 8 / (2 * cfg.n_layers * n_win * cfg.n_kv_heads * cfg.head_dim * context),
                      tokens_per_s=scored / dt)
        return result
    if not 1 <= prefill < context:
        raise KvqError(f"--prefill must be in [1, {context - 1}], got {prefill}")
    cache = init_cache(cfg, kv, n_win, context, dtype)
    ref = init_cache(cfg, DenseKV("float32"), n_win, context, dtype)
    n_steps = context - 1 - prefill
    bar = tqdm(total=n_steps, desc=f"eval {kv_name(kv)}", file=sys.stderr, disable=not progress,
               unit="tok", leave=False)
    cb = (lambda t: bar.update(1)) if progress else None
    fn = _teacher_forced.lower(graphdef, state, tokens, cache, ref, prefill=prefill, impl=impl,
                               progress=cb).compile()
    t0 = time.perf_counter()
    sums, pre_kl, cache = fn(state, tokens, cache, ref)
    sums = np.asarray(jax.block_until_ready(sums))
    dt = time.perf_counter() - t0
    bar.close()
    nll, nll_ref, kl, top1 = (float(x) for x in sums)
    dec = n_win * n_steps
    elems = 2 * cfg.n_layers * n_win * cfg.n_kv_heads * cfg.head_dim * context
    result.update(
        prefill=prefill, ppl=math.exp(nll / scored), ppl_fp=math.exp(nll_ref / scored),
        kl_vs_fp=kl / scored, kl_vs_fp_decoded=(kl - float(pre_kl)) / max(dec, 1),
        top1_agreement=top1 / scored, kv_cache_bytes=cache.nbytes(),
        kv_cache_bytes_bf16=bf16_bytes(model, n_win, context), effective_bits=cache.nbytes() * 8 / elems,
        tokens_per_s=scored / dt,
    )
    if not all(math.isfinite(result[k]) for k in ("ppl", "ppl_fp", "kl_vs_fp")):
        raise KvqError("evaluation produced a non-finite result (see --kv settings)")
    return result
