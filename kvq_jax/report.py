"""Figures (matplotlib, Agg canvas, PNG) and a Markdown report of `KVStats` and allocated plans.

No pyplot: figures are built on `matplotlib.figure.Figure` with an explicit Agg canvas, so nothing
touches matplotlib's global backend/figure state and it runs headless.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kvq_jax.errors import KvqError
from kvq_jax.plan import KVPlan
from kvq_jax.stats import KVStats, canonical_bits

MARKER = ".kvq_report"
# only these names are ever deleted when a previous report is overwritten
_OUTPUTS = ("spectra.png", "norms.png", "bits.png", "qerr.png", "report.md")
_K, _V = "tab:blue", "tab:orange"


def write_report(stats: KVStats, out_dir: str | os.PathLike, plans: dict[str, KVPlan] | None = None,
                 skip_top: int = 0) -> Path:
    """Write spectra.png, norms.png, qerr.png, bits.png (only when `plans` are given) and report.md
    into `out_dir`; return the path of report.md.

    skip_top: number of largest singular values left out of the spectra (they dwarf the tail).
    Refuses (KvqError) to write into an existing non-empty directory that lacks the marker file of
    a previous report; a previous report's outputs are replaced.
    """
    plans = dict(plans or {})
    L, D = stats.n_layers, stats.head_dim
    if not isinstance(skip_top, int) or not 0 <= skip_top < D:
        raise KvqError(f"skip_top must be an integer in [0, {D - 1}], got {skip_top!r}")
    for name, plan in plans.items():
        if not isinstance(plan, KVPlan):
            raise KvqError(f"plan {name!r} is not a KVPlan")
        if len(plan.keys) != L or len(plan.values) != L:
            raise KvqError(f"plan {name!r} has {len(plan.keys)} layers, the stats have {L}")
    out = Path(out_dir)
    _prepare(out)
    try:
        _spectra(stats, skip_top).savefig(out / "spectra.png", dpi=110)
        _norms(stats).savefig(out / "norms.png", dpi=110)
        _qerr(stats).savefig(out / "qerr.png", dpi=110)
        if plans:
            _bits(plans, L).savefig(out / "bits.png", dpi=110)
        md = out / "report.md"
        md.write_text(_markdown(stats, plans, skip_top))
    except OSError as e:
        raise KvqError(f"cannot write report to {out}: {e.strerror or e}") from None
    return md


def norm_summary(stats: KVStats, kind: str = "fro") -> str:
    """One line, e.g. 'key Frobenius norm > value norm in 30/30 layers (median ratio 7.3x)'."""
    k, v = (stats.k_fro_layer, stats.v_fro_layer) if kind == "fro" else (stats.k_spec_layer,
                                                                           stats.v_spec_layer)
    ratio = _ratio(k, v)
    fin = ratio[np.isfinite(ratio)]
    med = f"{np.median(fin):.1f}x" if fin.size else "n/a"
    label = "Frobenius" if kind == "fro" else "spectral"
    return (f"key {label} norm > value norm in {int(np.sum(k > v))}/{stats.n_layers} layers "
            f"(median ratio {med})")


# ---------------------------------------------------------------------------- output directory
def _prepare(out: Path) -> None:
    """Create `out`, or check it is empty / a previous report (then remove that report's outputs)."""
    try:
        if out.exists():
            if not out.is_dir():
                raise KvqError(f"report path {out} exists and is not a directory")
            if any(out.iterdir()) and not (out / MARKER).is_file():
                raise KvqError(f"refusing to overwrite {out}: non-empty and not written by kvq_jax.report")
            for name in _OUTPUTS:  # stale outputs (e.g. bits.png from a run with plans) must go
                (out / name).unlink(missing_ok=True)
        else:
            out.mkdir(parents=True)
        # the marker goes first so that an interrupted report can be rewritten
        (out / MARKER).write_text(json.dumps({"written_by": "kvq_jax.report", "files": list(_OUTPUTS)}))
    except OSError as e:
        raise KvqError(f"cannot prepare report directory {out}: {e.strerror or e}") from None


# ---------------------------------------------------------------------------- figures
def figure(w: float, h: float) -> Figure:
    """A `w` x `h`-inch figure on its own Agg canvas (the project's one way to draw a PNG)."""
    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)  # explicit Agg canvas: headless, no global backend
    return fig


def _spectra(stats: KVStats, skip_top: int) -> Figure:
    """Per layer: K and V singular-value spectra, mean over heads with a min-max band. [L panels]"""
    L, D = stats.n_layers, stats.head_dim
    ncols = min(L, 6)
    nrows = math.ceil(L / ncols)
    fig = figure(2.3 * ncols, 1.9 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    x = np.arange(skip_top + 1, D + 1)
    floor = max(float(max(stats.k_sv.max(), stats.v_sv.max())) * 1e-9, 1e-30)  # log axis: no zeros
    for layer in range(nrows * ncols):
        ax = axes[layer // ncols, layer % ncols]
        if layer >= L:
            ax.set_visible(False)
            continue
        for sv, color, label in ((stats.k_sv, _K, "K"), (stats.v_sv, _V, "V")):
            s = np.maximum(sv[layer, :, skip_top:], floor)  # [H, D - skip_top]
            ax.fill_between(x, s.min(axis=0), s.max(axis=0), color=color, alpha=0.25, lw=0)
            ax.plot(x, s.mean(axis=0), color=color, lw=1.2, label=label)
        ax.set_yscale("log")
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    skipped = f", top {skip_top} skipped" if skip_top else ""
    fig.suptitle(f"singular values of K (after RoPE) and V per layer: mean over heads, min-max band"
                 f"{skipped}", fontsize=10)
    fig.supxlabel("index", fontsize=8)
    return fig


def _norms(stats: KVStats) -> Figure:
    """Two panels: per-layer Frobenius and spectral norms of K vs V."""
    fig = figure(10, 3.6)
    axes = fig.subplots(1, 2, sharex=True)
    x = np.arange(stats.n_layers)
    pre = {"fro": stats.k_fro_prerope, "spec": stats.k_spec_prerope}
    for ax, kind, title in ((axes[0], "fro", "Frobenius norm"),
                            (axes[1], "spec", "spectral norm (root-sum-square over heads)")):
        k = getattr(stats, f"k_{kind}_layer")
        v = getattr(stats, f"v_{kind}_layer")
        ax.plot(x, k, "o-", color=_K, ms=3, label="K (after RoPE)")
        if pre[kind] is not None:
            ax.plot(x, np.sqrt(np.sum(pre[kind] ** 2, axis=1)), "--", color=_K, lw=1, label="K (before RoPE)")
        ax.plot(x, v, "s-", color=_V, ms=3, label="V")
        if np.all(k > 0) and np.all(v > 0):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer")
        ax.legend(fontsize=8)
    return fig


def _qerr(stats: KVStats) -> Figure:
    """Relative quantization error vs width (mean over layers, band over layers), and the
    attention-output error when only K or only V is quantized."""
    fig = figure(10, 3.6)
    axes = fig.subplots(1, 2, sharex=True)
    b = stats.bits
    panels = ((axes[0], stats.k_qerr.mean(axis=1), stats.v_qerr.mean(axis=1),
               "relative quantization error ||Q(X)-X||² / ||X||²"),
              (axes[1], stats.k_attn_err, stats.v_attn_err, "attention-output error (one of K/V quantized)"))
    for ax, k, v, title in panels:  # k, v: [L, nb]
        for e, color, label, mark in ((k, _K, "K", "o-"), (v, _V, "V", "s-")):
            ax.fill_between(b, e.min(axis=0), e.max(axis=0), color=color, alpha=0.2, lw=0)
            ax.plot(b, e.mean(axis=0), mark, color=color, ms=3, label=f"{label} (mean over layers)")
        if np.all(k > 0) and np.all(v > 0):
            ax.set_yscale("log")
        ax.set_xticks(b, [str(canonical_bits(x)) for x in b])
        ax.set_xlabel("bits")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    return fig


def _bits(plans: dict[str, KVPlan], L: int) -> Figure:
    """One row per plan: bits per layer for keys and values (grouped bars)."""
    fig = figure(max(6.0, 0.25 * L + 2), 2.2 * len(plans) + 0.4)
    axes = fig.subplots(len(plans), 1, squeeze=False, sharex=True, sharey=True)[:, 0]
    x = np.arange(L)
    for ax, (name, plan) in zip(axes, plans.items()):
        kb, vb = _plan_bits(plan)
        ax.bar(x - 0.2, kb, width=0.4, color=_K, label="K")
        ax.bar(x + 0.2, vb, width=0.4, color=_V, label="V")
        ax.set_title(f"{name}: mean K {kb.mean():.2f}, V {vb.mean():.2f} bits", fontsize=9)
        ax.set_ylabel("bits")
        ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("layer")
    return fig


# ---------------------------------------------------------------------------- markdown
def _markdown(stats: KVStats, plans: dict[str, KVPlan], skip_top: int) -> str:
    m = stats.meta
    model = stats.model_name or "unknown model"
    lines = [f"# KV cache analysis: {model}", ""]
    lines.append(f"{stats.n_layers} layers, {stats.n_heads} KV heads, head_dim {stats.head_dim}; "
                 f"widths {', '.join(str(b) for b in stats.bits_tuple)}.")
    calib = [f"{k.removeprefix('calib_')}={m[k]}" for k in ("calib_file", "calib_windows", "calib_tokens")
             if m.get(k) is not None]
    setup = [f"{k}={m[k]}" for k in ("key_axis", "value_axis", "group_k", "group_v") if m.get(k) is not None]
    if calib:
        lines.append(f"Calibration: {', '.join(calib)}.")
    if setup:
        lines.append(f"Quantizer: {', '.join(setup)}.")
    lines += ["", f"**Summary:** {norm_summary(stats, 'fro')}; {norm_summary(stats, 'spec')}.", ""]
    skipped = f" (largest {skip_top} skipped)" if skip_top else ""
    lines += [f"## Singular-value spectra{skipped}", "", "![spectra](spectra.png)", "",
              "## Norms", "", "![norms](norms.png)", "",
              "## Quantization error", "", "![qerr](qerr.png)", ""]
    if plans:
        lines += ["## Bits per layer", "", "![bits](bits.png)", ""]
        for name, plan in plans.items():
            kb, vb = _plan_bits(plan)
            note = f" — {plan.note}" if plan.note else ""
            lines.append(f"- `{name}`: mean K {kb.mean():.3g}, V {vb.mean():.3g} bits{note}")
        lines.append("")
    lines += ["## Per layer", "",
              "Spectral norms per layer are root-sum-squares of the per-head spectral norms.", ""]
    kf, vf, ks, vs = stats.k_fro_layer, stats.v_fro_layer, stats.k_spec_layer, stats.v_spec_layer
    rf, rs = _ratio(kf, vf), _ratio(ks, vs)
    names = [n.replace("|", "\\|") for n in plans]
    head = ["layer", "‖K‖F", "‖V‖F", "K/V (F)", "‖K‖2", "‖V‖2", "K/V (2)"]
    head += [f"{n} K/V bits" for n in names]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pbits = [_plan_bits(p) for p in plans.values()]
    for layer in range(stats.n_layers):
        row = [str(layer), f"{kf[layer]:.4g}", f"{vf[layer]:.4g}", f"{rf[layer]:.2f}",
               f"{ks[layer]:.4g}", f"{vs[layer]:.4g}", f"{rs[layer]:.2f}"]
        row += [f"{canonical_bits(kb[layer])}/{canonical_bits(vb[layer])}" for kb, vb in pbits]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _plan_bits(plan: KVPlan) -> tuple[np.ndarray, np.ndarray]:
    """[L] key widths, [L] value widths."""
    return (np.array([float(s.bits) for s in plan.keys]), np.array([float(s.bits) for s in plan.values]))


def _ratio(k: np.ndarray, v: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(v > 0, k / np.where(v > 0, v, 1.0), np.inf)
