"""Softmax-family token-choice routers: top-k softmax, Shazeer's noisy top-k, Laplace (distance) gating, and
hash routing. Each returns a :class:`~gated_jax.layers.moe.routing.Routing` (float32)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gated_jax.layers.collections import noise_key
from gated_jax.layers.moe import losses
from gated_jax.layers.moe.routing import ROUTERS, Router, Routing, top_k

_NOISE_EPSILON = 1e-2  # floor of the learned noise scale (tensor2tensor's noisy_top_k_gating)


@ROUTERS.register("topk_softmax")
class TopKSoftmax(Router):
  """``p = softmax(x W)``, the top-k experts weighted by their probabilities (Switch Transformer arXiv
  2101.03961 eqs. 1-2 for k=1; GShard arXiv 2006.16668 for k=2).

  With ``renormalize`` the k weights are divided by their sum, which equals a softmax over the k selected
  logits (Mixtral arXiv 2401.04088 §2.1: ``softmax(TopK(x W))``).
  """
  renormalize: bool = False

  @nn.compact
  def __call__(self, x_BTD: jax.Array, train_step: Any = None) -> Routing:
    del train_step
    self.check_fields()
    logits = self.logits(x_BTD)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, indices = top_k(probs, self.k)
    if self.renormalize:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(weights, indices, probs, logits)


@ROUTERS.register("noisy_topk")
class NoisyTopK(Router):
  """Noisy top-k gating (Shazeer et al. 2017, arXiv 1701.06538 eqs. 3-5):

      H(x)_i = (x W_g)_i + ε_i · (softplus((x W_noise)_i) + 0.01),   ε ~ N(0, 1) in training, 0 otherwise
      G(x) = softmax(KeepTopK(H(x), k))

  ``W_g`` and ``W_noise`` start at zero (paper §A). Auxiliary losses (``Routing.aux``): ``importance`` =
  CV²(Σ_x G(x)) (eqs. 6-7) and ``load`` = CV²(Σ_x P(x, i)) with the smooth load estimator
  ``P(x, i) = Φ((clean_i − kth_excluding(H, k, i)) / noise_scale_i)`` (Appendix A, eqs. 8-11); without noise the
  load is the hard count of assignments. The 0.01 floor of the noise scale is tensor2tensor's.
  """
  kernel_init: nn.initializers.Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x_BTD: jax.Array, train_step: Any = None) -> Routing:
    del train_step
    self.check_fields(k_max=self.num_experts - 1)
    clean = self.logits(x_BTD)
    key = noise_key(self)
    scale = jax.nn.softplus(self.logits(x_BTD, name="noise_kernel")) + _NOISE_EPSILON
    noisy = clean if key is None else clean + jax.random.normal(key, clean.shape) * scale
    top_values, indices = top_k(noisy, self.k + 1)
    weights = jax.nn.softmax(top_values[..., :self.k], axis=-1)
    indices = indices[..., :self.k]
    gates = jnp.sum(jax.nn.one_hot(indices, self.num_experts) * weights[..., None], axis=-2)
    if key is None:
      load = jnp.sum(jax.nn.one_hot(indices, self.num_experts), axis=(0, 1, 2))
    else:
      load = smooth_load(clean, noisy, scale, top_values)
    aux = {"importance": losses.cv_squared(jnp.sum(gates, axis=(0, 1))), "load": losses.cv_squared(load)}
    return Routing(weights, indices, jax.nn.softmax(noisy, axis=-1), clean, aux)


def smooth_load(clean: jax.Array, noisy: jax.Array, scale: jax.Array, top_values: jax.Array) -> jax.Array:
  """``(E,)``: ``Σ_x P(x, i)``, the probability that expert i stays in the top-k under fresh noise on its own
  logit, the others' noisy logits fixed (arXiv 1701.06538 eqs. 8-10). ``top_values`` are the k + 1 largest noisy
  logits: expert i must beat the k-th largest of the others, which is the (k+1)-th if i is in the top-k and
  the k-th otherwise."""
  k = top_values.shape[-1] - 1
  threshold_if_in, threshold_if_out = top_values[..., k:], top_values[..., k - 1:k]
  normal_cdf = jax.scipy.stats.norm.cdf
  prob = jnp.where(noisy > threshold_if_in, normal_cdf((clean - threshold_if_in) / scale),
                   normal_cdf((clean - threshold_if_out) / scale))
  return jnp.sum(prob, axis=tuple(range(prob.ndim - 1)))


@ROUTERS.register("laplace")
class LaplaceGate(Router):
  """Laplace gating: ``p = softmax(−‖x − w_e‖₂)`` over learned expert centroids ``w_e`` (Nguyen, Han, Harris,
  Saria, Ho 2024, "On Expert Estimation in Hierarchical MoE: Beyond Softmax Gating Functions", arXiv
  2410.02935 §2), then top-k of ``p`` (optionally renormalised). Distances are computed in float32 as
  ``sqrt(max(‖x‖² − 2 x·w + ‖w‖², 0) + 1e-12)``.
  """
  renormalize: bool = False

  @nn.compact
  def __call__(self, x_BTD: jax.Array, train_step: Any = None) -> Routing:
    del train_step
    self.check_fields()
    centroids_DE = self.param("centroids", nn.with_logical_partitioning(self.kernel_init, ("embed", None)),
                              (x_BTD.shape[-1], self.num_experts), jnp.float32)
    x = x_BTD.astype(jnp.float32)
    cross = jnp.einsum("btd,de->bte", x, centroids_DE, precision=jax.lax.Precision.HIGHEST)
    squared = jnp.sum(x * x, -1, keepdims=True) - 2.0 * cross + jnp.sum(centroids_DE ** 2, 0)
    logits = -jnp.sqrt(jnp.maximum(squared, 0.0) + 1e-12)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, indices = top_k(probs, self.k)
    if self.renormalize:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(weights, indices, probs, logits)


@ROUTERS.register("hash")
class HashRouter(Router):
  """Fixed, untrained routing, a baseline (Hash Layers, Roller et al. 2021, arXiv 2106.04426).

  Hash Layers hash the *token id*; an MLP of this library sees only hidden states, so this router hashes the
  input instead: the top-k of ``x R`` for a fixed Gaussian projection ``R`` (seeded by ``seed``, not a
  parameter; random-hyperplane hashing), each chosen expert weighted ``1/k``. Nothing is learned, so the
  logits reported for the z-loss are zeros and the distribution for the balance loss is uniform (both losses
  are constants with no gradient).
  """
  seed: int = 0

  @nn.compact
  def __call__(self, x_BTD: jax.Array, train_step: Any = None) -> Routing:
    del train_step
    self.check_fields()
    projection = jax.random.normal(jax.random.PRNGKey(self.seed), (x_BTD.shape[-1], self.num_experts))
    scores = jnp.einsum("btd,de->bte", jax.lax.stop_gradient(x_BTD.astype(jnp.float32)), projection)
    _, indices = top_k(scores, self.k)
    weights = jnp.full(indices.shape, 1.0 / self.k, jnp.float32)
    zeros = jnp.zeros(scores.shape, jnp.float32)
    return Routing(weights, indices, jax.nn.softmax(zeros, axis=-1), zeros)
