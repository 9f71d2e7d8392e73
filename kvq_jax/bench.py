"""Throughput benchmark: prefill an N-token context, then time M decode steps (after a warm-up)."""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvq_jax import staging
from kvq_jax.attention import resolve_impl
from kvq_jax.cache import init_cache
from kvq_jax.errors import KvqError
from kvq_jax.evaluate import bf16_bytes, kv_name
from kvq_jax.model import Transformer
from kvq_jax.plan import DenseKV, KVPlan
from kvq_jax.sharding import bytes_per_device


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "impl"), donate_argnames=("cache",))
def _decode(graphdef, state, tok, cache, *, steps: int, impl: str):
    model = nnx.merge(graphdef, state)

    def step(carry, _):
        tok, cache = carry
        logits, cache = model(tok[:, None], cache, attention_impl=impl, last_only=True)
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        return (tok, cache), tok

    (tok, cache), toks = jax.lax.scan(step, (tok, cache), None, length=steps)
    return toks, cache


def bench(model: Transformer, *, batch: int = 1, context: int = 512, new_tokens: int = 64,
          kv: KVPlan | DenseKV = DenseKV("float32"), attention_impl: str = "auto", seed: int = 0,
          tokens: np.ndarray | None = None, repeats: int = 3,
          prefill_chunk: int | None = None, mesh: Any = None, rules: Any = None,
          prefill_protocol: str | None = None) -> dict[str, Any]:
    """Times prefill of `[batch, context]` tokens (random unless given; one shot or in calls of
    `prefill_chunk` tokens under `prefill_protocol`, timed after a warm-up run) and `new_tokens` decode steps (the median of
    `repeats` timed runs after a warm-up). `mesh`: on several devices (see `generate`); the result
    then also gives the cache bytes per device."""
    from kvq_jax.decode import check_prefill_chunk, prefill

    cfg = model.cfg
    if batch < 1 or context < 1 or new_tokens < 1 or repeats < 1:
        raise KvqError(f"--batch, --context and --new-tokens must be >= 1 (got {batch}, {context}, {new_tokens})")
    if not 0 <= seed <= 2**32 - 1:
        raise KvqError(f"--seed must be in [0, {2**32 - 1}], got {seed}")
    capacity = context + new_tokens
    if capacity > cfg.max_seq_len:
        raise KvqError(f"--context + --new-tokens = {capacity} exceeds the model's context of {cfg.max_seq_len}")
    impl = resolve_impl(attention_impl)
    chunk = check_prefill_chunk(prefill_chunk)
    protocol = staging.check_protocol(prefill_protocol)
    if tokens is None:
        tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, context), dtype=np.int32)
    if mesh is not None:
        from kvq_jax.sharding import prepare

        prepare(model, mesh, batch, rules)
    graphdef, state = nnx.split(model)
    empty = lambda: init_cache(cfg, kv, batch, capacity, model.embed.get_value().dtype, mesh=mesh, rules=rules)
    rows = [list(r) for r in np.asarray(tokens)]
    jax.block_until_ready(prefill(model, rows, empty(), chunk=chunk, attention_impl=impl, protocol=protocol))  # compiles
    cache = empty()
    t0 = time.perf_counter()
    logits, cache = jax.block_until_ready(prefill(model, rows, cache, chunk=chunk, attention_impl=impl, protocol=protocol))
    t_prefill = time.perf_counter() - t0
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    dec = _decode.lower(graphdef, state, tok, cache, steps=new_tokens, impl=impl).compile()
    # The cache is donated, as `generate` donates it: each run gets a fresh copy of the prefilled cache
    # (made outside the timer) and updates it in place.
    fresh = lambda: jax.block_until_ready(jax.tree_util.tree_map(jnp.copy, cache))
    jax.block_until_ready(dec(state, tok, fresh()))  # warm-up
    times = []
    for _ in range(repeats):  # the median of a few runs: a shared CPU is noisy
        run = fresh()
        t0 = time.perf_counter()
        _, end = jax.block_until_ready(dec(state, tok, run))
        times.append(time.perf_counter() - t0)
    t_decode = float(np.median(times))
    per_device = bytes_per_device(end)
    return {
        **({} if mesh is None else {"mesh": dict(mesh.shape), "kv_cache_bytes_per_device": max(per_device.values())}),
        "model": cfg.name, "kv": kv_name(kv), "attention": impl, "backend": jax.default_backend(),
        "batch": batch, "context": context, "new_tokens": new_tokens, "decode_repeats": repeats,
        "prefill_chunk": chunk, "prefill_protocol": protocol if 0 < chunk < context else "one shot",
        "prefill_s": t_prefill, "prefill_tokens_per_s": batch * context / t_prefill,
        "decode_s": t_decode, "decode_ms_per_step": 1e3 * t_decode / new_tokens,
        "decode_tokens_per_s": batch * new_tokens / t_decode,
        "kv_cache_bytes": end.nbytes(), "kv_cache_bytes_bf16": bf16_bytes(model, batch, capacity),
    }
