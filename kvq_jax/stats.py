"""`KVStats`: per-layer / per-head K/V statistics (norms, spectra, quantization and attention errors).

Produced by `kvq_jax.analysis`, consumed by `kvq_jax.allocate` and `kvq_jax.report`. Stored as one
`.npz` (arrays only, no pickle) whose `meta` entry is a JSON string.

Shapes: L layers, H KV heads, D head_dim, nb candidate widths.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from typing import Any

import numpy as np

from kvq_jax.errors import KvqError
from kvq_jax.codebook import MAX_LEVELS
from kvq_jax.plan import CODEBOOK_BITS, KEY_ROTATIONS, VALUE_ROTATIONS
from kvq_jax.quant import qmax

DEFAULT_BITS: tuple[float, ...] = (1, 1.58, 2, 3, 4, 6, 8)

# name -> shape as a tuple of dimension letters ("L", "H", "D", "B" = nb).
_SHAPES: dict[str, tuple[str, ...]] = {
    "bits": ("B",),
    "k_fro": ("L", "H"),
    "k_spec": ("L", "H"),
    "v_fro": ("L", "H"),
    "v_spec": ("L", "H"),
    "k_sv": ("L", "H", "D"),
    "v_sv": ("L", "H", "D"),
    "wk_fro": ("L", "H"),
    "wk_spec": ("L", "H"),
    "wv_fro": ("L", "H"),
    "wv_spec": ("L", "H"),
    "wk_fro_layer": ("L",),
    "wk_spec_layer": ("L",),
    "wv_fro_layer": ("L",),
    "wv_spec_layer": ("L",),
    "k_qerr": ("L", "H", "B"),
    "v_qerr": ("L", "H", "B"),
    "k_attn_err": ("L", "B"),
    "v_attn_err": ("L", "B"),
    # optional (may be None)
    "k_fro_prerope": ("L", "H"),
    "k_spec_prerope": ("L", "H"),
    "k_sv_prerope": ("L", "H", "D"),
    "k_attn_err_head": ("L", "H", "B"),
    "v_attn_err_head": ("L", "H", "B"),
    "k_fisher_err": ("L", "B"),
    "v_fisher_err": ("L", "B"),
    "k_fisher_err_hadamard": ("L", "B"),
    "v_fisher_err_hadamard": ("L", "B"),
    "k_fisher_err_prerope": ("L", "B"),
    "k_fisher_err_prerope_codebook": ("L", "B"),
    "k_levels_prerope": ("L", "B", "C"),
    "v_fisher_err_hadamard_codebook": ("L", "B"),
    "v_levels_hadamard": ("L", "B", "C"),
}
OPTIONAL = ("k_fro_prerope", "k_spec_prerope", "k_sv_prerope", "k_attn_err_head", "v_attn_err_head",
            "k_fisher_err", "v_fisher_err", "k_fisher_err_hadamard", "v_fisher_err_hadamard",
            "k_fisher_err_prerope", "k_fisher_err_prerope_codebook", "k_levels_prerope",
            "v_fisher_err_hadamard_codebook", "v_levels_hadamard")
# Keys stored before RoPE, and values after the Hadamard rotation, with the layer's learned codebook:
# one more option of each tensor beside its rotations (where the quantizer screen found codebooks win).
PREROPE_CODEBOOK = "prerope+codebook"
HADAMARD_CODEBOOK = "hadamard+codebook"
KEY_OPTIONS = KEY_ROTATIONS + (PREROPE_CODEBOOK,)
VALUE_OPTIONS = VALUE_ROTATIONS + (HADAMARD_CODEBOOK,)
CODEBOOK_OPTIONS = {"k": PREROPE_CODEBOOK, "v": HADAMARD_CODEBOOK}
CODEBOOK_BASE = {"k": "prerope", "v": "hadamard"}  # the rotation each codebook option stores its tensor with


@dataclasses.dataclass(eq=False)
class KVStats:
    """Calibration statistics of one model's KV cache (all arrays float64, validated on creation).

    bits [nb]: candidate widths, strictly increasing.
    k_fro, k_spec, v_fro, v_spec [L, H]: Frobenius / spectral norm of each head's K (after RoPE) / V
        over the calibration tokens; k_fro_prerope, k_spec_prerope [L, H]: keys before RoPE.
    k_sv, v_sv, k_sv_prerope [L, H, D]: singular values, descending.
    wk_*, wv_* [L, H]: norms of each head's slice of W_K / W_V; wk_*_layer, wv_*_layer [L]: whole matrix.
    k_qerr, v_qerr [L, H, nb]: ||Q(X) - X||_F^2 / ||X||_F^2 at each width.
    k_attn_err, v_attn_err [L, nb]: normalised MSE of the layer's attention output when only its keys
        (resp. values) are quantized; k_attn_err_head, v_attn_err_head [L, H, nb]: the same per head.
    k_fisher_err, v_fisher_err [L, nb]: Fisher-weighted attention-output error under the cache
        protocol, in nats per calibration window (optional; see kvq_jax.fisher);
        k_fisher_err_hadamard, v_fisher_err_hadamard [L, nb]: the same for Hadamard-rotated keys and
        values; k_fisher_err_prerope [L, nb]: for keys stored before RoPE;
        k_fisher_err_prerope_codebook [L, nb]: before RoPE with the codebooks k_levels_prerope
        [L, nb, 16] (each width's levels first, zero-padded; widths without a codebook: uniform
        codes, all-zero rows); v_fisher_err_hadamard_codebook [L, nb] and v_levels_hadamard
        [L, nb, 16]: the same for values after the Hadamard rotation. `fisher_err(kind, option)`
        reads them by the tensor's rotation or option.
    meta: JSON-able dict (model, n_layers, n_kv_heads, head_dim, bits, calib_file, calib_windows,
        calib_tokens, key_axis, value_axis, group_k, group_v).
    """

    bits: np.ndarray
    k_fro: np.ndarray
    k_spec: np.ndarray
    v_fro: np.ndarray
    v_spec: np.ndarray
    k_sv: np.ndarray
    v_sv: np.ndarray
    wk_fro: np.ndarray
    wk_spec: np.ndarray
    wv_fro: np.ndarray
    wv_spec: np.ndarray
    wk_fro_layer: np.ndarray
    wk_spec_layer: np.ndarray
    wv_fro_layer: np.ndarray
    wv_spec_layer: np.ndarray
    k_qerr: np.ndarray
    v_qerr: np.ndarray
    k_attn_err: np.ndarray
    v_attn_err: np.ndarray
    k_fro_prerope: np.ndarray | None = None
    k_spec_prerope: np.ndarray | None = None
    k_sv_prerope: np.ndarray | None = None
    k_attn_err_head: np.ndarray | None = None
    v_attn_err_head: np.ndarray | None = None
    k_fisher_err: np.ndarray | None = None
    v_fisher_err: np.ndarray | None = None
    k_fisher_err_hadamard: np.ndarray | None = None
    v_fisher_err_hadamard: np.ndarray | None = None
    k_fisher_err_prerope: np.ndarray | None = None
    k_fisher_err_prerope_codebook: np.ndarray | None = None
    k_levels_prerope: np.ndarray | None = None
    v_fisher_err_hadamard_codebook: np.ndarray | None = None
    v_levels_hadamard: np.ndarray | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in _SHAPES:
            val = getattr(self, name)
            if val is None:
                if name not in OPTIONAL:
                    raise KvqError(f"KV stats: missing array {name!r}")
                continue
            try:
                arr = np.asarray(val, dtype=np.float64)
            except (TypeError, ValueError):
                raise KvqError(f"KV stats: array {name!r} is not numeric") from None
            setattr(self, name, arr)
        if not isinstance(self.meta, dict):
            raise KvqError("KV stats: meta must be a dict")
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        if self.k_sv.ndim != 3:
            raise KvqError(f"KV stats: k_sv must be [L, H, D], got shape {self.k_sv.shape}")
        if self.bits.ndim != 1:
            raise KvqError(f"KV stats: bits must be 1-D, got shape {self.bits.shape}")
        dims = dict(zip("LHD", self.k_sv.shape))
        dims["B"] = self.bits.shape[0]
        dims["C"] = MAX_LEVELS
        if min(dims.values()) < 1:
            raise KvqError(f"KV stats: empty dimension in {dims}")
        for name, letters in _SHAPES.items():
            arr = getattr(self, name)
            if arr is None:
                continue
            want = tuple(dims[c] for c in letters)
            if arr.shape != want:
                raise KvqError(f"KV stats: {name} has shape {arr.shape}, expected {want}")
            if not np.all(np.isfinite(arr)):
                raise KvqError(f"KV stats: {name} has non-finite values")
            if np.any(arr < 0):
                raise KvqError(f"KV stats: {name} has negative values")
        if np.any(np.diff(self.bits) <= 0):
            raise KvqError(f"KV stats: bits must be strictly increasing, got {self.bits.tolist()}")
        if self.bits[0] <= 0:
            raise KvqError("KV stats: bits must be positive")
        for name in ("k_sv", "v_sv", "k_sv_prerope"):
            sv = getattr(self, name)
            # small tolerance: SVDs in float32 can be non-monotone by rounding
            if sv is not None and np.any(np.diff(sv, axis=-1) > 1e-5 * sv[..., :1] + 1e-12):
                raise KvqError(f"KV stats: {name} singular values are not descending")
        for err, table in (("k_fisher_err_prerope_codebook", "k_levels_prerope"),
                           ("v_fisher_err_hadamard_codebook", "v_levels_hadamard")):
            if (getattr(self, err) is None) != (getattr(self, table) is None):
                raise KvqError(f"KV stats: {err} and {table} come together (one is missing)")
        for key, val in (("n_layers", dims["L"]), ("n_kv_heads", dims["H"]), ("head_dim", dims["D"])):
            if key in self.meta and self.meta[key] is not None and int(self.meta[key]) != val:
                raise KvqError(f"KV stats: meta {key}={self.meta[key]} but arrays have {val}")

    # ------------------------------------------------------------------ shape / names
    @property
    def n_layers(self) -> int:
        return int(self.k_sv.shape[0])

    @property
    def n_heads(self) -> int:
        """KV heads per layer."""
        return int(self.k_sv.shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.k_sv.shape[2])

    @property
    def model_name(self) -> str | None:
        name = self.meta.get("model")
        return None if name is None else str(name)

    @property
    def bits_tuple(self) -> tuple[float, ...]:
        """Candidate widths as Python numbers (ints where integral, so 4 not 4.0)."""
        return tuple(canonical_bits(b) for b in self.bits)

    def bit_index(self, b: float) -> int | None:
        """Index of width `b` in `bits`, or None when it was not measured."""
        hit = np.flatnonzero(np.isclose(self.bits, b, rtol=0, atol=1e-9))
        return int(hit[0]) if hit.size else None

    def fisher_err(self, kind: str, rotation: str = "none") -> np.ndarray | None:
        """`[L, nb]` Fisher errors of the keys ("k") or values ("v") stored with `rotation` (one of
        `KEY_OPTIONS` / `VALUE_OPTIONS`); None if not measured."""
        allowed = KEY_OPTIONS if kind == "k" else VALUE_OPTIONS
        if rotation not in allowed:
            raise KvqError(f"{'keys' if kind == 'k' else 'values'} have no rotation {rotation!r}")
        name = rotation.replace("+", "_")
        return getattr(self, f"{kind}_fisher_err" + ("" if rotation == "none" else f"_{name}"))

    def fisher_rotations(self, kind: str) -> tuple[str, ...]:
        """The rotations (key options) of the keys ("k") or values ("v") whose Fisher errors these
        stats hold."""
        allowed = KEY_OPTIONS if kind == "k" else VALUE_OPTIONS
        return tuple(r for r in allowed if self.fisher_err(kind, r) is not None)

    def levels(self, kind: str, layer: int, bits: float) -> tuple[float, ...] | None:
        """The learned codebook of `layer`'s pre-RoPE keys ("k") or Hadamard-rotated values ("v") at
        width `bits`; None where none was learned."""
        if kind not in ("k", "v"):
            raise KvqError(f"levels of 'k' or 'v', got {kind!r}")
        table = self.k_levels_prerope if kind == "k" else self.v_levels_hadamard
        j = self.bit_index(bits)
        if table is None or j is None or bits not in CODEBOOK_BITS:
            return None
        return tuple(float(x) for x in table[layer, j, :qmax(bits) + 1])

    # ------------------------------------------------------------------ per-layer norms
    # Per-layer activation norms are root-sum-squares over heads. For Frobenius this is exact; for the
    # spectral norm it is the additive per-head proxy (quantization distortion adds up over heads), not
    # the spectral norm of the concatenated heads.
    @property
    def k_fro_layer(self) -> np.ndarray:
        """[L]"""
        return _rss(self.k_fro)

    @property
    def k_spec_layer(self) -> np.ndarray:
        """[L] root-sum-square of the per-head spectral norms."""
        return _rss(self.k_spec)

    @property
    def v_fro_layer(self) -> np.ndarray:
        """[L]"""
        return _rss(self.v_fro)

    @property
    def v_spec_layer(self) -> np.ndarray:
        """[L] root-sum-square of the per-head spectral norms."""
        return _rss(self.v_spec)

    # ------------------------------------------------------------------ I/O
    def save(self, path: str | os.PathLike) -> None:
        """Write one `.npz` at exactly `path` (atomically: temp file + rename)."""
        meta = dict(self.meta)
        meta.update(n_layers=self.n_layers, n_kv_heads=self.n_heads, head_dim=self.head_dim,
                    bits=[float(b) for b in self.bits])
        try:
            meta_json = json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise KvqError(f"KV stats: meta is not JSON-serialisable: {e}") from None
        arrays = {n: getattr(self, n) for n in _SHAPES if getattr(self, n) is not None}
        tmp = f"{os.fspath(path)}.tmp"
        try:
            with open(tmp, "wb") as f:
                np.savez(f, meta=np.array(meta_json), **arrays)
            os.replace(tmp, path)
        except OSError as e:
            raise KvqError(f"cannot write KV stats to {path}: {e.strerror or e}") from None

    def check_reuse(self, path: str | os.PathLike, model_name: str, n_layers: int,
                    score_from: int | None = None) -> None:
        """Refuse statistics saved at `path` for another model, or measured with another `score_from`
        (None: any) than the one asked for; KvqError (one line)."""
        if self.model_name != model_name or self.n_layers != n_layers:
            raise KvqError(f"{path} holds statistics of {self.model_name!r}, not {model_name!r}")
        measured = self.meta.get("score_from", 0)
        if score_from is not None and score_from != measured:
            raise KvqError(f"{path} was measured with --score-from {measured}, not {score_from} "
                           "(drop --score-from, or write new statistics)")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "KVStats":
        """Read and validate a file written by `save`; any problem -> KvqError (one line)."""
        if not os.path.isfile(path):
            raise KvqError(f"KV stats file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                names = set(z.files)
                if "meta" not in names:
                    raise KvqError(f"{path}: not a KV stats file (no meta entry)")
                meta = json.loads(str(z["meta"][()]))
                if not isinstance(meta, dict):
                    raise KvqError(f"{path}: meta is not a JSON object")
                missing = [n for n in _SHAPES if n not in OPTIONAL and n not in names]
                if missing:
                    raise KvqError(f"{path}: KV stats file lacks {', '.join(missing)}")
                # unknown entries are ignored so newer files still load
                arrays = {n: np.array(z[n]) for n in _SHAPES if n in names}
        except KvqError:
            raise
        except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise KvqError(f"{path}: corrupt or unreadable KV stats file ({msg})") from None
        try:
            return cls(meta=meta, **arrays)
        except KvqError as e:
            raise KvqError(f"{path}: {e}") from None


def _rss(x: np.ndarray) -> np.ndarray:
    """Root-sum-square over the head axis: [L, H] -> [L]."""
    return np.sqrt(np.sum(np.square(x), axis=1))


def canonical_bits(b: float) -> float:
    """4.0 -> 4, 1.58 -> 1.58 (nicer JSON / labels; equal and same hash either way)."""
    b = float(b)
    return int(b) if b.is_integer() else b


def synthetic_stats(L: int = 4, H: int = 2, D: int = 16, seed: int = 0, *,
                    bits: tuple[float, ...] = DEFAULT_BITS, key_scale: float = 6.0,
                    model: str = "synthetic") -> KVStats:
    """Random but seeded, self-consistent stats for tests: keys ~`key_scale`x larger than values.

    Singular values follow a power law per head; norms are derived from them; errors scale as
    4^-b (times per-layer factors and mild noise) so they are monotone in the width.
    """
    rng = np.random.default_rng(seed)
    b = np.asarray(bits, dtype=np.float64)
    idx = np.arange(1, D + 1, dtype=np.float64)

    def spectra(scale: np.ndarray) -> np.ndarray:
        decay = rng.uniform(0.3, 1.2, size=(L, H, 1))
        return scale[:, :, None] * idx[None, None, :] ** (-decay)  # [L, H, D] descending

    k_scale = key_scale * rng.lognormal(0.0, 0.4, size=(L, H))
    v_scale = rng.lognormal(0.0, 0.4, size=(L, H))
    k_sv, v_sv = spectra(k_scale), spectra(v_scale)
    k_sv_pre = -np.sort(-k_sv * rng.uniform(0.9, 1.1, size=k_sv.shape), axis=-1)

    def fro(sv: np.ndarray) -> np.ndarray:
        return np.sqrt(np.sum(sv**2, axis=-1))

    wk_fro = rng.uniform(5.0, 15.0, size=(L, H))
    wv_fro = rng.uniform(3.0, 10.0, size=(L, H))
    wk_spec = wk_fro * rng.uniform(0.2, 0.6, size=(L, H))
    wv_spec = wv_fro * rng.uniform(0.2, 0.6, size=(L, H))

    def w_spec_layer(spec: np.ndarray) -> np.ndarray:
        return np.minimum(spec.max(axis=1) * 1.1, _rss(spec))

    decay_b = 4.0 ** (-b)  # [nb]
    k_q = rng.uniform(0.5, 1.5, size=(L, H, 1)) * decay_b * rng.uniform(0.95, 1.05, size=(L, H, len(b)))
    v_q = rng.uniform(0.5, 1.5, size=(L, H, 1)) * decay_b * rng.uniform(0.95, 1.05, size=(L, H, len(b)))

    k_share = fro(k_sv) ** 2 / np.sum(fro(k_sv) ** 2, axis=1, keepdims=True)  # [L, H]
    v_share = fro(v_sv) ** 2 / np.sum(fro(v_sv) ** 2, axis=1, keepdims=True)
    ck = np.sum(fro(k_sv) ** 2, axis=1)
    cv = np.sum(fro(v_sv) ** 2, axis=1)
    ref = np.mean(ck)
    sk = 2.0 * ck / ref * rng.lognormal(0.0, 0.3, size=L)  # [L]
    sv_ = 2.0 * cv / ref * rng.lognormal(0.0, 0.3, size=L)
    k_attn = sk[:, None] * decay_b[None, :]
    v_attn = sv_[:, None] * decay_b[None, :]
    # loss-weighted errors: the attention errors times a per-layer loss weight
    k_fisher = k_attn * rng.lognormal(0.0, 0.5, size=(L, 1))
    v_fisher = v_attn * rng.lognormal(0.0, 0.5, size=(L, 1))
    return KVStats(
        bits=b, k_fro=fro(k_sv), k_spec=k_sv[..., 0], v_fro=fro(v_sv), v_spec=v_sv[..., 0],
        k_sv=k_sv, v_sv=v_sv, wk_fro=wk_fro, wk_spec=wk_spec, wv_fro=wv_fro, wv_spec=wv_spec,
        wk_fro_layer=_rss(wk_fro), wk_spec_layer=w_spec_layer(wk_spec),
        wv_fro_layer=_rss(wv_fro), wv_spec_layer=w_spec_layer(wv_spec),
        k_qerr=k_q, v_qerr=v_q, k_attn_err=k_attn, v_attn_err=v_attn,
        k_fisher_err=k_fisher, v_fisher_err=v_fisher,
        k_fro_prerope=fro(k_sv_pre), k_spec_prerope=k_sv_pre[..., 0], k_sv_prerope=k_sv_pre,
        k_attn_err_head=k_attn[:, None, :] * k_share[:, :, None] * H,
        v_attn_err_head=v_attn[:, None, :] * v_share[:, :, None] * H,
        meta={"model": model, "n_layers": L, "n_kv_heads": H, "head_dim": D,
              "bits": [float(x) for x in b], "calib_file": "synthetic", "calib_windows": 0,
              "calib_tokens": 0, "key_axis": "channel", "value_axis": "token",
              "group_k": 64, "group_v": 64},
    )
