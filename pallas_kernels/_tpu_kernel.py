"""Flash-decoding kernel for the Mosaic TPU lowering (also run by the TPU interpreter).

Grid (B, Hkv, splits, blocks per split), the last axis sequential: the online-softmax state lives
in VMEM scratch across it. `n_valid` is scalar-prefetched into SMEM so the index maps can clamp the
block index to the last valid block: past `n_valid` the block index stops changing, the pipeline
issues no DMA, and `pl.when` skips the compute. A block is `T` tokens = `T/P` word rows (a multiple
of 8 sublanes) by head_dim lanes. Unpacking writes the P digit planes of the words block into a
token-ordered VMEM scratch with sublane-strided stores (plane i holds tokens `word*P + i`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common as C

Array = jax.Array
_LANES = 128  # m/l scratch and the lse output are lane-broadcast: Mosaic prefers whole vregs
_FOLD_MAX_GROUPS = 4


@dataclasses.dataclass(frozen=True)
class _Rows:
    """How per-channel scale rows are fetched: `rows` per BlockSpec block; `whole` = the full array."""

    rows: int
    whole: bool


def _channel_rows(n_rows: int, ng: int) -> _Rows:
    """A multiple of the rows one token block uses and of the bf16 sublane tile (16), so a token
    block never straddles two fetched blocks; the whole array when that is no larger."""
    rows = math.lcm(16, ng)
    return _Rows(n_rows, True) if n_rows <= rows else _Rows(rows, False)


def _compiler_params(semantics: tuple[str, ...]):
    cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
    return cls(dimension_semantics=semantics)


def _unpack(w_ref, scratch, lay: C.Layout) -> None:
    """Words block `[T/P, D]` → token-ordered codes `[T, D]` float32 in the VMEM scratch."""
    w = w_ref[...]
    n_words = w.shape[0]
    for i, plane in enumerate(C.digit_planes(w, lay)):
        scratch[pl.ds(i, n_words, stride=lay.digits), :] = plane


def _dequantize_in_place(scratch, s: Array, z: Array, lay: C.Layout) -> None:
    """codes → code·scale + zero for per-channel groups, one aligned G-row slab per group."""
    for g in range(s.shape[0]):
        rows = pl.ds(g * lay.group, lay.group)
        scratch[rows, :] = scratch[rows, :] * s[g:g + 1, :] + z[g:g + 1, :]


def _explicit(lay: C.Layout, block: int) -> bool:
    """Dequantize per-channel blocks in VMEM instead of folding scales into the products when the
    block spans many groups: the fold's stacked [nG*R, T] scores then cost more than 2 ops/element.
    Needs sublane-aligned groups."""
    return lay.axis == "channel" and C.n_groups(lay, block) > _FOLD_MAX_GROUPS and lay.group % 8 == 0


def _operands(w_ref, s_ref, z_ref, scratch, blk, block, lay, rows):
    """(codes or values `[T, D]`, scale, zero) for `C.block_update`."""
    _unpack(w_ref, scratch, lay)
    s, z = (_block_scales(x, blk, block, lay, rows) for x in (s_ref, z_ref))
    if _explicit(lay, block):
        _dequantize_in_place(scratch, s, z, lay)
        return scratch[...], None, None
    return scratch[...], s, z


def _block_scales(ref, blk: Array, block: int, lay: C.Layout, rows: _Rows | None) -> Array:
    """The block's scale/zero rows as float32: token axis `[T, J]`, channel axis `[nG, D]`."""
    x = ref[...].astype(jnp.float32)
    if lay.axis == "token":
        return x
    ng = C.n_groups(lay, block)
    if not rows.whole and rows.rows == ng:
        return x
    first = blk * ng
    off = first if rows.whole else first % rows.rows
    # Rows [off, off + nG) of the fetched block, picked by masked sublane sums (no dynamic slicing).
    shape = (ng, x.shape[0], x.shape[1])
    pick = lax.broadcasted_iota(jnp.int32, shape, 1) == off + lax.broadcasted_iota(jnp.int32, shape, 0)
    return jnp.sum(jnp.where(pick, x[None], 0.0), axis=1)


def _make_kernel(klay, vlay, block: int, blocks_per_split: int, krows, vrows, rope: bool):
    def kernel(nv_ref, p0_ref, inv_ref, q_ref, kw_ref, ks_ref, kz_ref, vw_ref, vs_ref, vz_ref, o_ref, lse_ref,
               m_sc, l_sc, acc_sc, kc_sc, vc_sc):
        n = nv_ref[pl.program_id(0)]
        kb = pl.program_id(3)
        blk = pl.program_id(2) * blocks_per_split + kb
        t0 = blk * block

        @pl.when(kb == 0)
        def _init():
            m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
            l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
            acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

        @pl.when(t0 < n)
        def _step():
            kc, ks, kz = _operands(kw_ref, ks_ref, kz_ref, kc_sc, blk, block, klay, krows)
            vc, vs, vz = _operands(vw_ref, vs_ref, vz_ref, vc_sc, blk, block, vlay, vrows)
            if rope:  # keys stored before RoPE: dequantized, then rotated by position
                if ks is not None:
                    kc = C.dequantize_block(kc, ks, kz, t0, klay)
                pos = (p0_ref[0] + t0 + lax.broadcasted_iota(jnp.int32, (block, 1), 0)).astype(jnp.float32)
                kc, ks, kz = C.rope_block(kc, pos, inv_ref[...]), None, None
            m, l, acc = C.block_update(
                q_ref[...].astype(jnp.float32), kc, ks, kz, vc, vs, vz, t0, n,
                m_sc[:, :1], l_sc[:, :1], acc_sc[...], klay, vlay)
            m_sc[...] = jnp.broadcast_to(m, m_sc.shape)
            l_sc[...] = jnp.broadcast_to(l, l_sc.shape)
            acc_sc[...] = acc

        @pl.when(kb == blocks_per_split - 1)
        def _done():
            out, lse = C.finalize(m_sc[:, :1], l_sc[:, :1], acc_sc[...])
            o_ref[...] = out
            lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)

    return kernel


def tpu_attention(
    q: Array, kw: Array, ks: Array, kz: Array, vw: Array, vs: Array, vz: Array, n_valid: Array,
    pos0: Array, inv: Array | None,
    *, klay: C.Layout, vlay: C.Layout, block: int, blocks_per_split: int, splits: int,
    interpret=False,
) -> tuple[Array, Array]:
    """Per-split results: out `[B, H, S, R, D]` (normalised) and lse `[B, H, S, R, 128]`.

    q `[B, H, R, D]` float32 (R a multiple of 8), words int32 `[B, H, W, D]`, scales/zeros as in
    the cache, n_valid `[B]` int32. `block` is a multiple of 8·P of both widths and of the
    per-channel groups. `inv [1, D]` float32: the keys are stored before RoPE with these inverse
    frequencies, token t at position `pos0 [1]` + t (None: after RoPE; pos0 is then unused).
    `interpret`: False, True or a `pltpu.InterpretParams`.
    """
    b, h, r, d = q.shape
    nbs = blocks_per_split
    rope = inv is not None
    inv = jnp.zeros((1, d), jnp.float32) if inv is None else inv

    def block_index(bi, si, ki, nv):
        # Clamp to the last block holding a valid token: later steps repeat it, so no DMA is issued.
        last = jnp.maximum((nv[bi] + block - 1) // block - 1, 0)
        return jnp.minimum(si * nbs + ki, last)

    def words_spec(lay: C.Layout) -> pl.BlockSpec:
        return pl.BlockSpec((None, None, block // lay.digits, d),
                            lambda bi, hi, si, ki, nv, p0: (bi, hi, block_index(bi, si, ki, nv), 0))

    def scale_spec(x: Array, lay: C.Layout, rows: _Rows | None) -> pl.BlockSpec:
        if lay.axis == "token":
            return pl.BlockSpec((None, None, block, x.shape[3]),
                                lambda bi, hi, si, ki, nv, p0: (bi, hi, block_index(bi, si, ki, nv), 0))
        ng = C.n_groups(lay, block)
        if rows.whole:
            return pl.BlockSpec((None, None, rows.rows, d), lambda bi, hi, si, ki, nv, p0: (bi, hi, 0, 0))
        return pl.BlockSpec(
            (None, None, rows.rows, d),
            lambda bi, hi, si, ki, nv, p0: (bi, hi, block_index(bi, si, ki, nv) * ng // rows.rows, 0))

    krows = _channel_rows(ks.shape[2], C.n_groups(klay, block)) if klay.axis == "channel" else None
    vrows = _channel_rows(vs.shape[2], C.n_groups(vlay, block)) if vlay.axis == "channel" else None
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, h, splits, nbs),
        in_specs=[
            pl.BlockSpec((1, d), lambda bi, hi, si, ki, nv, p0: (0, 0)),
            pl.BlockSpec((None, None, r, d), lambda bi, hi, si, ki, nv, p0: (bi, hi, 0, 0)),
            words_spec(klay), scale_spec(ks, klay, krows), scale_spec(kz, klay, krows),
            words_spec(vlay), scale_spec(vs, vlay, vrows), scale_spec(vz, vlay, vrows),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, r, d), lambda bi, hi, si, ki, nv, p0: (bi, hi, si, 0, 0)),
            pl.BlockSpec((None, None, None, r, _LANES),
                         lambda bi, hi, si, ki, nv, p0: (bi, hi, si, 0, 0)),
        ],
        scratch_shapes=[
            pltpu.VMEM((r, _LANES), jnp.float32),  # running max
            pltpu.VMEM((r, _LANES), jnp.float32),  # running denominator
            pltpu.VMEM((r, d), jnp.float32),  # running numerator
            pltpu.VMEM((block, d), jnp.float32),  # token-ordered key codes
            pltpu.VMEM((block, d), jnp.float32),  # token-ordered value codes
        ],
    )
    return pl.pallas_call(
        _make_kernel(klay, vlay, block, nbs, krows, vrows, rope),
        out_shape=[jax.ShapeDtypeStruct((b, h, splits, r, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, h, splits, r, _LANES), jnp.float32)],
        grid_spec=grid_spec,
        compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="packed_decode_attention_tpu",
    )(n_valid, pos0, inv, q, kw, ks, kz, vw, vs, vz)
