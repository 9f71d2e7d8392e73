"""Flash-decoding kernel with an in-kernel loop over token blocks: the Pallas GPU (Triton) lowering and
the plain interpreter (`interpret=True`) run this one.

Grid (B, Hkv, splits). Each program sees the whole packed slab of its (batch, head) row (on a GPU
that is only a pointer, nothing is copied) and loops over the blocks of its split that hold valid
tokens, so blocks past `n_valid` cost nothing. Codes are read in token order with gather loads
(word row `t // P` of each token, then a per-row shift or base-3 digit), which is what Triton
addresses natively; scales are gathered the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common as C

Array = jax.Array


def _triton_params(num_warps: int, num_stages: int):
    """Triton CompilerParams across jax versions (renamed from TritonCompilerParams)."""
    try:
        from jax.experimental.pallas import triton as pltriton
        cls = getattr(pltriton, "CompilerParams", None)
    except ImportError:
        cls = None
    if cls is None:
        from jax.experimental.pallas import gpu as plgpu  # older jax
        cls = plgpu.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


def _codes(w_ref, tok: Array, lay: C.Layout) -> Array:
    """Codes of tokens `tok [T, 1]` → `[T, D]` float32 (rows past the array are clamped, masked later)."""
    rows = jnp.minimum(tok // lay.digits, w_ref.shape[0] - 1)
    w = w_ref[rows[:, 0], :]
    return C.digits_at(w, tok - (tok // lay.digits) * lay.digits, lay)


def _scales(s_ref, tok: Array, t0: Array, block: int, lay: C.Layout) -> Array:
    """Scale or zero rows for one block: channel axis `[nG, D]`, token axis `[T, J]`, float32."""
    if lay.axis == "token":
        rows = jnp.minimum(tok[:, 0], s_ref.shape[0] - 1)
    else:
        ng = C.n_groups(lay, block)
        rows = t0 // lay.group + lax.broadcasted_iota(jnp.int32, (ng,), 0)
        rows = jnp.minimum(rows, s_ref.shape[0] - 1)
    return s_ref[rows, :].astype(jnp.float32)


def _make_kernel(klay: C.Layout, vlay: C.Layout, block: int, blocks_per_split: int, rope: bool):
    split_tokens = block * blocks_per_split

    def kernel(nv_ref, p0_ref, inv_ref, q_ref, kw_ref, ks_ref, kz_ref, vw_ref, vs_ref, vz_ref, o_ref, lse_ref):
        n = nv_ref[0]
        start = pl.program_id(2) * split_tokens
        n_blocks = jnp.clip((n - start + block - 1) // block, 0, blocks_per_split)
        q = q_ref[...].astype(jnp.float32)
        r, d = q.shape

        def body(i, carry):
            t0 = start + i * block
            tok = t0 + lax.broadcasted_iota(jnp.int32, (block, 1), 0)
            kc = _codes(kw_ref, tok, klay)
            vc = _codes(vw_ref, tok, vlay)
            ks, kz = (_scales(x, tok, t0, block, klay) for x in (ks_ref, kz_ref))
            vs, vz = (_scales(x, tok, t0, block, vlay) for x in (vs_ref, vz_ref))
            if rope:  # keys stored before RoPE: dequantized, then rotated by position
                pos = (p0_ref[0] + tok).astype(jnp.float32)
                kc, ks, kz = C.rope_block(C.dequantize_block(kc, ks, kz, t0, klay), pos, inv_ref[...]), None, None
            return C.block_update(q, kc, ks, kz, vc, vs, vz, t0, n, *carry, klay, vlay)

        init = (jnp.full((r, 1), -jnp.inf, jnp.float32), jnp.zeros((r, 1), jnp.float32),
                jnp.zeros((r, d), jnp.float32))
        m, l, acc = lax.fori_loop(0, n_blocks, body, init)
        out, lse = C.finalize(m, l, acc)
        o_ref[...] = out
        lse_ref[...] = lse

    return kernel


def loop_attention(
    q: Array, kw: Array, ks: Array, kz: Array, vw: Array, vs: Array, vz: Array, n_valid: Array,
    pos0: Array, inv: Array | None,
    *, klay: C.Layout, vlay: C.Layout, block: int, blocks_per_split: int, splits: int,
    interpret: bool, num_warps: int = 4, num_stages: int = 2,
) -> tuple[Array, Array]:
    """Per-split results: out `[B, H, S, R, D]` (normalised) and lse `[B, H, S, R, 1]`.

    q `[B, H, R, D]` float32 (R padded as the backend needs), words int32 `[B, H, W, D]`,
    scales/zeros as in the cache, n_valid `[B]` int32. `inv [1, D]` float32: the keys are stored
    before RoPE with these inverse frequencies, token t at position `pos0 [1]` + t (None: after).
    """
    rope = inv is not None
    inv = jnp.zeros((1, q.shape[3]), jnp.float32) if inv is None else inv
    b, h, r, d = q.shape

    def slab(x: Array) -> pl.BlockSpec:
        # Whole (batch, head) slab: the kernel indexes tokens itself.
        return pl.BlockSpec((None, None, *x.shape[2:]), lambda bi, hi, si: (bi, hi, 0, 0))

    in_specs = [
        pl.BlockSpec((1,), lambda bi, hi, si: (bi,)),
        pl.BlockSpec((1,), lambda bi, hi, si: (0,)),
        pl.BlockSpec((1, d), lambda bi, hi, si: (0, 0)),
        pl.BlockSpec((None, None, r, d), lambda bi, hi, si: (bi, hi, 0, 0)),
        *(slab(x) for x in (kw, ks, kz, vw, vs, vz)),
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, r, d), lambda bi, hi, si: (bi, hi, si, 0, 0)),
        pl.BlockSpec((None, None, None, r, 1), lambda bi, hi, si: (bi, hi, si, 0, 0)),
    ]
    out_shape = [jax.ShapeDtypeStruct((b, h, splits, r, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, splits, r, 1), jnp.float32)]
    params = None if interpret else _triton_params(num_warps, num_stages)
    return pl.pallas_call(
        _make_kernel(klay, vlay, block, blocks_per_split, rope),
        out_shape=out_shape,
        grid=(b, h, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=interpret,
        compiler_params=params,
        name="packed_decode_attention_loop",
    )(n_valid, pos0, inv, q, kw, ks, kz, vw, vs, vz)
