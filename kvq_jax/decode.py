"""Prefill + jit-compiled decoding (`lax.while_loop`) that stops per row at EOS or max tokens."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvq_jax.cache import KVCache, init_cache
from kvq_jax.errors import KvqError
from kvq_jax.model import Transformer
from kvq_jax.plan import DenseKV, KVPlan
from kvq_jax.sampling import SamplerConfig, sample

Array = jax.Array
StreamFn = Callable[[np.ndarray, np.ndarray], None]  # (step tokens [B], still-running mask [B])


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    tokens: list[list[int]]  # generated ids per row (EOS excluded)
    stopped_at_eos: list[bool]
    cache: KVCache


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "sampler", "eos_ids", "impl", "stream"),
                   donate_argnames=("cache",))
def _generate(graphdef, state, tokens: Array, n_prompt: Array, cache: KVCache, key: Array, *,
              max_new: int, sampler: SamplerConfig, eos_ids: tuple[int, ...], impl: str,
              stream: StreamFn | None):
    """tokens `[B, T]` right-padded, n_prompt `[B]`. Returns generated `[B, max_new]` (-1 = none)."""
    model = nnx.merge(graphdef, state)
    b = tokens.shape[0]
    logits, cache = model(tokens, cache, n_prompt, attention_impl=impl, last_only=True)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def pick(logits: Array, key: Array, step: Array, running: Array):
        key, sub = jax.random.split(key)
        tok = sample(logits, sub, sampler)
        is_eos = jnp.any(tok[:, None] == eos[None, :], axis=-1)
        emit = running & ~is_eos
        if stream is not None:
            jax.debug.callback(stream, tok, emit, ordered=True)
        return tok, emit, key

    out = jnp.full((b, max_new), -1, jnp.int32)
    tok, emit, key = pick(logits, key, jnp.int32(0), jnp.ones((b,), bool))
    out = out.at[:, 0].set(jnp.where(emit, tok, -1))

    def cond(carry):
        step, _, running, _, _, _ = carry
        return (step < max_new) & jnp.any(running)

    def body(carry):
        step, tok, running, cache, key, out = carry
        logits, cache = model(tok[:, None], cache, attention_impl=impl, last_only=True)
        tok, emit, key = pick(logits, key, step, running)
        out = jax.lax.dynamic_update_slice_in_dim(out, jnp.where(emit, tok, -1)[:, None], step, axis=1)
        return step + 1, tok, emit, cache, key, out

    carry = (jnp.int32(1), tok, emit, cache, key, out)
    _, _, running, cache, _, out = jax.lax.while_loop(cond, body, carry)
    return out, running, cache


def generate(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
             kv: KVPlan | DenseKV = DenseKV("float32"), sampler: SamplerConfig = SamplerConfig(),
             seed: int = 0, attention_impl: str = "auto", stream: StreamFn | None = None,
             capacity: int | None = None) -> GenerationResult:
    """Generates up to `max_new_tokens` for each prompt (a batch of token-id lists, ragged).

    `stream(tokens [B], emitted [B])` is called from inside the compiled loop at every step.
    """
    from kvq_jax.attention import resolve_impl

    cfg = model.cfg
    if not prompts or any(len(p) == 0 for p in prompts):
        raise KvqError("empty prompt: give at least one token")
    if max_new_tokens < 1:
        raise KvqError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= seed <= 2**32 - 1:
        raise KvqError(f"--seed must be in [0, {2**32 - 1}], got {seed}")
    longest = max(len(p) for p in prompts)
    need = longest + max_new_tokens
    if capacity is None:
        capacity = min(round_up(need, 256), max(need, cfg.max_seq_len))
    if need > capacity:
        raise KvqError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                       f"cache capacity ({capacity} positions)")
    if need > cfg.max_seq_len:
        raise KvqError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                       f"model's context of {cfg.max_seq_len} tokens")
    t = min(round_up(longest, 64), capacity)
    toks = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        toks[i, : len(p)] = p
    n_prompt = jnp.asarray([len(p) for p in prompts], jnp.int32)
    dtype = model.embed.get_value().dtype
    cache = init_cache(cfg, kv, len(prompts), capacity, dtype)
    graphdef, state = nnx.split(model)
    out, _, cache = _generate(
        graphdef, state, jnp.asarray(toks), n_prompt, cache, jax.random.key(seed),
        max_new=max_new_tokens, sampler=sampler, eos_ids=tuple(cfg.eos_ids),
        impl=resolve_impl(attention_impl), stream=stream)
    out = np.asarray(out)
    tokens, at_eos = [], []
    for row in out:
        stop = np.nonzero(row < 0)[0]
        n = int(stop[0]) if len(stop) else len(row)
        tokens.append(row[:n].tolist())
        at_eos.append(n < len(row))
    return GenerationResult(tokens, at_eos, cache)
