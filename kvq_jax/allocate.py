"""Budgeted greedy bit allocation over layers (or heads) for keys and values -> `KVPlan`.

Every K and V tensor starts at the smallest allowed width; the greedy repeatedly takes the upgrade
(from the current width to ANY larger allowed width) with the largest distortion reduction per added
bit that still fits the budget, and stops when none fits or none reduces the distortion. Ties favour
keys, then the lower layer (then head) index, then the smaller target width: fully deterministic.

Distortion models (`method`):
- "norm" (reference rule): e(b) = c * 2^(-2b), c = squared activation norm of the layer's K / V
  (`norm` = "fro" or "spec"; per layer the per-head squares are summed, as distortion adds up).
- "weight-norm": the same with c = squared norm of W_K / W_V (of the layer, or of the head's slice).
- "sensitivity" (ours): the measured attention-output errors `k_attn_err` / `v_attn_err` used directly
  at each width (they may be non-convex, hence upgrades to any larger width are considered). A 16-bit
  width needs no measurement: it keeps the tensor dense, so its error is 0.
- "fisher" (ours, loss-aware): the same greedy over `k_fisher_err` / `v_fisher_err`, the attention-output
  errors under the cache's sink/window protocol weighted by the loss's Fisher information, i.e. the
  predicted rise in NLL (kvq_jax.fisher): one unit for every layer and for K and V.

Budget: the mean cost per cached K/V element over all layers' keys and values. By default every
layer's K and V holds the same number of elements, so this is the mean over the 2L tensors (the
element budget). With `layer_tokens` (the tokens each layer holds at a target context: a sliding-window
layer min(W, context), a global one the context) it is the mean over the elements the cache really
holds (the memory budget): a bit spent on a 512-token local layer costs 512 tokens' worth, on a global
layer the whole context's. The cost of a width is
its nominal value (1.58 counts 1.58), or with `count_overhead=True` `storage_bits + overhead_bits`
(packing waste plus scales/zeros). Sink and recent-window tokens are full precision whatever the plan
and are not counted. Costs are exact rationals (scaled to integers), so the budget is never exceeded
by rounding; the budget itself is read as the simplest fraction within 1e-12 (relative) of the given
float, so 2.3 means 23/10 and 16/6 means 8/3.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from fractions import Fraction
from typing import Any, Sequence

import numpy as np

from kvq_jax.config import ModelConfig
from kvq_jax.errors import KvqError
from kvq_jax.plan import KVPlan, QuantSpec, join_rotation, split_rotation
from kvq_jax.stats import CODEBOOK_BASE, CODEBOOK_OPTIONS, KVStats, canonical_bits as _num

METHODS = ("fisher", "sensitivity", "norm", "weight-norm")
NORMS = ("fro", "spec")
_MEASURED = ("sensitivity", "fisher")  # methods that use measured errors at each width


@dataclasses.dataclass(frozen=True, eq=False)
class Allocation:
    """Result of `allocate_detailed`.

    plan: the KVPlan (one width per layer for K and one for V).
    k_bits, v_bits [L]: the plan's widths.
    k_bits_head, v_bits_head [L, H]: the per-head allocation when `per_head=True`, else None. The
        cache stores one width per layer and K/V, so the plan takes, per layer, the largest allowed
        width whose cost does not exceed the mean cost of that layer's heads (never over budget).
    k_err, v_err [L]: predicted distortion of the allocation under the method's model (per-head
        allocation: summed over the layer's heads). Units depend on the method.
    spent: mean cost per element of the allocation (<= budget); plan_spent: same for the plan; both
        weighted by `layer_tokens` when given. plan_element_bits: the plan's unweighted mean over the
        2L tensors (the element budget's measure), whichever budget was used.
    steps: number of greedy upgrades taken.
    """

    plan: KVPlan
    method: str
    budget: float
    count_overhead: bool
    bits: tuple[float, ...]
    k_bits: np.ndarray
    v_bits: np.ndarray
    k_err: np.ndarray
    v_err: np.ndarray
    spent: float
    plan_spent: float
    steps: int
    k_bits_head: np.ndarray | None = None
    v_bits_head: np.ndarray | None = None
    plan_element_bits: float = 0.0
    layer_tokens: tuple[int, ...] | None = None

    @property
    def total_err(self) -> float:
        return float(np.sum(self.k_err) + np.sum(self.v_err))


def allocate(stats: KVStats, budget: float, **options: Any) -> KVPlan:
    """Allocate widths under `budget` and return only the plan (options: `allocate_detailed`'s)."""
    return allocate_detailed(stats, budget, **options).plan


def allocate_detailed(
    stats: KVStats,
    budget: float,
    *,
    method: str = "sensitivity",
    bits: tuple[float, ...] | None = None,
    norm: str = "fro",
    count_overhead: bool = False,
    key_axis: str | None = None,
    value_axis: str | None = None,
    group_k: int | None = None,
    group_v: int | None = None,
    residual: int | None = None,
    sink: int | None = None,
    rotate: str | tuple[str, ...] = "none",
    scale_dtype: str | None = None,
    per_head: bool = False,
    model_name: str | None = None,
    layer_tokens: Sequence[int] | None = None,
    key_codebooks: bool | Sequence[bool] | None = None,
    value_codebooks: bool | Sequence[bool] | None = None,
) -> Allocation:
    """Greedy rate-distortion allocation of K/V widths per layer (or per head) under `budget`.

    budget: mean bits per cached K/V element (see module docstring; `layer_tokens [L]` weighs each
    layer by the tokens it holds, see `layer_tokens_at`). bits: allowed widths (default
    `stats.bits`). key_codebooks (one flag, or one per layer; method "fisher", keys stored "prerope"):
    the layer's keys take the codebook the analysis learned for their width (`stats.levels`),
    and are allocated by the errors measured with it; value_codebooks the same for values stored
    "hadamard". With rotate="auto" the allocator chooses them per layer unless they are False;
    None elsewhere means no codebooks. Raises
    KvqError for an unknown method/norm, a width that is not allowed (or not measured, for
    "sensitivity"), or a budget below the cheapest assignment.
    """
    if method not in METHODS:
        raise KvqError(f"unknown allocation method {method!r} (choose from {', '.join(METHODS)})")
    geo = cache_geometry(stats, method, key_axis=key_axis, value_axis=value_axis, group_k=group_k,
                         group_v=group_v, scale_dtype=scale_dtype, sink=sink, residual=residual)
    key_axis, value_axis, group_k, group_v = geo["key_axis"], geo["value_axis"], geo["group_k"], geo["group_v"]
    scale_dtype, sink, residual = geo["scale_dtype"], geo["sink"], geo["residual"]
    if isinstance(rotate, str) and rotate == "auto":
        return _auto_rotation(stats, budget, dict(
            method=method, bits=bits, norm=norm, count_overhead=count_overhead, key_axis=key_axis,
            value_axis=value_axis, group_k=group_k, group_v=group_v, residual=residual, sink=sink,
            scale_dtype=scale_dtype, per_head=per_head, model_name=model_name, layer_tokens=layer_tokens),
            codebooks={"k": key_codebooks is not False, "v": value_codebooks is not False})
    rotations = _rotations(rotate, stats.n_layers)
    books = {kind: _codebooks(stats, flags, rotations, method, kind)
             for kind, flags in (("k", key_codebooks), ("v", value_codebooks))}
    if norm not in NORMS:
        raise KvqError(f"unknown norm {norm!r} (choose from {', '.join(NORMS)})")
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        raise KvqError(f"budget must be a number, got {budget!r}") from None
    if not math.isfinite(budget) or budget <= 0:
        raise KvqError(f"budget must be a positive number of bits, got {budget}")
    widths = _widths(stats, bits, method)
    L = stats.n_layers
    if layer_tokens is None:
        tokens = np.ones(L, np.int64)
    else:
        tokens = np.asarray(layer_tokens)
        if tokens.shape != (L,) or not np.issubdtype(tokens.dtype, np.integer) or (tokens < 1).any():
            raise KvqError(f"layer_tokens must be {L} positive integers, got {list(layer_tokens)}")
        tokens = tokens.astype(np.int64)

    k_spec = [_spec(b, key_axis, group_k) for b in widths]
    v_spec = [_spec(b, value_axis, group_v) for b in widths]
    k_cost = [_cost(s, count_overhead, scale_dtype) for s in k_spec]
    v_cost = [_cost(s, count_overhead, scale_dtype) for s in v_spec]
    for costs in (k_cost, v_cost):
        if any(b <= a for a, b in zip(costs, costs[1:])):
            raise KvqError(f"width costs are not increasing: {[float(c) for c in costs]}")

    k_e, v_e, k_c, v_c = _distortions(stats, method, norm, widths, per_head, rotations, books)  # [L(,H), nb]
    shape = k_e.shape[:-1]
    n_half = int(np.prod(shape))
    # item order: all keys (layer-major, then head), then all values -> ties favour keys, low index
    dist = np.concatenate([k_e.reshape(n_half, -1), v_e.reshape(n_half, -1)])
    frac = [k_cost] * n_half + [v_cost] * n_half

    # exact integer costs (common denominator); the capacity is floored, so it is never exceeded
    budget_q = _budget_fraction(budget)
    denom = math.lcm(*(c.denominator for c in k_cost + v_cost))
    unit = np.array([[int(c * denom) for c in row] for row in frac], dtype=object)
    # an item's elements: its layer's tokens (items are layer-major, heads inside, keys then values)
    weight = np.concatenate([np.repeat(tokens, n_half // L)] * 2)
    cost = unit * weight[:, None].astype(object)
    total = int(weight.sum())
    # more budget than the widest assignment needs changes nothing (and keeps the ints small)
    capacity = min(math.floor(budget_q * denom * total), int(cost[:, -1].sum()))
    if int(cost.max()) * len(frac) >= 2**62:
        raise KvqError("width costs are too fine-grained to allocate exactly")
    cost, unit = cost.astype(np.int64), unit.astype(np.int64)
    cheapest = int(cost[:, 0].sum())
    if cheapest > capacity:
        least = cheapest / (denom * total)
        raise KvqError(f"budget {budget:g} bits is below the cheapest assignment "
                       f"({least:.4g} bits: every K and V at {_num(widths[0])} bits)")

    if method in _MEASURED:
        ratio_scale, red = None, dist[:, :, None] - dist[:, None, :]  # [n, a, b] = e(a) - e(b)
    else:
        # e = c * 2^(-2b): ratio = c * k with k independent of c, so the ratio is monotone in c even
        # under rounding (the "larger norm never gets fewer bits" property relies on it)
        g = 2.0 ** (-2.0 * np.asarray(widths))
        ratio_scale = np.concatenate([k_c.reshape(-1), v_c.reshape(-1)])
        red = np.broadcast_to(g[:, None] - g[None, :], (len(frac),) + (len(widths),) * 2)
    idx, spent, steps = _greedy(red, cost, capacity, ratio_scale)

    wv = np.asarray([float(w) for w in widths])
    chosen_err = np.take_along_axis(dist, idx[:, None], axis=1)[:, 0]
    k_idx, v_idx = idx[:n_half].reshape(shape), idx[n_half:].reshape(shape)
    k_err = chosen_err[:n_half].reshape(shape)
    v_err = chosen_err[n_half:].reshape(shape)
    k_bits_head = v_bits_head = None
    if per_head:
        k_bits_head, v_bits_head = wv[k_idx], wv[v_idx]
        k_idx, v_idx = _layer_floor(k_idx, unit[0]), _layer_floor(v_idx, unit[n_half])
        k_err, v_err = k_err.sum(axis=1), v_err.sum(axis=1)
    per_layer = unit[0][k_idx] + unit[n_half][v_idx]  # [L] scaled cost of a layer's K + V element
    plan_spent = (per_layer * tokens).sum() / (denom * 2 * tokens.sum())
    plan_elements = per_layer.sum() / (denom * 2 * L)
    spent_f = spent / (denom * total)

    name = model_name if model_name is not None else stats.model_name
    what = f"{method}" + (f"/{norm}" if method not in _MEASURED else "") + (" per-head" if per_head else "")
    note = (f"allocate: method={what} budget={budget:g} bits/elt"
            f"{' (storage+overhead)' if count_overhead else ' (nominal)'}"
            f"{' over the elements held (memory budget)' if layer_tokens is not None else ''}"
            f" spent={float(plan_spent):.4f}"
            + (f", {float(plan_elements):.4f} per layer element" if layer_tokens is not None else ""))
    def specs(kind: str, spec: list[QuantSpec], chosen: np.ndarray) -> tuple[QuantSpec, ...]:
        return tuple(dataclasses.replace(spec[j], levels=stats.levels(kind, i, widths[j])) if books[kind][i]
                     else spec[j] for i, j in enumerate(chosen))

    plan = KVPlan(
        keys=specs("k", k_spec, k_idx), values=specs("v", v_spec, v_idx),
        residual=residual, sink=sink, rotate=rotate, scale_dtype=scale_dtype,
        model=name, model_layers=L, note=note)
    return Allocation(
        plan=plan, method=method, budget=budget, count_overhead=count_overhead,
        bits=tuple(_num(w) for w in widths), k_bits=wv[k_idx], v_bits=wv[v_idx],
        k_err=k_err, v_err=v_err, spent=float(spent_f), plan_spent=float(plan_spent), steps=steps,
        k_bits_head=k_bits_head, v_bits_head=v_bits_head, plan_element_bits=float(plan_elements),
        layer_tokens=None if layer_tokens is None else tuple(int(t) for t in tokens))


def _rotations(rotate: str | Sequence[str], n_layers: int) -> tuple[str, ...]:
    """`rotate` as one rotation per layer (validated as a plan validates it)."""
    return tuple(KVPlan((QuantSpec(16),) * n_layers, (QuantSpec(16),) * n_layers, rotate=rotate).rotation(i)
                 for i in range(n_layers))


def _codebooks(stats: KVStats, flags: bool | Sequence[bool] | None, rotations: tuple[str, ...],
               method: str, kind: str) -> tuple[bool, ...]:
    """`key_codebooks` (kind "k") or `value_codebooks` ("v") as one flag per layer (None: none),
    validated against the rotations and the stats."""
    n, what = stats.n_layers, "key" if kind == "k" else "value"
    if flags is None or isinstance(flags, (bool, np.bool_)):
        books = (bool(flags),) * n
    else:
        books = tuple(bool(f) for f in flags)
    if len(books) != n:
        raise KvqError(f"{what}_codebooks has {len(books)} flags, the stats have {n} layers")
    if not any(books):
        return books
    if method != "fisher":
        raise KvqError(f"{what} codebooks are allocated from Fisher errors: use method 'fisher'")
    base = CODEBOOK_BASE[kind]
    if stats.fisher_err(kind, CODEBOOK_OPTIONS[kind]) is None:
        raise KvqError(f"these stats have no {what} codebooks: re-run the analysis with the {base} rotation")
    side = 0 if kind == "k" else 1
    bad = [i for i, (b, r) in enumerate(zip(books, rotations)) if b and split_rotation(r)[side] != base]
    if bad:
        where = "before RoPE" if kind == "k" else "after the Hadamard rotation"
        raise KvqError(f"layer {bad[0]}: {what} codebooks are learned for {what}s stored {where} "
                       f"(rotate {base} on the {what} side)")
    return books


def _auto_rotation(stats: KVStats, budget: float, kw: dict, codebooks: dict[str, bool]) -> Allocation:
    """rotate="auto": the keys' and the values' rotation of each layer and the widths, by
    alternating the two choices.

    With the rotations fixed, the greedy allocates widths from each tensor's Fisher errors under its
    rotation; with the widths fixed, each layer's keys take the key option, and its values the
    value option, (of those the stats measured) with the lowest error at their width. Repeated
    until the options stop changing; the allocation of lowest predicted error is returned (a greedy
    step need not lower it). Keys before RoPE and values after Hadamard with the learned codebook
    ("prerope+codebook", "hadamard+codebook") are one more option each, where the stats hold them
    (and `codebooks[kind]`).
    """
    if kw["method"] != "fisher":
        raise KvqError("rotate='auto' chooses rotations from Fisher errors: use method 'fisher'")
    cand = {kind: tuple(r for r in stats.fisher_rotations(kind) if codebooks[kind] or r != CODEBOOK_OPTIONS[kind])
            for kind in ("k", "v")}
    if len(cand["k"]) + len(cand["v"]) < 3:
        raise KvqError("these stats have no rotated Fisher errors: re-run the analysis to choose rotations")
    none = (False,) * stats.n_layers
    rot, books = ("none",) * stats.n_layers, {"k": none, "v": none}
    best, seen = None, set()
    while (rot, books["k"], books["v"]) not in seen:
        seen.add((rot, books["k"], books["v"]))
        a = allocate_detailed(stats, budget, rotate=rot, key_codebooks=books["k"], value_codebooks=books["v"], **kw)
        if best is None or a.total_err < best.total_err:
            best = a
        # each tensor's current option: its codebook option, or its side of the rotation
        prev = [tuple(CODEBOOK_OPTIONS[kind] if books[kind][i] else split_rotation(r)[side]
                      for side, kind in enumerate("kv")) for i, r in enumerate(rot)]

        def pick(kind: str, side: int, bits: np.ndarray) -> list[str]:
            err = {r: _fisher_at(stats, r, kind, bits) for r in cand[kind]}
            # a tie keeps the tensor's current option
            return [min(cand[kind], key=lambda r: (err[r][i], r != prev[i][side])) for i in range(stats.n_layers)]

        chosen = {"k": pick("k", 0, a.k_bits), "v": pick("v", 1, a.v_bits)}
        books = {kind: tuple(r == CODEBOOK_OPTIONS[kind] for r in chosen[kind]) for kind in "kv"}
        base = {kind: [CODEBOOK_BASE[kind] if b else r for r, b in zip(chosen[kind], books[kind])] for kind in "kv"}
        rot = tuple(join_rotation(k, v) for k, v in zip(base["k"], base["v"]))
    plan = best.plan
    return dataclasses.replace(best, plan=plan.replace(note=plan.note + ", rotations chosen per layer"))


def _fisher_at(stats: KVStats, rotate: str, kind: str, widths: np.ndarray) -> np.ndarray:
    """[L] Fisher error of each layer's K (or V) at its width under `rotate` (16 bits: 0)."""
    e = stats.fisher_err(kind, rotate)
    out = np.zeros(stats.n_layers)
    for i, b in enumerate(widths):
        j = stats.bit_index(float(b))
        out[i] = 0.0 if j is None else e[i, j]
    return out


def layer_tokens_at(cfg: ModelConfig, context: int) -> tuple[int, ...]:
    """Tokens each layer's cache holds at `context`: min(W, context) for a sliding-window layer."""
    if context < 1:
        raise KvqError(f"--target-context must be >= 1, got {context}")
    return tuple(min(cfg.window(i), context) if cfg.window(i) else context for i in range(cfg.n_layers))


def _greedy(red: np.ndarray, cost: np.ndarray, capacity: int,
            scale: np.ndarray | None) -> tuple[np.ndarray, int, int]:
    """The greedy loop.

    red [n, nb, nb]: distortion reduction from width a to width b (only b > a is used);
    cost [n, nb] int64 (scaled); capacity: total scaled cost allowed; scale [n] or None: per-item
    factor applied to the ratio (norm methods). Returns (width index [n], spent, steps).
    """
    n, nb = cost.shape
    rows = np.arange(n)
    dcost = cost[:, None, :] - cost[:, :, None]  # [n, a, b] = cost(b) - cost(a)
    upper = np.triu(np.ones((nb, nb), dtype=bool), k=1)[None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(upper, red / np.where(upper, dcost, 1), -np.inf)
    if scale is not None:
        ratio = np.where(upper, scale[:, None, None] * ratio, -np.inf)
    cur = np.zeros(n, dtype=np.int64)
    spent = int(cost[:, 0].sum())
    steps = 0
    while True:
        r = ratio[rows, cur]  # [n, nb]
        fits = dcost[rows, cur] <= capacity - spent
        r = np.where(fits & (r > 0), r, -np.inf)
        flat = int(np.argmax(r))  # first maximum in (item, width) order -> deterministic ties
        i, j = divmod(flat, nb)
        if not r[i, j] > 0:
            break
        spent += int(dcost[i, cur[i], j])
        cur[i] = j
        steps += 1
    return cur, spent, steps


def _layer_floor(head_idx: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """[L, H] per-head width indices -> [L]: the largest width costing <= the heads' mean cost."""
    H = head_idx.shape[1]
    total = cost[head_idx].sum(axis=1)  # [L]
    return np.array([int(np.flatnonzero(cost * H <= t).max()) for t in total], dtype=np.int64)


def _distortions(stats: KVStats, method: str, norm: str, widths: tuple[float, ...], per_head: bool,
                 rotations: tuple[str, ...], books: dict[str, tuple[bool, ...]]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Distortion of K and V at each width, [L, nb] each (or [L, H, nb] with per_head), and for
    the norm methods the factors c of e = c * 2^(-2b), [L] (or [L, H]); None for "sensitivity".
    "fisher" reads each layer's errors under its rotation (or codebook option, `books[kind]`); the other
    methods ignore rotations."""
    w = np.asarray([float(b) for b in widths])
    if method == "fisher" and per_head:
        raise KvqError("the fisher method allocates per layer (per-head Fisher errors are not measured)")
    if method == "fisher" and (stats.k_fisher_err is None or stats.v_fisher_err is None):
        raise KvqError("these stats have no Fisher errors (they need calibration windows longer than "
                       "sink + residual): analyze with a longer --context, or choose --method sensitivity")
    if method in _MEASURED:
        if method == "fisher":
            # each layer's keys and values read from the tables of their own rotation
            tables = []
            for kind, side in (("k", 0), ("v", 1)):
                rows = []
                for i, r in enumerate(rotations):
                    e = stats.fisher_err(kind, CODEBOOK_OPTIONS[kind] if books[kind][i] else split_rotation(r)[side])
                    if e is None:
                        raise KvqError(f"these stats have no Fisher errors of {split_rotation(r)[side]} "
                                       f"{'keys' if kind == 'k' else 'values'}: re-run the analysis to "
                                       "allocate for that rotation")
                    rows.append(e[i])
                tables.append(np.stack(rows))
            ke, ve = tables
        elif per_head:
            if stats.k_attn_err_head is None or stats.v_attn_err_head is None:
                raise KvqError("per-head sensitivity allocation needs k/v_attn_err_head in the stats")
            ke, ve = stats.k_attn_err_head, stats.v_attn_err_head
        else:
            ke, ve = stats.k_attn_err, stats.v_attn_err
        out = []
        for e in (ke, ve):
            cols = []
            for b in widths:
                j = stats.bit_index(b)
                cols.append(np.zeros(e.shape[:-1]) if j is None else e[..., j])  # only 16 unmeasured
            out.append(np.stack(cols, axis=-1))
        return out[0], out[1], None, None
    if method == "norm":
        kn, vn = (stats.k_fro, stats.v_fro) if norm == "fro" else (stats.k_spec, stats.v_spec)
    else:
        if per_head:
            kn, vn = (stats.wk_fro, stats.wv_fro) if norm == "fro" else (stats.wk_spec, stats.wv_spec)
        else:
            kn, vn = ((stats.wk_fro_layer, stats.wv_fro_layer) if norm == "fro"
                      else (stats.wk_spec_layer, stats.wv_spec_layer))
    kc, vc = np.square(kn), np.square(vn)
    if method == "norm" and not per_head:
        kc, vc = kc.sum(axis=1), vc.sum(axis=1)  # distortion adds up over heads
    g = 2.0 ** (-2.0 * w)
    return kc[..., None] * g, vc[..., None] * g, kc, vc


# The default cache's geometry is `KVPlan.uniform`'s: one home for the axes, groups and protocol.
_UNIFORM = inspect.signature(KVPlan.uniform).parameters
_GEOMETRY = {k: _UNIFORM[k].default
             for k in ("key_axis", "value_axis", "group_k", "group_v", "scale_dtype", "sink", "residual")}
# What the measured errors depend on: the quantizer's geometry, and for the Fisher errors the
# cache protocol too (which tokens stay full precision).
_MEASURED_UNDER = {"sensitivity": ("key_axis", "value_axis", "group_k", "group_v", "scale_dtype"),
                   "fisher": tuple(_GEOMETRY)}


def cache_geometry(stats: KVStats, method: str | Sequence[str], **given: object) -> dict:
    """The plan's cache geometry: each field as given, else as the statistics were measured (their
    `meta`), else the cache's default. A rule that reads measured errors refuses a field that differs
    from the one they were measured under: those errors would describe another cache. `method` may
    name several rules (plans of one geometry for each): any of them refuses."""
    meta = stats.meta or {}
    methods = (method,) if isinstance(method, str) else tuple(method)
    out = {}
    for name, default in _GEOMETRY.items():
        value = given.get(name)
        measured = meta.get(name)
        if value is None:
            value = default if measured is None else measured
        elif measured is not None and value != measured and (
                rule := next((m for m in methods if name in _MEASURED_UNDER.get(m, ())), None)):
            flag = "--" + name.replace("_", "-")
            raise KvqError(f"the statistics were measured with {name} {measured!r}, not {value!r}: the {rule} "
                           f"rule's errors hold only for that cache (drop {flag}, or re-run the analysis with it)")
        out[name] = value
    return out


def _widths(stats: KVStats, bits: tuple[float, ...] | None, method: str) -> tuple[float, ...]:
    """Validated, sorted, de-duplicated allowed widths."""
    if bits is None:
        bits = stats.bits_tuple
    try:
        ws = sorted({_num(float(b)) for b in bits})
    except (TypeError, ValueError):
        raise KvqError(f"widths must be numbers, got {bits!r}") from None
    if not ws:
        raise KvqError("no widths allowed")
    for b in ws:
        _spec(b, "token", 64)  # raises KvqError for a width the cache cannot store
        if method in _MEASURED and b != 16 and stats.bit_index(b) is None:
            raise KvqError(f"width {b} was not measured in the stats (measured: "
                           f"{', '.join(str(x) for x in stats.bits_tuple)})")
    return tuple(ws)


def _spec(b: float, axis: str, group: int) -> QuantSpec:
    try:
        return QuantSpec(bits=_num(b), axis=axis, group=group)
    except KvqError:
        raise
    except (TypeError, ValueError) as e:
        raise KvqError(f"bad quantization spec bits={b} axis={axis} group={group}: {e}") from None


def _budget_fraction(budget: float) -> Fraction:
    """The budget as an exact rational: the simplest fraction within 1e-12 (relative) of the float,
    so 2.3, 1.58 or 8/3 mean exactly that (float rounding must not drop an upgrade)."""
    exact = Fraction(budget)
    simple = exact.limit_denominator(10**6)
    return simple if abs(simple - exact) <= exact * Fraction(1, 10**12) else exact


def _cost(spec: QuantSpec, count_overhead: bool, scale_dtype: str) -> Fraction:
    """Exact cost in bits per element: nominal width, or storage + scale/zero overhead."""
    if not count_overhead:
        return Fraction(repr(float(spec.bits)))
    # storage (32/P) and overhead (2*16/group) are small-denominator rationals: recover them exactly
    storage = Fraction(float(spec.storage_bits)).limit_denominator(10_000)
    over = Fraction(float(spec.overhead_bits(scale_dtype))).limit_denominator(10_000)
    return storage + over
