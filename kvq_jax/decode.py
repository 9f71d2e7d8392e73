"""Prefill (one shot or chunked, onto any cache) + jit-compiled decoding (`lax.while_loop`) that stops
per row at EOS or max tokens; the returned cache holds prompt and reply, ready to be continued."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvq_jax import staging
from kvq_jax.cache import KVCache, check_room, init_cache
from kvq_jax.errors import KvqError
from kvq_jax.model import Transformer
from kvq_jax.plan import DenseKV, KVPlan
from kvq_jax.sampling import SamplerConfig, sample
from kvq_jax.sharding import to_host

Array = jax.Array
StreamFn = Callable[[np.ndarray, np.ndarray], None]  # (step tokens [B], still-running mask [B])


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    tokens: list[list[int]]  # generated ids per row (EOS excluded)
    stopped_at_eos: list[bool]
    cache: KVCache  # prompt + generated tokens of every row (not the EOS): continue it with `cache=`


DEFAULT_PREFILL_CHUNK = 0  # one shot: see the prefill table in the README


def check_prefill_chunk(chunk: int | None) -> int:
    """`prefill_chunk`: 0 (the whole prompt in one call), a positive number of tokens per call, or None
    for `DEFAULT_PREFILL_CHUNK`."""
    if chunk is None:
        return DEFAULT_PREFILL_CHUNK
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 0:
        raise KvqError(f"prefill_chunk must be 0 (one shot) or a positive number of tokens, got {chunk!r}")
    return int(chunk)


@functools.partial(jax.jit, static_argnames=("graphdef", "impl"), donate_argnames=("cache",))
def _prefill_step(graphdef, state, tokens: Array, n_new: Array, cache: KVCache, last: Array, *, impl: str):
    """One prompt chunk `[B, T]`; `last [B, V]` keeps each row's logits of its latest real token."""
    logits, cache = nnx.merge(graphdef, state)(tokens, cache, n_new, attention_impl=impl, last_only=True)
    return jnp.where((n_new > 0)[:, None], logits, last), cache


@functools.partial(jax.jit, donate_argnames=("rest",))
def _absorb(rest: KVCache, staged: KVCache, n: Array) -> KVCache:
    return staging.absorb(rest, staged, n)


def prefill(model: Transformer, prompts: Sequence[Sequence[int]], cache: KVCache, *, chunk: int | None = None,
            attention_impl: str = "auto", protocol: str | None = None) -> tuple[Array, KVCache]:
    """Appends each row's prompt to its cached history; returns the logits `[B, V]` of each row's last
    prompt token and the cache (the cache passed in is donated: use the returned one).

    `chunk` 0 feeds the prompts in one call (None: `DEFAULT_PREFILL_CHUNK`), padded to a multiple of
    64 tokens so similar lengths share a compiled step; else in calls of `chunk` tokens each (or one
    padded call if the longest prompt is shorter), all compiled once. Rows may be
    empty; a row whose prompts are all empty gets logits 0. `protocol` (`staging`): "exact" (default)
    lets the chunks of a prompt fed into an empty cache attend to each other at full precision, as one
    call does; "cached" lets them read the earlier chunks from the quantized cache, as decoding does
    (a continued cache always does: its history is stored quantized).
    """
    from kvq_jax.attention import resolve_impl

    chunk = check_prefill_chunk(chunk)
    protocol = staging.check_protocol(protocol)
    longest = max((len(p) for p in prompts), default=0)
    if len(prompts) != cache.batch:
        raise KvqError(f"{len(prompts)} prompts for a cache of {cache.batch} rows")
    width = round_up(max(longest, 1), 64)
    width = min(chunk, width) if chunk else width  # a prompt shorter than a chunk is not padded to it
    n_calls = max(1, -(-longest // width))
    toks = np.zeros((len(prompts), n_calls * width), np.int32)
    for i, p in enumerate(prompts):
        toks[i, : len(p)] = p
    n = np.asarray([len(p) for p in prompts], np.int64)
    check_room(to_host(cache.lengths), n, cache.capacity)
    graphdef, state = nnx.split(model)
    impl = resolve_impl(attention_impl)
    last = jnp.zeros((len(prompts), model.cfg.vocab_size), jnp.float32)
    staged = n_calls > 1 and protocol == "exact" and staging.can_stage(cache, to_host(cache.lengths))
    if staged:
        cache, rest = staging.stage(cache, n_calls * width, model.embed.get_value().dtype)
    for c in range(n_calls):  # over chunks of the prompt, each one compiled call
        n_new = jnp.asarray(np.clip(n - c * width, 0, width), jnp.int32)
        last, cache = _prefill_step(graphdef, state, jnp.asarray(toks[:, c * width:(c + 1) * width]), n_new,
                                    cache, last, impl=impl)
    if staged:
        cache = _absorb(rest, cache, jnp.asarray(n, jnp.int32))
    return last, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "sampler", "eos_ids", "impl", "stream"),
                   donate_argnames=("cache",))
def _decode_loop(graphdef, state, logits: Array, cache: KVCache, key: Array, *, max_new: int,
                 sampler: SamplerConfig, eos_ids: tuple[int, ...], impl: str, stream: StreamFn | None):
    """Samples from `logits [B, V]`, then decodes until EOS or `max_new`. Returns `[B, max_new]` (-1 = none)."""
    model = nnx.merge(graphdef, state)
    b = logits.shape[0]
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def pick(logits: Array, key: Array, running: Array):
        key, sub = jax.random.split(key)
        tok = sample(logits, sub, sampler)
        is_eos = jnp.any(tok[:, None] == eos[None, :], axis=-1)
        emit = running & ~is_eos
        if stream is not None:
            # Ordered effects are single-device only; on a mesh the loop's steps run one after the
            # other anyway, and each step's callback fires within its step.
            jax.debug.callback(stream, tok, emit, ordered=cache.layers[0].placement is None)
        return tok, emit, key

    out = jnp.full((b, max_new), -1, jnp.int32)
    tok, emit, key = pick(logits, key, jnp.ones((b,), bool))
    out = out.at[:, 0].set(jnp.where(emit, tok, -1))

    def cond(carry):
        return jnp.any(carry[2])

    def body(carry):
        step, tok, running, cache, key, out = carry
        # Running rows append the token they sampled last (a stopped row keeps its cache as it was, and
        # an EOS is never appended); a last pass after max_new appends the final token, so the cache
        # holds the whole reply, ready to be continued.
        logits, cache = model(tok[:, None], cache, running.astype(jnp.int32), attention_impl=impl,
                              last_only=True)
        more = step < max_new
        tok, emit, key = pick(logits, key, running & more)
        written = jax.lax.dynamic_update_slice_in_dim(out, jnp.where(emit, tok, -1)[:, None],
                                                      jnp.minimum(step, max_new - 1), axis=1)
        return step + 1, tok, emit, cache, key, jnp.where(more, written, out)

    carry = (jnp.int32(1), tok, emit, cache, key, out)
    _, _, _, cache, _, out = jax.lax.while_loop(cond, body, carry)
    return out, cache


def _check_cache(model: Transformer, kv: KVPlan | DenseKV | None, cache: KVCache, n_rows: int) -> None:
    if cache.batch != n_rows:
        raise KvqError(f"the cache has {cache.batch} rows, got {n_rows} prompts")
    if kv is None:
        return
    p = cache.layers[0].placement
    want = jax.eval_shape(lambda: init_cache(model.cfg, kv, cache.batch, cache.capacity,
                                             model.embed.get_value().dtype, mesh=p and p.mesh,
                                             rules=p and p.rules))
    shapes = lambda c: [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(c)]
    if jax.tree_util.tree_structure(want) != jax.tree_util.tree_structure(cache) or shapes(want) != shapes(cache):
        raise KvqError("the cache was built for another kv plan than the one given (pass kv=None to "
                       "continue it as it is)")


def generate(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
             kv: KVPlan | DenseKV | None = None, sampler: SamplerConfig = SamplerConfig(),
             seed: int = 0, attention_impl: str = "auto", stream: StreamFn | None = None,
             capacity: int | None = None, cache: KVCache | None = None,
             prefill_chunk: int | None = None, mesh: Any = None, rules: Any = None,
             prefill_protocol: str | None = None) -> GenerationResult:
    """Generates up to `max_new_tokens` for each prompt (a batch of token-id lists, ragged).

    With `cache` (e.g. a previous `GenerationResult.cache`), each row's prompt is appended to that
    row's cached history; the cache is donated (use the returned one) and `capacity` is its own.
    `kv` (default: the fp32 dense cache) builds a new cache, or must match the one given.
    `prefill_chunk`: 0 feeds the prompts in one call, N > 0 in calls of N tokens (`prefill_protocol`:
    see `prefill`).
    `stream(tokens [B], emitted [B])` is called from inside the compiled loop at every step; the loop
    is compiled per stream callable, so pass the same one to reuse it.
    `mesh` (`kvq_jax.make_mesh`; `rules`: `ShardingRules`) runs on several devices: the parameters
    are laid out on it (in place) and the new cache is built sharded; a continued cache keeps its own
    layout.
    """
    cfg = model.cfg
    if not prompts or any(len(p) == 0 for p in prompts):
        raise KvqError("empty prompt: give at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise KvqError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= seed <= 2**32 - 1:
        raise KvqError(f"--seed must be in [0, {2**32 - 1}], got {seed}")
    prefill_chunk = check_prefill_chunk(prefill_chunk)
    prefill_protocol = staging.check_protocol(prefill_protocol)
    lengths = np.zeros(len(prompts), np.int64) if cache is None else to_host(cache.lengths).astype(np.int64)
    n = np.asarray([len(p) for p in prompts], np.int64)
    need = int((lengths + n).max()) + max_new_tokens
    if cache is None:
        if capacity is None:
            capacity = min(round_up(need, 256), max(need, cfg.max_seq_len))
    else:
        _check_cache(model, kv, cache, len(prompts))
        have = cache.layers[0].placement
        if mesh is not None and (have is None or have.mesh != mesh):
            raise KvqError("the cache given was laid out for another mesh than mesh= (continue it without mesh=)")
        if capacity is not None and capacity != cache.capacity:
            raise KvqError(f"capacity {capacity} given, but the cache holds {cache.capacity} positions")
        capacity = cache.capacity
    check_room(lengths, n, capacity, max_new_tokens)
    if need > cfg.max_seq_len:
        raise KvqError(f"cached + prompt + max_new_tokens = {need} tokens exceeds the model's context of "
                       f"{cfg.max_seq_len} tokens")
    if mesh is not None:
        from kvq_jax.sharding import prepare

        prepare(model, mesh, len(prompts), rules)
    if cache is None:
        cache = init_cache(cfg, DenseKV("float32") if kv is None else kv, len(prompts), capacity,
                           model.embed.get_value().dtype, mesh=mesh, rules=rules)
    logits, cache = prefill(model, prompts, cache, chunk=prefill_chunk, attention_impl=attention_impl,
                            protocol=prefill_protocol)
    from kvq_jax.attention import resolve_impl

    graphdef, state = nnx.split(model)
    out, cache = _decode_loop(
        graphdef, state, logits, cache, jax.random.key(seed), max_new=max_new_tokens, sampler=sampler,
        eos_ids=tuple(cfg.eos_ids), impl=resolve_impl(attention_impl), stream=stream)
    out = to_host(out)
    tokens, at_eos = [], []
    for row in out:
        stop = np.nonzero(row < 0)[0]
        k = int(stop[0]) if len(stop) else len(row)
        tokens.append(row[:k].tolist())
        at_eos.append(k < len(row))
    return GenerationResult(tokens, at_eos, cache)
