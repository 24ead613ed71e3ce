"""Routers whose number of active experts varies per token or over training (adaptive top-k, top-p, the
dense-to-sparse temperature gates) and the Gumbel-softmax gate. Inactive slots carry the sentinel id and weight
0 (:func:`~gated_jax.layers.moe.routing.deactivate`). Gumbel noise comes from the shared stochastic-gate
toolkit, :func:`gated_jax.layers.discrete_gates.gumbel_softmax`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gated_jax.layers import discrete_gates
from gated_jax.layers.collections import noise_key
from gated_jax.layers.moe import losses
from gated_jax.layers.moe.routing import ROUTERS, Router, Routing, check_choice, deactivate, linear_schedule, top_k


@ROUTERS.register("adaptive")
class AdaptiveTopK(Router):
  """Adaptive gating (Li et al., EMNLP 2023, arXiv 2310.07188 §3): a token uses its top-1 expert, and its
  top-2 expert too when the router is unsure, ``p_(1) − p_(2) < threshold``. For ``k > 2`` slot ``j`` is kept
  when ``p_(1) − p_(j) < threshold``. Kept weights are renormalised to sum to 1 (``renormalize``, GShard's top-2
  normalisation), so a top-1 token gets weight 1.
  """
  threshold: float = 0.1
  renormalize: bool = True

  @nn.compact
  def __call__(self, x_BTD: jax.Array, train_step: Any = None) -> Routing:
    del train_step
    self.check_fields()
    logits = self.logits(x_BTD)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, indices = top_k(probs, self.k)
    keep = (weights[..., :1] - weights) < self.threshold
    keep = keep.at[..., 0].set(True)
    weights, indices = deactivate(weights, indices, keep, self.num_experts)
    if self.renormalize:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(weights, indices, probs, logits)


@ROUTERS.register("top_p")
class TopP(Router):
  """Top-p (dynamic) routing (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE
  Models", arXiv 2403.07652 §3): the smallest set of experts, largest probability first, whose probabilities
  sum to at least ``p``, capped at ``k`` slots; weights are the probabilities themselves. The paper's dynamic
  loss, the router entropy ``−Σ p log p`` that keeps the distribution from flattening into many active
  experts, is reported as ``top_p_entropy`` in ``Routing.aux``.
  """
  p: float = 0.4

  @nn.compact
  def __call__(self, x_BTD: jax.Array, train_step: Any = None) -> Routing:
    del train_step
    self.check_fields()
    if not 0 < self.p <= 1:
      raise ValueError(f"p: got {self.p!r}; allowed: 0 < p <= 1")
    logits = self.logits(x_BTD)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, indices = top_k(probs, self.k)
    mass_before = jnp.cumsum(weights, axis=-1) - weights  # mass of the better experts
    weights, indices = deactivate(weights, indices, mass_before < self.p, self.num_experts)
    return Routing(weights, indices, probs, logits, {"top_p_entropy": losses.entropy(probs)})


class _DenseToSparse(Router):
  """``p = softmax((act(x W) + g) / τ)`` with τ annealed linearly from ``tau_start`` to ``tau_end`` over
  ``tau_steps`` training steps (``tau_end`` outside training); the top-``k`` experts whose weight is at least
  ``threshold`` are used, weighted by ``p`` (not renormalised). ``g`` is Gumbel(0, 1) noise during training when
  ``gumbel``. High τ spreads weight over many experts (dense), low τ concentrates it (sparse); slots are capped
  at ``k`` so compute stays bounded.
  """
  activation: str = "none"
  gumbel: bool = False
  tau_start: float = 2.0
  tau_end: float = 0.3
  tau_steps: int = 1000
  threshold: float = 1e-3

  def temperature(self, train_step) -> jax.Array:
    return linear_schedule(train_step, self.tau_start, self.tau_end, self.tau_steps)

  @nn.compact
  def __call__(self, x_BTD: jax.Array, train_step: Any = None) -> Routing:
    self.check_fields()
    check_choice("activation", self.activation, ("none", "tanh", "sigmoid"))
    if not (self.tau_start > 0 and self.tau_end > 0):
      raise ValueError(f"tau_start, tau_end: got {self.tau_start!r}, {self.tau_end!r}; allowed: positive floats")
    logits = self.logits(x_BTD)
    scores = {"none": lambda z: z, "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid}[self.activation](logits)
    key = noise_key(self) if self.gumbel else None
    probs = discrete_gates.gumbel_softmax(scores, key, self.temperature(train_step))
    weights, indices = top_k(probs, self.k)
    weights, indices = deactivate(weights, indices, weights >= self.threshold, self.num_experts)
    return Routing(weights, indices, probs, logits)


@ROUTERS.register("dts")
class DTSGate(_DenseToSparse):
  """DTS-Gate of EvoMoE (Nie et al. 2021, arXiv 2112.14397 §3.3): Gumbel-softmax over the raw logits with a
  temperature annealed from dense (τ = 2) to sparse (τ = 0.3), experts kept above a 1e-3 weight threshold.
  Evaluation uses the same rule without noise at the final temperature."""
  gumbel: bool = True


@ROUTERS.register("activation_dts")
class ActivationDTSGate(_DenseToSparse):
  """Activation dense-to-sparse gate (Nguyen, Akbarian, Ho, ICML 2024, "Is Temperature Sample Efficient for
  Softmax Gaussian MoE?", arXiv 2401.13875 §4): the linear gate's output goes through an activation (tanh by
  default) *before* the temperature softmax, ``softmax(act(x W) / τ)``, which removes the temperature–parameter
  interaction that slows plain temperature gates to sub-polynomial rates. No Gumbel noise."""
  activation: str = "tanh"


@ROUTERS.register("gumbel")
class GumbelGate(Router):
  """Gumbel-softmax gating (GG-MoE, Chernov 2025, arXiv 2502.03608; Gumbel-softmax: Jang et al. 2017, arXiv
  1611.01144 eq. 1): in training the gate is a Gumbel-softmax sample ``softmax((x W + g) / τ)`` over all
  experts, a stochastic regulariser; the top-k experts of the sample are used with their sampled weights. At
  inference the gate is the Monte-Carlo average of ``eval_samples`` samples (the paper reports ~10 suffice),
  drawn from a fixed key so evaluation is deterministic; ``eval_samples=0`` uses the noiseless
  ``softmax(x W / τ)``. ``probs`` is the (sampled or averaged) gate.
  """
  temperature: float = 1.0
  eval_samples: int = 10
  eval_seed: int = 0

  @nn.compact
  def __call__(self, x_BTD: jax.Array, train_step: Any = None) -> Routing:
    del train_step
    self.check_fields()
    if isinstance(self.eval_samples, bool) or not isinstance(self.eval_samples, int) or self.eval_samples < 0:
      raise ValueError(f"eval_samples: got {self.eval_samples!r}; allowed: an int >= 0")
    logits = self.logits(x_BTD)
    key = noise_key(self)
    if key is not None:
      probs = discrete_gates.gumbel_softmax(logits, key, self.temperature)
    elif self.eval_samples:
      keys = jax.random.split(jax.random.PRNGKey(self.eval_seed), self.eval_samples)
      probs = jnp.mean(jax.vmap(lambda k: discrete_gates.gumbel_softmax(logits, k, self.temperature))(keys), 0)
    else:
      probs = discrete_gates.gumbel_softmax(logits, None, self.temperature)
    weights, indices = top_k(probs, self.k)
    return Routing(weights, indices, probs, logits)
