"""Samplers: greedy, top-k and top-p filters, seeded draws, bad settings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvq_jax.errors import KvqError
from kvq_jax.sampling import SamplerConfig, filter_logits, sample


def test_greedy_is_argmax():
    logits = jnp.asarray([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]])
    assert sample(logits, jax.random.key(0), SamplerConfig()).tolist() == [1, 0]


def test_top_k_and_top_p_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    k2 = filter_logits(logits, jnp.int32(2), jnp.float32(1.0))
    assert np.isfinite(np.asarray(k2)).tolist() == [[True, True, False, False]]
    p = filter_logits(logits, jnp.int32(0), jnp.float32(0.7))  # 0.5 < 0.7, 0.5+0.3 >= 0.7
    assert np.isfinite(np.asarray(p)).tolist() == [[True, True, False, False]]
    p1 = filter_logits(logits, jnp.int32(0), jnp.float32(0.4))
    assert np.isfinite(np.asarray(p1)).tolist() == [[True, False, False, False]]


def test_samples_stay_inside_the_filter():
    logits = jnp.tile(jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1]])), (512, 1))
    cfg = SamplerConfig(temperature=1.0, top_k=2)
    toks = np.asarray(sample(logits, jax.random.key(1), cfg))
    assert set(toks.tolist()) == {0, 1}
    again = np.asarray(sample(logits, jax.random.key(1), cfg))
    assert (toks == again).all()


@pytest.mark.parametrize("kw", [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5),
                                dict(temperature=float("nan"))])
def test_bad_sampler_settings(kw):
    with pytest.raises(KvqError):
        SamplerConfig(**kw)
