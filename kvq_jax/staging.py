"""Exact chunked prefill: a prompt fed in chunks attends to its earlier chunks at full precision, as
one call would, and reaches the quantized cache only once it is all in.

The chunks run against a dense *staging* cache (`stage`): each quantized layer gets a
full-precision twin sized to what it must hand over (a global layer: every prompt position; a
sliding-window layer: its body ring and recent ring), dense layers of the plan are used as they are.
`absorb` then writes the staged K/V into the quantized layers through `attention.store`, the same
write decoding uses. A block's codes depend only on its K/V (`cache.write`), so the quantized cache
holds what one-shot prefill would store, and the prompt's logits are those of one shot; the price is
the staged full-precision K/V of the prompt, held until the prompt is in.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvq_jax.cache import DenseLayer, KVCache, QuantLayer
from kvq_jax.errors import KvqError

PROTOCOLS = ("exact", "cached")
DEFAULT_PROTOCOL = "exact"


def check_protocol(protocol: str | None) -> str:
    """`exact` (chunks attend to the earlier chunks at full precision: the numbers of one shot) or
    `cached` (chunks attend to the quantized cache, as decoding does: no staged copy); None: default."""
    if protocol is None:
        return DEFAULT_PROTOCOL
    if protocol not in PROTOCOLS:
        raise KvqError(f"prefill protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    return protocol


def can_stage(cache: KVCache, lengths: np.ndarray) -> bool:
    """Staging applies to a prompt fed into an empty cache that has a quantized layer (a continued
    cache already holds its history quantized, and a dense cache is exact anyway)."""
    return not np.any(lengths) and any(isinstance(lay, QuantLayer) for lay in cache.layers)


def _slots(layer: QuantLayer, width: int) -> int:
    """Positions a staged twin keeps: all `width` of a global layer; for a sliding-window layer the
    newest body-ring + recent-ring tokens (everything the quantized layer will hold)."""
    return min(width, layer.body_capacity + layer.residual) if layer.window else width


def stage(cache: KVCache, width: int, dtype: jnp.dtype) -> tuple[KVCache, KVCache]:
    """The staging twin of an empty `cache` for prompts of up to `width` tokens, in `dtype` (the compute
    dtype), laid out on the cache's mesh; and what `absorb` takes back: `cache` with its dense layers
    (which the twin uses as they are) left out, so the twin can be donated step by step."""
    def twin(lay: Any) -> Any:
        if isinstance(lay, DenseLayer):
            return lay
        b, h, _, d = lay.sink_k.shape
        shards = 1 if lay.window else lay.shards
        n = shards * -(-_slots(lay, width) // shards)
        return DenseLayer(jnp.zeros((b, h, n, d), dtype), jnp.zeros((b, h, n, d), dtype), lay.window, shards,
                          lay.placement)

    rest = cache.replace(layers=tuple(None if isinstance(lay, DenseLayer) else lay for lay in cache.layers))
    quantized = [lay for lay in cache.layers if not isinstance(lay, DenseLayer)]

    def build(quantized: list) -> tuple:
        return tuple(twin(lay) for lay in quantized)

    p = cache.layers[0].placement
    if p is None:
        twins = iter(build(quantized))
    else:
        from kvq_jax import sharding

        shape = jax.eval_shape(build, quantized)
        shardings = tuple(sharding.cache_shardings(KVCache((t,), cache.lengths, width)).layers[0] for t in shape)
        twins = iter(jax.jit(build, out_shardings=shardings)(quantized))
    layers = tuple(lay if isinstance(lay, DenseLayer) else next(twins) for lay in cache.layers)
    return KVCache(layers, jnp.zeros_like(cache.lengths), width), rest


def absorb(rest: KVCache, staged: KVCache, n: jax.Array) -> KVCache:
    """The cache `stage` was given, holding the `n [B]` prompt tokens per row that `staged` holds
    (`rest`: what `stage` returned beside the twin)."""
    from kvq_jax.attention import store

    layers = []
    zero = jnp.zeros_like(rest.lengths)
    width = staged.capacity
    for lay, st in zip(rest.layers, staged.layers):
        if lay is None:
            layers.append(st)
            continue
        # Positions 0..width-1 in order; a window twin keeps position p in slot p % C, and positions
        # older than its C newest are never read back (`cache.write` keeps only what the layer holds).
        c = st.k.shape[2]
        take = (lambda x: x[:, :, :width]) if not st.window else (lambda x: jnp.take(x, jnp.arange(width) % c, axis=2))
        layers.append(store(lay, take(st.k), take(st.v), zero, n))
    return rest.replace(layers=tuple(layers), lengths=rest.lengths + n)
