"""Tests for gated_jax.models.generate: the cached decode equals recomputing the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy import testing as npt

from gated_jax.layers import MIXERS
from gated_jax.models import DecoderLM, generate

V, P, STEPS = 32, 4, 6
_LINEAR = next((m for m in ("gla", "retnet", "lightning") if m in MIXERS), None)
_MIXERS = [("gated_attention", {"gate_position": "G1"})] + ([(_LINEAR, {})] if _LINEAR else [])


def _setup(mixer, kwargs):
  model = DecoderLM(vocab_size=V, d_model=32, num_layers=2, num_heads=2, mixer=mixer, mixer_kwargs=kwargs,
                    mlp="none", max_len=16)  # the MLP plays no part in caching
  prompt = jax.random.randint(jax.random.PRNGKey(1), (2, P), 0, V)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), prompt)["params"]
  params = jax.tree.map(lambda p: p * 8.0 if p.ndim == 2 else p, params)  # sharper logits: no argmax ties
  return model, params, prompt


@pytest.mark.parametrize("mixer, kwargs", _MIXERS)
def test_greedy_generation_equals_full_recompute(mixer, kwargs):
  model, params, prompt = _setup(mixer, kwargs)
  out = generate(model, params, prompt, steps=STEPS)
  # Full forward over a fixed-length buffer (causal: the zeros after position t do not change its logits).
  forward = jax.jit(lambda seq: model.apply({"params": params}, seq))
  seq = np.zeros((2, P + STEPS), np.int32)
  seq[:, :P] = prompt
  for t in range(P, P + STEPS):
    seq[:, t] = np.argmax(forward(seq)[:, t - 1], axis=-1)
  assert out.shape == (2, P + STEPS) and out.dtype == jnp.int32
  npt.assert_array_equal(out, seq)
  # Sampling (same compiled program): seeded, keeps the prompt, tokens in range.
  a, b = (generate(model, params, prompt, steps=STEPS, temperature=1.0, rng=jax.random.PRNGKey(7))
          for _ in range(2))
  npt.assert_array_equal(a, b)
  npt.assert_array_equal(a[:, :P], prompt)
  assert int(np.min(a)) >= 0 and int(np.max(a)) < V


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps"), ({"steps": 2, "temperature": 1.0}, "rng"),
    ({"steps": 2, "temperature": -1.0}, "temperature")])
def test_bad_arguments_raise(kwargs, match):
  model = DecoderLM(vocab_size=V, d_model=32, num_layers=1, num_heads=2)
  with pytest.raises(ValueError, match=match):
    generate(model, {}, jnp.zeros((1, 2), jnp.int32), **kwargs)


def test_bad_prompt_raises():
  model = DecoderLM(vocab_size=V, d_model=32, num_layers=1, num_heads=2)
  with pytest.raises(ValueError, match="prompt_BT"):
    generate(model, {}, jnp.zeros((2,), jnp.int32), steps=2)
