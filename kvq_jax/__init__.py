"""kvq_jax: information-aware mixed-precision KV-cache quantization for JAX/XLA.

Small public API:

    model, tok = kvq_jax.load()                         # embedded SmolLM2-135M-Instruct
    plan = kvq_jax.parse_kv("K4V2", model.cfg.n_layers)  # or KVPlan.load("plan.json")
    out = kvq_jax.generate(model, [tok.encode(tok.chat_prompt("Hi"))], kv=plan)
    print(tok.decode(out.tokens[0]))
"""

from kvq_jax.cache import KVCache, init_cache
from kvq_jax.chat import ChatSession
from kvq_jax.config import ModelConfig
from kvq_jax.decode import GenerationResult, generate
from kvq_jax.errors import KvqError
from kvq_jax.loading import load
from kvq_jax.model import Transformer
from kvq_jax.plan import DenseKV, KVPlan, QuantSpec, parse_kv
from kvq_jax.sampling import SamplerConfig
from kvq_jax.sharding import ShardingRules, make_mesh

__version__ = "0.1.0"

__all__ = [
    "ChatSession", "DenseKV", "GenerationResult", "KVCache", "KVPlan", "KvqError", "ModelConfig", "QuantSpec",
    "SamplerConfig", "ShardingRules", "Transformer", "generate", "init_cache", "load", "make_mesh", "parse_kv",
]
