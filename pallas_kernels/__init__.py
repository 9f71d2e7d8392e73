"""Pallas kernels for kvq_jax: fused dequantizing flash-decoding over the packed KV cache."""

from pallas_kernels.decode_attention import (
    BACKENDS,
    default_block,
    merge_splits,
    packed_decode_attention,
    reference_packed_attention,
    resolve_backend,
    tpu_block_unit,
)

__all__ = [
    "BACKENDS",
    "default_block",
    "merge_splits",
    "packed_decode_attention",
    "reference_packed_attention",
    "resolve_backend",
    "tpu_block_unit",
]
