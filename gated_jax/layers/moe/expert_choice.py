"""Expert-choice routing (Zhou et al. 2022, arXiv 2202.09368 §3.1): each expert picks its top-``C`` tokens."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gated_jax.layers.moe.routing import ROUTERS, Router, Routing, deactivate


@ROUTERS.register("expert_choice")
class ExpertChoice(Router):
  """``P = softmax(x W)`` over experts; within each sequence, expert ``e`` takes the ``C = ceil(T k / E)``
  tokens with the largest ``P[:, e]`` (the paper's capacity ``n c / e`` with ``c = k`` experts per token on
  average), weighted by ``P``. A token may be taken by several experts or by none (it then passes through the
  residual only). There is one slot per expert (``S = E``), inactive where the expert did not take the token.

  Whether a token is taken depends on every token of its sequence, later ones included: expert choice leaks
  the future in a causal model (flaxformer's routing docstring; OLMoE#46), so it raises ``ValueError`` when
  ``causal`` unless ``allow_noncausal`` is set explicitly (encoders, or a study of the leak). No auxiliary loss
  is needed: every expert takes exactly C tokens.
  """
  causal: bool = True
  allow_noncausal: bool = False

  @nn.compact
  def __call__(self, x_BTD: jax.Array, train_step: Any = None) -> Routing:
    del train_step
    self.check_fields()
    if self.causal and not self.allow_noncausal:
      raise ValueError("router: got 'expert_choice' with causal=True; expert choice sees future tokens, allowed "
                       "only with causal=False or allow_noncausal=True")
    logits = self.logits(x_BTD)
    probs = jax.nn.softmax(logits, axis=-1)
    seq_len = x_BTD.shape[1]
    capacity = min(seq_len, math.ceil(seq_len * self.k / self.num_experts))
    _, tokens_BEC = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), capacity)
    chosen_BET = jnp.any(jax.nn.one_hot(tokens_BEC, seq_len, dtype=jnp.bool_), axis=2)
    chosen_BTE = jnp.swapaxes(chosen_BET, 1, 2)
    experts = jnp.broadcast_to(jnp.arange(self.num_experts, dtype=jnp.int32), probs.shape)
    weights, indices = deactivate(probs, experts, chosen_BTE, self.num_experts)
    return Routing(weights, indices, probs, logits)
