"""One process of a 2-process run (4 CPU devices each): `python multiprocess_worker.py PORT ID`.
Process 0 prints the greedy tokens of a sharded generate as one JSON line after `RESULT_TAG`, as
`tests/test_sharding.py` checks (gloo writes its own untagged log lines to stdout)."""

from __future__ import annotations

import json
import os
import sys

from xla_flags import set_test_env  # noqa: E402  (this script's folder is on sys.path)

set_test_env(os.environ, 4)  # the test passes 4 too
os.environ["JAX_PLATFORMS"] = "cpu"

from kvq_jax.sharding import initialize, is_leader, make_mesh  # noqa: E402

initialize(f"localhost:{sys.argv[1]}", 2, int(sys.argv[2]))

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from kvq_jax.decode import generate  # noqa: E402
from kvq_jax.model import Transformer  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_mesh import CFG, PLANS, prompts  # noqa: E402

RESULT_TAG = "kvq-result: "
assert len(jax.devices()) == 8 and len(jax.local_devices()) == 4
out = {}
for name in ("fp", "K4V2"):
    for mesh in ("data=2,seq=4", "seq=8"):
        sizes = dict(kv.split("=") for kv in mesh.split(","))
        res = generate(Transformer(CFG, rngs=nnx.Rngs(0)), prompts(), kv=PLANS[name], max_new_tokens=12,
                       mesh=make_mesh(**{k: int(v) for k, v in sizes.items()}))
        out[f"{name} {mesh}"] = res.tokens
if is_leader():
    print(RESULT_TAG + json.dumps(out))
