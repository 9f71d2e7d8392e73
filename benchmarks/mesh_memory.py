"""Cache bytes per device on meshes of 8 devices, and the longest context that fits a device budget.

python benchmarks/mesh_memory.py [--budget-gib 16] [--out benchmarks/results/mesh_memory.jsonl]

Exact figures from `kvq_jax.cache.cache_bytes` (the shapes `init_cache` would allocate, nothing is
allocated), on 8 host devices. The models are configs only: SmolLM2-135M and Llama-3.1-8B
(`configs/llama-3.1-8b.yaml`). The full-precision parts (sink, recent window) are bf16, as on an
accelerator; "fp" is a dense fp32 cache. Weights and activations are not counted.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402

import jax.numpy as jnp  # noqa: E402

from kvq_jax.cache import cache_bytes  # noqa: E402
from kvq_jax.config import ModelConfig  # noqa: E402
from kvq_jax.plan import KVPlan, parse_kv  # noqa: E402
from kvq_jax.sharding import make_mesh  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MESHES = {"1 device": (dict(), 1), "seq=8": (dict(seq=8), 1), "data=2,seq=4": (dict(data=2, seq=4), 2),
          "data=8": (dict(data=8), 8)}


def caches(cfg: ModelConfig) -> dict[str, object]:
    out = {name: parse_kv(name, cfg.n_layers) for name in ("fp", "bf16", "K4V2")}
    plan = os.path.join(HERE, "results", "plan_fisher_2.5.json")
    if cfg.name.startswith("SmolLM2") and os.path.exists(plan):
        # calibrated on the GGUF's SmolLM2-135M-Instruct (its metadata names it otherwise)
        out["fisher 2.5b"] = KVPlan.load(plan).replace(model=cfg.name)
    else:
        out["K3V2 (2.5b)"] = parse_kv("K3V2", cfg.n_layers)
    return out


def per_device(cfg, kv, mesh_name: str, context: int) -> tuple[int, int]:
    """(bytes per device, sequences) for `context` positions per sequence."""
    axes, batch = MESHES[mesh_name]
    mesh = make_mesh(**axes) if axes else None
    return cache_bytes(cfg, kv, batch, context, jnp.bfloat16, mesh=mesh), batch


def longest(cfg, kv, mesh_name: str, budget: int) -> int:
    """The largest context (multiple of 256) whose cache fits `budget` bytes per device."""
    lo, hi = 0, 256
    while per_device(cfg, kv, mesh_name, hi)[0] <= budget:
        lo, hi = hi, hi * 2
        if hi > 2**26:
            return lo
    while hi - lo > 256:
        mid = (lo + hi) // 2 // 256 * 256
        lo, hi = (mid, hi) if per_device(cfg, kv, mesh_name, mid)[0] <= budget else (lo, mid)
    return lo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-gib", type=float, default=16.0)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "mesh_memory.jsonl"))
    args = ap.parse_args()
    budget = int(args.budget_gib * 2**30)
    models = [ModelConfig.from_yaml(os.path.join(ROOT, "configs", f)) for f in
              ("smollm2-135m-instruct.yaml", "llama-3.1-8b.yaml")]
    rows = []
    for cfg in models:
        for label, kv in caches(cfg).items():
            for mesh_name in MESHES:
                row = {"model": cfg.name, "kv": label, "mesh": mesh_name, "sequences": MESHES[mesh_name][1]}
                for ctx in (8192, 32768, 131072):
                    row[f"bytes_per_device_{ctx // 1024}k"] = per_device(cfg, kv, mesh_name, ctx)[0]
                row["longest_context_in_budget"] = longest(cfg, kv, mesh_name, budget)
                row["budget_gib"] = args.budget_gib
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    from entry import run

    run(main)
