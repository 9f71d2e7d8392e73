"""Static bit plans: per-layer K/V quantization specs, hashable so a plan can be a jit static argument.

`QuantSpec` says how one tensor (K or V of one layer) is stored, `KVPlan` holds one spec per layer for
keys and values plus the cache geometry (sink, residual window, rotation, scale dtype), and `parse_kv`
turns a `--kv` option (`fp`, `bf16`, `K4V2`, or a plan file) into a `KVPlan` or `DenseKV`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import numbers
import os
import re
from typing import Any, Mapping, Sequence

import yaml

from kvq_jax.config import ModelConfig
from kvq_jax.errors import KvqError
from kvq_jax.packing import digits_per_word
from kvq_jax.quant import qmax

VALID_BITS = (1, 1.58, 2, 3, 4, 5, 6, 8, 16)
TOKEN_GROUPS = (32, 64, 128)
CHANNEL_GROUPS = (16, 32, 64, 128)
# How a layer's cached keys and values are rotated before quantization. Keys: not at all, by an
# orthonormal Hadamard matrix, or stored before RoPE ("prerope", KVQuant: per-channel key ranges are
# steadier before the position-dependent rotation; RoPE is applied again after dequantization).
# Values: not at all or Hadamard. A layer's rotation is one name for both sides ("hadamard": both;
# "prerope": keys before RoPE, values as they are) or "KEYS/VALUES" (e.g. "prerope/hadamard").
KEY_ROTATIONS = ("none", "hadamard", "prerope")
VALUE_ROTATIONS = ("none", "hadamard")
ROTATIONS = ("none", "hadamard", "prerope")  # the one-name forms
_ROTATION_MSG = ("rotate must be none, hadamard, prerope or KEYS/VALUES (keys none|hadamard|prerope, "
                 "values none|hadamard)")


def split_rotation(name: str) -> tuple[str, str]:
    """A layer's rotation → (key rotation, value rotation); KvqError for a bad name."""
    if isinstance(name, str) and name in ROTATIONS:
        return name, ("none" if name == "prerope" else name)
    parts = name.split("/") if isinstance(name, str) else []
    if len(parts) != 2 or parts[0] not in KEY_ROTATIONS or parts[1] not in VALUE_ROTATIONS:
        raise KvqError(f"{_ROTATION_MSG}, got {name!r}")
    return parts[0], parts[1]


def join_rotation(keys: str, values: str) -> str:
    """(key rotation, value rotation) → the layer's rotation, in its one-name form when it has one."""
    for name in ROTATIONS:
        if split_rotation(name) == (keys, values):
            return name
    pair = f"{keys}/{values}"
    split_rotation(pair)  # validates both sides
    return pair


SCALE_DTYPES = ("bfloat16", "float32")
# The sink and recent window: in the model's compute dtype, or always in this one.
WINDOW_DTYPES = ("compute", "bfloat16", "float32")
DENSE_DTYPES = ("float32", "bfloat16")
DEFAULT_BLOCK = 64

_BITS_MSG = "bits must be one of " + ", ".join(map(str, VALID_BITS))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _fmt_bits(bits: float) -> str:
    return str(int(bits)) if float(bits).is_integer() else f"{bits:g}"


def _parse_bits(text: str) -> float:
    try:
        b = float(text)
    except ValueError:
        raise KvqError(f"{_BITS_MSG}, got {text!r}") from None
    if b not in VALID_BITS:
        raise KvqError(f"{_BITS_MSG}, got {text!r}")
    return 1.58 if b == 1.58 else int(b)


def _check_int(name: str, v: Any, lo: int = 0) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise KvqError(f"{name} must be an int >= {lo}, got {v!r}")


# Widths that may carry a learned codebook: 1 bit has only its two fixed ends, and from 5 bits on a
# table of 32+ levels buys nothing over uniform codes (and a select chain that long in the kernels).
CODEBOOK_BITS = (1.58, 2, 3, 4)


def _canonical_levels(levels: Any, bits: float) -> tuple[float, ...] | None:
    """A codebook as a tuple of floats, validated; None for none (or for the uniform levels)."""
    if levels is None:
        return None
    if bits not in CODEBOOK_BITS:
        raise KvqError(f"codebooks are supported at {', '.join(map(str, CODEBOOK_BITS))} bits, not {bits}")
    qm = qmax(bits)
    try:
        if isinstance(levels, (str, bytes, Mapping)):
            raise TypeError
        lv = tuple(float(x) for x in levels)
    except (TypeError, ValueError):
        raise KvqError(f"codebook levels must be a list of numbers, got {levels!r}") from None
    if len(lv) != qm + 1 or lv[0] != 0 or lv[-1] != qm or any(b <= a for a, b in zip(lv, lv[1:])) \
            or not all(map(math.isfinite, lv)):
        raise KvqError(f"a {_fmt_bits(bits)}-bit codebook needs {qm + 1} increasing levels from 0 to {qm}, "
                       f"got {list(levels)!r}")
    return None if lv == tuple(float(i) for i in range(qm + 1)) else lv


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one tensor is stored: `bits` (16 = dense), group `axis` ("token"|"channel") and `group` size;
    `levels`: a learned codebook in code units (`kvq_jax.quant`: ends 0 and qmax fixed), None = uniform."""

    bits: float
    axis: str = "token"
    group: int = 64
    levels: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        b = self.bits
        if isinstance(b, bool) or not isinstance(b, numbers.Real) or b not in VALID_BITS:
            raise KvqError(f"{_BITS_MSG}, got {b!r}")
        # Canonical form (4.0 → 4) so equal specs print, serialize and hash alike.
        object.__setattr__(self, "bits", 1.58 if b == 1.58 else int(b))
        if self.axis not in ("token", "channel"):
            raise KvqError(f"axis must be 'token' or 'channel', got {self.axis!r}")
        allowed = TOKEN_GROUPS if self.axis == "token" else CHANNEL_GROUPS
        g = self.group
        if isinstance(g, bool) or not isinstance(g, numbers.Integral) or g not in allowed:
            raise KvqError(
                f"{self.axis}-axis group must be one of {', '.join(map(str, allowed))}, got {g!r}"
            )
        object.__setattr__(self, "group", int(g))
        object.__setattr__(self, "levels", _canonical_levels(self.levels, self.bits))

    @property
    def dense(self) -> bool:
        """True for 16 bits: the tensor is kept unquantized."""
        return self.bits >= 16

    @property
    def storage_bits(self) -> float:
        """Packed bits per value: 32 / digits_per_word (3-bit → 3.2, ternary → 1.6); 16 if dense."""
        return 16.0 if self.dense else 32.0 / digits_per_word(self.bits)

    def overhead_bits(self, scale_dtype: str = "bfloat16") -> float:
        """Scale + zero bits per value: 2·16/group (bf16) or 2·32/group (fp32); 0 if dense."""
        if scale_dtype not in SCALE_DTYPES:
            raise KvqError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {scale_dtype!r}")
        if self.dense:
            return 0.0
        return 2 * (16 if scale_dtype == "bfloat16" else 32) / self.group

    def __str__(self) -> str:
        return f"{_fmt_bits(self.bits)}b/{self.axis}/{self.group}" + ("+codebook" if self.levels else "")

    def to_json(self) -> str | dict[str, Any]:
        """The plan file's form: `str(self)`, or a mapping when the spec carries a codebook."""
        if self.levels is None:
            return str(self)
        return {"bits": self.bits, "axis": self.axis, "group": self.group, "levels": list(self.levels)}

    @classmethod
    def parse(cls, text: str) -> "QuantSpec":
        """Inverse of `str`: "4b/channel/64" (also "4", "4b/token")."""
        if not isinstance(text, str):
            raise KvqError(f"a quant spec must be a string like '4b/channel/64', got {text!r}")
        if text.strip().endswith("+codebook"):
            raise KvqError(f"bad quant spec {text!r}: a codebook spec is written as a mapping with its levels")
        parts = text.strip().split("/")
        if not 1 <= len(parts) <= 3:
            raise KvqError(f"bad quant spec {text!r}: expected like '4b/channel/64'")
        bits = _parse_bits(parts[0].strip().lower().removesuffix("b"))
        axis = parts[1].strip() if len(parts) > 1 else "token"
        if len(parts) > 2:
            try:
                group = int(parts[2])
            except ValueError:
                raise KvqError(f"bad quant spec {text!r}: group {parts[2]!r} is not an int") from None
        else:
            group = 64
        return cls(bits, axis, group)


def _as_spec(x: Any) -> QuantSpec:
    if isinstance(x, QuantSpec):
        return x
    if isinstance(x, str):
        return QuantSpec.parse(x)
    if isinstance(x, Mapping):
        unknown = set(x) - {"bits", "axis", "group", "levels"}
        if unknown or "bits" not in x:
            raise KvqError(f"bad quant spec {dict(x)!r}: expected keys bits, axis, group (and levels)")
        return QuantSpec(**x)
    raise KvqError(f"bad quant spec {x!r}: expected a QuantSpec, a string or a mapping")


@dataclasses.dataclass(frozen=True)
class KVPlan:
    """Per-layer K/V specs plus cache geometry; frozen and hashable (a valid jit static argument).

    `residual` is the full-precision recent window R, `sink` the full-precision first S positions,
    `model`/`model_layers` record what the plan was made for (checked by `validate`).
    `window_dtype` stores the sink and the recent window ("compute": the model's dtype). `rotate` is
    one rotation for every layer or one per layer (`rotation(layer)`), from `ROTATIONS`.
    """

    keys: tuple[QuantSpec, ...]
    values: tuple[QuantSpec, ...]
    residual: int = 128
    sink: int = 4
    rotate: str | tuple[str, ...] = "none"
    scale_dtype: str = "bfloat16"
    model: str | None = None
    model_layers: int | None = None
    note: str = ""
    window_dtype: str = "compute"

    def __post_init__(self) -> None:
        for name in ("keys", "values"):
            seq = getattr(self, name)
            if isinstance(seq, (str, bytes, Mapping)) or not hasattr(seq, "__iter__"):
                raise KvqError(f"plan {name} must be a list of quant specs, got {seq!r}")
            object.__setattr__(self, name, tuple(_as_spec(s) for s in seq))
        if not self.keys:
            raise KvqError("a plan needs at least one layer")
        if len(self.keys) != len(self.values):
            raise KvqError(f"plan has {len(self.keys)} key specs but {len(self.values)} value specs")
        _check_int("residual", self.residual)
        _check_int("sink", self.sink)
        # canonical form: each layer's rotation in its one-name form where it has one, and one string
        # when every layer agrees, so equal plans compare and hash alike
        if isinstance(self.rotate, (list, tuple)):  # one rotation per layer
            rot = tuple(join_rotation(*split_rotation(r)) for r in self.rotate)
            if len(rot) != len(self.keys):
                raise KvqError(f"plan has {len(self.keys)} layers but {len(rot)} rotations")
            object.__setattr__(self, "rotate", rot[0] if len(set(rot)) == 1 else rot)
        else:
            object.__setattr__(self, "rotate", join_rotation(*split_rotation(self.rotate)))
        if self.scale_dtype not in SCALE_DTYPES:
            raise KvqError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.window_dtype not in WINDOW_DTYPES:
            raise KvqError(f"window_dtype must be one of {', '.join(WINDOW_DTYPES)}, got {self.window_dtype!r}")
        if self.model is not None and not isinstance(self.model, str):
            raise KvqError(f"model must be a string, got {self.model!r}")
        if self.model_layers is not None:
            _check_int("model_layers", self.model_layers, 1)
        if self.note is None:  # an empty `note:` in YAML
            object.__setattr__(self, "note", "")
        if not isinstance(self.note, str):
            raise KvqError(f"note must be a string, got {self.note!r}")

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    def _check_layer(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise KvqError(f"layer must be in [0, {self.n_layers}), got {layer!r}")

    def rotation(self, layer: int) -> str:
        """The rotation of `layer`'s cached K/V: "none", "hadamard", "prerope" or "KEYS/VALUES"."""
        self._check_layer(layer)
        return self.rotate if isinstance(self.rotate, str) else self.rotate[layer]

    def key_rotation(self, layer: int) -> str:
        """How `layer`'s keys are rotated: "none", "hadamard" or "prerope"."""
        return split_rotation(self.rotation(layer))[0]

    def value_rotation(self, layer: int) -> str:
        """How `layer`'s values are rotated: "none" or "hadamard"."""
        return split_rotation(self.rotation(layer))[1]

    def quantized(self, layer: int) -> bool:
        """True if K or V of `layer` is quantized (not 16-bit dense)."""
        self._check_layer(layer)
        return not (self.keys[layer].dense and self.values[layer].dense)

    def block(self, layer: int) -> int:
        """Flush block size G of `layer`: the largest group of its quantized per-channel specs, else 64.

        Dense (16-bit) specs are skipped: they hold no groups, so they do not constrain the block.
        """
        self._check_layer(layer)
        groups = [
            s.group for s in (self.keys[layer], self.values[layer]) if s.axis == "channel" and not s.dense
        ]
        return max(groups, default=DEFAULT_BLOCK)

    def validate(self, cfg: ModelConfig) -> None:
        """Raises KvqError with a one-line explanation of the first mismatch with `cfg`."""
        if self.model is not None and self.model != cfg.name:
            raise KvqError(f"plan was made for model {self.model!r}, not {cfg.name!r}")
        if self.model_layers is not None and self.model_layers != cfg.n_layers:
            raise KvqError(
                f"plan was made for a {self.model_layers}-layer model, {cfg.name!r} has {cfg.n_layers}"
            )
        if self.n_layers != cfg.n_layers:
            raise KvqError(f"plan has {self.n_layers} layers, model {cfg.name!r} has {cfg.n_layers}")
        if "hadamard" in (r for i in range(self.n_layers) for r in split_rotation(self.rotation(i))) \
                and cfg.head_dim & (cfg.head_dim - 1):
            raise KvqError(f"rotate='hadamard' needs a power-of-two head_dim, got {cfg.head_dim}")
        for layer in range(self.n_layers):
            for kind, s in (("key", self.keys[layer]), ("value", self.values[layer])):
                if not s.dense and s.axis == "token" and cfg.head_dim % s.group:
                    raise KvqError(
                        f"layer {layer} {kind} spec {s}: head_dim {cfg.head_dim} is not divisible "
                        f"by group {s.group}"
                    )
            if not self.quantized(layer) and "hadamard" not in split_rotation(self.rotation(layer)):
                continue  # a plain dense layer: no window, no flush block
            g = self.block(layer)
            if self.residual % g:
                raise KvqError(f"residual {self.residual} is not a multiple of layer {layer}'s block {g}")
            if self.residual < g:
                raise KvqError(
                    f"residual {self.residual} is smaller than layer {layer}'s block {g} "
                    "(a quantized layer needs at least one block of recent tokens)"
                )

    @classmethod
    def uniform(
        cls,
        n_layers: int,
        k_bits: float,
        v_bits: float,
        key_axis: str = "channel",
        value_axis: str = "token",
        group_k: int = 64,
        group_v: int = 64,
        residual: int = 128,
        sink: int = 4,
        rotate: str = "none",
        scale_dtype: str = "bfloat16",
    ) -> "KVPlan":
        """The same K and V spec on every layer (KIVI default: keys per-channel, values per-token)."""
        _check_int("n_layers", n_layers, 1)
        k = QuantSpec(k_bits, key_axis, group_k)
        v = QuantSpec(v_bits, value_axis, group_v)
        return cls((k,) * n_layers, (v,) * n_layers, residual, sink, rotate, scale_dtype)

    def replace(self, **kw: Any) -> "KVPlan":
        return dataclasses.replace(self, **kw)

    # -- summaries -------------------------------------------------------------------------------

    def mean_data_bits(self, layer_tokens: Sequence[int] | None = None) -> float:
        """Mean nominal bits over all K and V specs (16 for dense); with `layer_tokens [L]` (the tokens
        each layer holds, `allocate.layer_tokens_at`), over the elements the cache holds."""
        w = [1] * self.n_layers if layer_tokens is None else list(layer_tokens)
        return sum(float(k.bits + v.bits) * n for k, v, n in zip(self.keys, self.values, w)) / (2 * sum(w))

    def mean_storage_bits(self) -> float:
        """Mean stored bits per value over all K and V specs: packed codes + scale/zero overhead."""
        specs = self.keys + self.values
        return sum(s.storage_bits + s.overhead_bits(self.scale_dtype) for s in specs) / len(specs)

    def codebook_bytes(self) -> int:
        """Bytes of the plan's level tables (float32, compiled into the program, not the cache)."""
        return sum(4 * len(s.levels) for s in self.keys + self.values if s.levels)

    def describe(self) -> str:
        """One-line human summary."""

        def run(specs: tuple[QuantSpec, ...]) -> str:
            c = collections.Counter(str(s) for s in specs)
            return ", ".join(s if n == len(specs) else f"{s}×{n}" for s, n in c.most_common())

        head = f"{self.n_layers} layers" + (f" of {self.model}" if self.model else "")
        rotations = self.rotate if isinstance(self.rotate, str) else run(self.rotate)
        text = (
            f"{head}: K {run(self.keys)}; V {run(self.values)}; "
            f"{self.mean_data_bits():.2f} data bits ({self.mean_storage_bits():.2f} stored); "
            f"sink {self.sink}, residual {self.residual}, rotate {rotations}, scales {self.scale_dtype}"
            + ("" if self.window_dtype == "compute" else f", window {self.window_dtype}")
        )
        return text + (f" ({self.note})" if self.note else "")

    # -- serialization ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["keys"] = [s.to_json() for s in self.keys]
        d["values"] = [s.to_json() for s in self.values]
        if not isinstance(self.rotate, str):
            d["rotate"] = list(self.rotate)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "KVPlan":
        if not isinstance(d, Mapping):
            raise KvqError(f"a plan must be a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise KvqError(f"unknown plan keys: {', '.join(sorted(map(str, unknown)))}")
        missing = {"keys", "values"} - set(d)
        if missing:
            raise KvqError(f"plan lacks {', '.join(sorted(missing))}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "KVPlan":
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, TypeError) as e:
            raise KvqError(f"plan is not valid JSON: {_one_line(e)}") from None
        return cls.from_dict(d)

    def save(self, path: str | os.PathLike) -> None:
        """Writes JSON or YAML, chosen by the suffix (.json / .yaml / .yml)."""
        kind = _file_kind(path)
        text = self.to_json() + "\n" if kind == "json" else yaml.safe_dump(self.to_dict(), sort_keys=False)
        try:
            with open(path, "w") as f:
                f.write(text)
        except OSError as e:
            raise KvqError(f"cannot write plan file {os.fspath(path)!r}: {e.strerror}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "KVPlan":
        """Reads a plan written by `save` (JSON or YAML by suffix)."""
        kind = _file_kind(path)
        p = os.fspath(path)
        try:
            with open(p) as f:
                text = f.read()
        except OSError as e:
            raise KvqError(f"cannot read plan file {p!r}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise KvqError(f"plan file {p!r} is not a text file") from None
        try:
            d = json.loads(text) if kind == "json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise KvqError(f"plan file {p!r} is not valid {kind.upper()}: {_one_line(e)}") from None
        try:
            return cls.from_dict(d)
        except KvqError as e:
            raise KvqError(f"plan file {p!r}: {e}") from None


def _file_kind(path: str | os.PathLike) -> str:
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix == ".json":
        return "json"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    raise KvqError(f"plan file {os.fspath(path)!r} must end in .json, .yaml or .yml")


@dataclasses.dataclass(frozen=True)
class DenseKV:
    """An unquantized cache in `dtype` ("float32" | "bfloat16")."""

    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DENSE_DTYPES:
            raise KvqError(f"dense cache dtype must be one of {', '.join(DENSE_DTYPES)}, got {self.dtype!r}")

    def describe(self) -> str:
        return f"dense {self.dtype} cache"


_KV_RE = re.compile(r"^k(\d+(?:\.\d+)?)v(\d+(?:\.\d+)?)$", re.IGNORECASE)
_DENSE_NAMES = {"fp": "float32", "fp32": "float32", "float32": "float32", "bf16": "bfloat16",
                "bfloat16": "bfloat16"}


def _override_specs(specs: tuple[QuantSpec, ...], axis: str | None, group: int | None) -> tuple:
    # Changing the axis alone keeps the group, which may be invalid for the new axis: QuantSpec says so.
    return tuple(
        QuantSpec(s.bits, s.axis if axis is None else axis, s.group if group is None else group, s.levels)
        for s in specs
    )


def parse_kv(
    spec: str,
    n_layers: int,
    *,
    key_axis: str | None = None,
    value_axis: str | None = None,
    group_k: int | None = None,
    group_v: int | None = None,
    residual: int | None = None,
    sink: int | None = None,
    rotate: str | None = None,
    window_dtype: str | None = None,
) -> KVPlan | DenseKV:
    """Turns a `--kv` value into a cache plan.

    "fp" → DenseKV("float32"), "bf16" → DenseKV("bfloat16"), "K<b>V<b>" (K4V2, k1.58v2, ...) →
    `KVPlan.uniform` (keys per-channel, values per-token, group 64), anything else is read as a plan
    file (.json/.yaml/.yml). Non-None overrides replace that field on every layer (file plans too);
    they do not apply to dense caches.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise KvqError(f"bad --kv {spec!r}: expected fp, bf16, K<bits>V<bits> (e.g. K4V2) or a plan file")
    _check_int("n_layers", n_layers, 1)
    text = spec.strip()
    if text.lower() in _DENSE_NAMES:
        return DenseKV(_DENSE_NAMES[text.lower()])
    m = _KV_RE.match(text)
    if m:
        try:
            plan = KVPlan.uniform(n_layers, _parse_bits(m.group(1)), _parse_bits(m.group(2)))
        except KvqError as e:
            raise KvqError(f"bad --kv {spec!r}: {e}") from None
    else:
        plan = _load_plan_file(spec, text, n_layers)
    try:  # one override path for K<b>V<b> and plan files
        return plan.replace(
            keys=_override_specs(plan.keys, key_axis, group_k),
            values=_override_specs(plan.values, value_axis, group_v),
            residual=plan.residual if residual is None else residual,
            sink=plan.sink if sink is None else sink,
            rotate=plan.rotate if rotate is None else rotate,
            window_dtype=plan.window_dtype if window_dtype is None else window_dtype,
        )
    except KvqError as e:
        raise KvqError(f"bad --kv {spec!r}: {e}") from None


def _load_plan_file(spec: str, text: str, n_layers: int) -> KVPlan:
    if not os.path.exists(text):
        if os.path.splitext(text)[1].lower() in (".json", ".yaml", ".yml") or os.sep in text:
            raise KvqError(f"bad --kv {spec!r}: plan file not found")
        raise KvqError(f"bad --kv {spec!r}: expected fp, bf16, K<bits>V<bits> (e.g. K4V2) or a plan file")
    if os.path.isdir(text):
        raise KvqError(f"bad --kv {spec!r}: is a directory, not a plan file")
    plan = KVPlan.load(text)
    if plan.n_layers != n_layers:
        raise KvqError(f"plan file {text!r} has {plan.n_layers} layers, the model has {n_layers}")
    return plan
