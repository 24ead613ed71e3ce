"""Sigmoid / activation gating with DeepSeek-V3's selection-only bias and auxiliary-loss-free balancing."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gated_jax.layers.collections import sow_param_update
from gated_jax.layers.moe.routing import ROUTERS, Router, Routing, check_choice, top_k

ACTIVATIONS = {
    "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
    "sqrt_softplus": lambda z: jnp.sqrt(jax.nn.softplus(z)),
}


@ROUTERS.register("sigmoid")
class SigmoidGate(Router):
  """Per-expert activation scores with a selection-only bias (DeepSeek-V3, arXiv 2412.19437 eqs. 13-16):

      s_i = act(x·e_i)                      act = sigmoid (eq. 15), or softplus / sqrt(softplus) (DeepSeek-V4)
      selected = TopK_i(s_i + b_i, k)       the bias b only chooses experts (eq. 16)
      g_i = s_i / Σ_selected s_j            weights from the unbiased scores (eq. 13; ``normalize=False``: s_i)

  times ``scaling`` (DeepSeek-V3's routed scaling factor). The bias is the parameter ``selection_bias``, zero at
  init and never trained by the gradient: with ``balance_rate`` γ > 0, each training call sows the
  auxiliary-loss-free update ``b_i += γ · sign(mean_load − load_i)`` (Wang et al. 2024, arXiv 2408.15664,
  Algorithm 1; DeepSeek-V3 §2.1.2 uses γ = 0.001), where ``load_i`` counts this batch's top-k picks of expert i;
  the trainer adds it after the optimizer step (``gated_jax.layers.collections.sow_param_update``). ``probs``
  is ``s / Σ_i s_i``, the normalised scores of DeepSeek-V3's sequence-wise balance loss (eqs. 17-20), which this
  router also reports as ``sequence_balance`` in ``Routing.aux``: per sequence, ``Σ_i f_i P_i`` with
  ``f_i = E / (k T) · #{t : i selected}`` and ``P_i`` the mean of ``s'``, averaged over sequences (1 when
  balanced). Sigmoid gating's sample efficiency against softmax: Nguyen et al. 2024, arXiv 2405.13997.
  """
  activation: str = "sigmoid"
  normalize: bool = True
  scaling: float = 1.0
  balance_rate: float = 0.0

  @nn.compact
  def __call__(self, x_BTD: jax.Array, train_step: Any = None) -> Routing:
    del train_step
    self.check_fields()
    check_choice("activation", self.activation, tuple(ACTIVATIONS))
    if not self.balance_rate >= 0:
      raise ValueError(f"balance_rate: got {self.balance_rate!r}; allowed: a float >= 0")
    logits = self.logits(x_BTD)
    scores = ACTIVATIONS[self.activation](logits)
    bias = self.param("selection_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("expert",)),
                      (self.num_experts,), jnp.float32)
    _, indices = top_k(scores + jax.lax.stop_gradient(bias), self.k)
    weights = jnp.take_along_axis(scores, indices, axis=-1)
    if self.normalize:
      weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    weights = self.scaling * weights
    counts_BE = jnp.sum(jax.nn.one_hot(indices, self.num_experts, dtype=jnp.float32), axis=(1, 2))  # per sequence
    if self.balance_rate > 0:
      load = jnp.sum(counts_BE, axis=0)
      sow_param_update(self, "selection_bias", self.balance_rate * jnp.sign(jnp.mean(load) - load))
    probs = scores / (jnp.sum(scores, axis=-1, keepdims=True) + 1e-20)
    seq_len = x_BTD.shape[1]
    fraction_BE = counts_BE * self.num_experts / (self.k * seq_len)
    sequence_balance = jnp.mean(jnp.sum(jax.lax.stop_gradient(fraction_BE) * jnp.mean(probs, axis=1), -1))
    return Routing(weights, indices, probs, logits, {"sequence_balance": sequence_balance})
