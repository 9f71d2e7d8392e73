"""One mesh, sharding rules in one place: every parameter and cache array names its logical axes, and
`ShardingRules` maps them onto the mesh axes `data`, `model` and `seq`.

- `data`: rows of the batch (and of the cache). A pmap-style data-parallel run is `data=N`.
- `model`: attention heads, KV heads and the MLP hidden dimension (and the vocabulary of the
  embedding / LM head) of the parameters; the KV heads of the cache.
- `seq`: the cache's token axis (global layers only): each device holds a contiguous slice of every
  long cache and attends over it; partial results merge exactly by log-sum-exp (`attention`).

An axis that does not divide the dimension it would shard is replicated instead (the KV heads of
SmolLM2 on `model=2`, say): `Placement.note` says so once. Everything is jit + shardings and
`shard_map`; see docs/architecture.md for why `pmap` is not used.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kvq_jax.config import ModelConfig
from kvq_jax.errors import KvqError

AXES = ("data", "model", "seq")
LOGICAL = ("batch", "heads", "kv_heads", "head_dim", "embed", "mlp", "vocab", "cache_tokens")

# Logical axes of every canonical parameter (the names `load_params` uses), by its last name part.
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"), "lm_head": ("vocab", "embed"),
    "wq": ("embed", "heads"), "wk": ("embed", "kv_heads"), "wv": ("embed", "kv_heads"),
    "wo": ("heads", "embed"), "bq": ("heads",), "bk": ("kv_heads",), "bv": ("kv_heads",),
    "q_norm": ("head_dim",), "k_norm": ("head_dim",),
    "w_gate": ("embed", "mlp"), "w_up": ("embed", "mlp"), "w_down": ("mlp", "embed"),
}
NORM_AXES = ("embed",)  # final_norm, attn_norm, mlp_norm, post_*_norm
CACHE_AXES = ("batch", "kv_heads", "cache_tokens", "head_dim")  # every [B, H, T, D] cache array


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis → mesh axis (or None: replicated). Override any field to change a default."""

    batch: str | None = "data"
    heads: str | None = "model"
    kv_heads: str | None = "model"
    head_dim: str | None = None
    embed: str | None = None
    mlp: str | None = "model"
    vocab: str | None = "model"
    cache_tokens: str | None = "seq"

    def __post_init__(self) -> None:
        for name in LOGICAL:
            v = getattr(self, name)
            if v is not None and v not in AXES:
                raise KvqError(f"sharding rule {name}={v!r}: mesh axes are {', '.join(AXES)}")

    @classmethod
    def from_dict(cls, d: Mapping[str, str | None]) -> "ShardingRules":
        unknown = set(d) - set(LOGICAL)
        if unknown:
            raise KvqError(f"unknown logical axes {', '.join(sorted(unknown))} (known: {', '.join(LOGICAL)})")
        return cls(**d)


def make_mesh(data: int = 1, model: int = 1, seq: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A `data x model x seq` mesh over the first data*model*seq of `devices` (default: all devices of
    every process; a multi-process run must use them all)."""
    sizes = (data, model, seq)
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in sizes):
        raise KvqError(f"mesh sizes must be positive integers, got data={data}, model={model}, seq={seq}")
    devices = list(jax.devices() if devices is None else devices)
    n = data * model * seq
    if n > len(devices):
        raise KvqError(f"mesh data={data},model={model},seq={seq} needs {n} devices, {len(devices)} available")
    if jax.process_count() > 1 and n != len(devices):
        raise KvqError(f"a multi-process mesh must use all {len(devices)} devices, got {n}")
    return Mesh(np.asarray(devices[:n], dtype=object).reshape(sizes), AXES)


def parse_mesh(text: str) -> dict[str, int]:
    """`data=2,model=1,seq=4` (any subset, any order) → sizes; one clear KvqError otherwise."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in AXES or name in sizes:
            raise KvqError(f"bad --mesh {text!r}: expected data=D,model=M,seq=S")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise KvqError(f"bad --mesh {text!r}: {name} must be an integer") from None
        if sizes[name] < 1:
            raise KvqError(f"bad --mesh {text!r}: {name} must be >= 1")
    if not sizes:
        raise KvqError(f"bad --mesh {text!r}: expected data=D,model=M,seq=S")
    return sizes


def default_mesh(batch: int) -> Mesh:
    """All devices on `data` when the batch divides over them, else one device."""
    n = len(jax.devices())
    return make_mesh(data=n if batch % n == 0 else 1)


@dataclasses.dataclass(frozen=True)
class Placement:
    """A mesh and its rules for one model: static (hashable), carried by the cache's layers."""

    mesh: Mesh
    rules: ShardingRules
    cfg: ModelConfig

    def axis(self, logical: str | None, dim: int | None = None) -> str | None:
        """The mesh axis of a logical axis, or None if unmapped, of size 1, or not dividing `dim`."""
        if logical is None:
            return None
        name = getattr(self.rules, logical)
        if name is None or self.mesh.shape[name] == 1:
            return None
        size = self.mesh.shape[name]
        units = {"heads": self.cfg.n_heads, "kv_heads": self.cfg.n_kv_heads}.get(logical, dim)
        return name if units is None or units % size == 0 else None

    def size(self, logical: str) -> int:
        name = self.axis(logical)
        return 1 if name is None else int(self.mesh.shape[name])

    def spec(self, logical: Sequence[str | None], shape: Sequence[int] | None = None) -> PartitionSpec:
        dims = shape if shape is not None else [None] * len(logical)
        return PartitionSpec(*(self.axis(a, d) for a, d in zip(logical, dims)))

    def named(self, logical: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical, shape))

    @property
    def seq(self) -> int:
        """Slices of each global layer's cache along tokens."""
        return self.size("cache_tokens")

    def note(self) -> str | None:
        """One line on what the rules could not shard, or None."""
        missing = []
        m = self.rules.kv_heads and self.mesh.shape[self.rules.kv_heads]
        if m and m > 1 and self.axis("kv_heads") is None:
            missing.append(f"{self.cfg.n_kv_heads} KV heads do not divide over {self.rules.kv_heads}={m}: "
                           "the cache's heads are replicated")
        return "; ".join(missing) or None


def placement(mesh: Mesh, cfg: ModelConfig, batch: int, rules: ShardingRules | None = None) -> Placement:
    """The placement of a model's cache and parameters on `mesh`; one clear KvqError if the mesh
    does not fit the batch or the heads."""
    if tuple(mesh.axis_names) != AXES:
        raise KvqError(f"the mesh must have axes {AXES} (use kvq_jax.make_mesh), got {tuple(mesh.axis_names)}")
    p = Placement(mesh, rules or ShardingRules(), cfg)
    b = p.rules.batch and mesh.shape[p.rules.batch]
    if b and batch % b:
        raise KvqError(f"batch {batch} does not divide over the mesh's {p.rules.batch}={b} devices")
    m = p.rules.heads and mesh.shape[p.rules.heads]
    if m and m > 1 and p.axis("kv_heads") is None and p.axis("heads") is None:
        raise KvqError(f"model={m} divides neither the {cfg.n_heads} query heads nor the "
                       f"{cfg.n_kv_heads} KV heads; use a model axis that divides {cfg.n_kv_heads}")
    return p


def prepare(model: Any, mesh: Mesh, batch: int, rules: ShardingRules | None = None) -> Placement:
    """Checks the mesh against the model and the batch, lays the model's parameters out on it (in
    place) and says once on stderr what it had to replicate."""
    p = placement(mesh, model.cfg, batch, rules)
    note = p.note()
    if note and jax.process_index() == 0:
        print(f"note: {note}", file=sys.stderr)
    shard_model(model, p)
    return p


# ----------------------------------------------------------------------------- placing arrays


def put(x: Any, sharding: NamedSharding) -> jax.Array:
    """A host (or single-device) array laid out as `sharding`, in one or many processes (every
    process holds the same full value)."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def param_axes(name: str) -> tuple[str, ...]:
    """Logical axes of a canonical parameter name (`layers.3.wq`, `embed`, `final_norm`, ...)."""
    return PARAM_AXES.get(name.rsplit(".", 1)[-1], NORM_AXES)


def shard_model(model: Any, p: Placement) -> None:
    """Lays every parameter of `model` out as the rules say (in place)."""
    from kvq_jax.model import param_table

    for name, param in param_table(model).items():
        value = param.get_value()
        param.set_value(put(value, p.named(param_axes(name), value.shape)))


def to_host(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly sharded, possibly multi-process) array on every host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def bytes_per_device(tree: Any) -> dict[Any, int]:
    """Bytes each device holds of the arrays in `tree` (its addressable shards)."""
    out: dict[Any, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for s in leaf.addressable_shards:
            out[s.device] = out.get(s.device, 0) + s.data.nbytes
    return out


def layer_specs(layer: Any) -> Any:
    """The layer's pytree with each array replaced by its PartitionSpec: `[B, H, T, D]` arrays by
    (batch, kv_heads, cache_tokens, head_dim), tokens sharded only for a layer split in `shards`
    (a global layer's dense buffer, packed body and, where its slots divide, recent ring; sinks are
    a few tokens and replicated)."""
    from kvq_jax.cache import DenseLayer, ring_split

    p = layer.placement
    tok = "cache_tokens" if layer.shards > 1 else None
    spec = lambda x, t: p.spec(("batch", "kv_heads", t, "head_dim"), x.shape)
    if isinstance(layer, DenseLayer):
        return layer.replace(k=spec(layer.k, tok), v=spec(layer.v, tok))
    ring = tok if ring_split(layer) else None
    body = lambda t: t.replace(words=spec(t.words, tok), scale=spec(t.scale, tok), zero=spec(t.zero, tok))
    return layer.replace(sink_k=spec(layer.sink_k, None), sink_v=spec(layer.sink_v, None),
                         recent_k=spec(layer.recent_k, ring), recent_v=spec(layer.recent_v, ring),
                         k=body(layer.k), v=body(layer.v))


def cache_specs(cache: Any) -> Any:
    """The cache's pytree of PartitionSpecs (`lengths` by batch)."""
    p = cache.layers[0].placement
    return cache.replace(layers=tuple(layer_specs(l) for l in cache.layers),
                         lengths=p.spec(("batch",), cache.lengths.shape))


def cache_shardings(cache: Any) -> Any:
    """The cache's pytree of NamedShardings (None leaves for a cache without a mesh)."""
    p = cache.layers[0].placement
    if p is None:
        return jax.tree_util.tree_map(lambda _: None, cache)
    return jax.tree_util.tree_map(lambda s: NamedSharding(p.mesh, s), cache_specs(cache))


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins a multi-process run (`jax.distributed.initialize`): every host runs the same command
    with its own `process_id`; the devices of all processes form one mesh. Nothing given: a single
    process (on TPU pods and SLURM, pass `coordinator="auto"` to let JAX read the cluster)."""
    given = (coordinator, num_processes, process_id)
    if all(x is None for x in given):
        return
    if coordinator == "auto" and num_processes is None and process_id is None:
        jax.distributed.initialize()
        return
    if any(x is None for x in given):
        raise KvqError("--coordinator, --num-processes and --process-id go together (or --coordinator auto)")
    if not 0 <= process_id < num_processes:
        raise KvqError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise KvqError(f"--coordinator must be host:port, got {coordinator!r}")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def is_leader() -> bool:
    """Process 0: the one that prints and writes files in a multi-process run."""
    return jax.process_index() == 0
