"""Autoregressive sampling from a ``DecoderLM`` with its decode cache (flax lm1b idiom).

The cache is created by ``model.init(..., decode=True)`` on a ``(B, prompt_len + steps)`` input, the prompt
is prefilled in one call, then one token per step is fed back under ``lax.scan``. Greedy when
``temperature == 0``, otherwise sampled from ``softmax(logits / temperature)``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _pick(logits_BV: jax.Array, temperature: jax.Array, rng: jax.Array) -> jax.Array:
  """Greedy where ``temperature == 0``, else a sample (temperature is traced: one compile for both)."""
  sampled_B = jax.random.categorical(rng, logits_BV / jnp.maximum(temperature, 1e-6), axis=-1)
  return jnp.where(temperature == 0.0, jnp.argmax(logits_BV, axis=-1), sampled_B).astype(jnp.int32)


def generate(model: nn.Module, params: Any, prompt_BT: jax.Array, *, steps: int, temperature: float = 0.0,
             rng: jax.Array | None = None) -> jax.Array:
  """Continues ``prompt_BT`` by ``steps`` tokens using the decode cache.

  Args:
    model: a ``DecoderLM`` (any module with the ``(tokens, decode=...)`` call and a ``"cache"`` collection).
    params: the model's ``"params"`` collection.
    prompt_BT: int prompt tokens ``(B, P)``, ``P >= 1``.
    steps: number of tokens to generate (>= 1).
    temperature: 0 for greedy decoding, > 0 to sample.
    rng: PRNG key, required when ``temperature > 0``.

  Returns:
    int32 ``(B, P + steps)``: the prompt followed by the generated tokens.
  """
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps: got {steps!r}; allowed: a positive int")
  if not temperature >= 0.0:
    raise ValueError(f"temperature: got {temperature!r}; allowed: a float >= 0")
  if temperature > 0.0 and rng is None:
    raise ValueError("rng: got None; allowed: a PRNG key (required when temperature > 0)")
  prompt_BT = jnp.asarray(prompt_BT)
  if prompt_BT.ndim != 2 or prompt_BT.shape[1] < 1 or not jnp.issubdtype(prompt_BT.dtype, jnp.integer):
    raise ValueError(f"prompt_BT: got shape {prompt_BT.shape} dtype {prompt_BT.dtype}; allowed: an integer "
                     "array (batch, length >= 1)")
  rng = jax.random.PRNGKey(0) if rng is None else rng
  return _generate(model, params, prompt_BT, rng, jnp.float32(temperature), steps=steps)


@functools.partial(jax.jit, static_argnames=("model", "steps"))
def _generate(model: nn.Module, params: Any, prompt_BT: jax.Array, rng: jax.Array, temperature: jax.Array, *,
              steps: int) -> jax.Array:
  batch, prompt_len = prompt_BT.shape
  cache = model.init(jax.random.PRNGKey(0), jnp.zeros((batch, prompt_len + steps), jnp.int32),
                     decode=True)["cache"]
  logits, mutated = model.apply({"params": params, "cache": cache}, prompt_BT, decode=True, mutable=["cache"])
  rng, first_rng = jax.random.split(rng)
  first_B = _pick(logits[:, -1], temperature, first_rng)

  def step(carry, step_rng):
    cache, token_B = carry
    logits, mutated = model.apply({"params": params, "cache": cache}, token_B[:, None], decode=True,
                                  mutable=["cache"])
    next_B = _pick(logits[:, -1], temperature, step_rng)
    return (mutated["cache"], next_B), next_B

  _, rest_SB = jax.lax.scan(step, (mutated["cache"], first_B), jax.random.split(rng, steps - 1))
  return jnp.concatenate([prompt_BT.astype(jnp.int32), first_B[:, None], rest_SB.T], axis=1)
