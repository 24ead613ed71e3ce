"""Auxiliary losses and routing metrics of a mixture-of-experts layer (all float32 scalars).

* :func:`load_balance`: the Switch Transformer loss (arXiv 2101.03961 eqs. 4-6), ``E · Σ_i f_i · P_i``, with
  ``f_i`` the fraction of the *active routing slots* assigned to expert ``i`` (so it sums to 1 for any k, as
  in the top-k normalisation of huggingface/transformers#43775) and ``P_i`` the mean of the router's full
  distribution over experts. A uniform router gives exactly 1 whatever the assignment; routing every token to
  one expert with a one-hot distribution gives E. Only ``P`` carries gradient.
* :func:`z_loss`: ST-MoE's router z-loss (arXiv 2202.08906 eq. 5), ``mean_tokens (logsumexp_j z_j)²``.
* :func:`cv_squared`: ``var / (mean² + 1e-10)`` over experts (Shazeer et al. 2017, arXiv 1701.06538 eq. 7).
* metrics: load coefficient of variation and max/mean over experts, mean router entropy (nats).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def expert_load(indices: jax.Array, num_experts: int) -> jax.Array:
  """``(E,)`` float32: how many routing slots went to each expert (the sentinel ``num_experts`` not counted)."""
  flat = indices.reshape(-1)
  return jax.ops.segment_sum(jnp.ones(flat.shape, jnp.float32), flat, num_segments=num_experts)


def load_balance(probs: jax.Array, indices: jax.Array) -> jax.Array:
  """``E · Σ_i f_i P_i`` (module docstring); ``probs`` ``(..., E)``, ``indices`` ``(..., S)``."""
  num_experts = probs.shape[-1]
  load = expert_load(indices, num_experts)
  fraction = load / jnp.maximum(jnp.sum(load), 1.0)
  mean_prob = jnp.mean(probs.reshape(-1, num_experts).astype(jnp.float32), axis=0)
  return num_experts * jnp.sum(jax.lax.stop_gradient(fraction) * mean_prob)


def z_loss(logits: jax.Array) -> jax.Array:
  """``mean (logsumexp z)²`` over tokens; ``logits`` ``(..., E)``."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def cv_squared(values: jax.Array) -> jax.Array:
  """Squared coefficient of variation of a ``(E,)`` vector (population variance)."""
  values = values.astype(jnp.float32)
  return jnp.var(values) / (jnp.square(jnp.mean(values)) + 1e-10)


def load_metrics(indices: jax.Array, num_experts: int) -> dict[str, jax.Array]:
  """``load_cv`` (std/mean of the per-expert load) and ``load_max_over_mean``; both 0 / 1 when balanced."""
  load = expert_load(indices, num_experts)
  mean = jnp.maximum(jnp.mean(load), 1e-9)
  return {"load_cv": jnp.std(load) / mean, "load_max_over_mean": jnp.max(load) / mean}


def entropy(probs: jax.Array) -> jax.Array:
  """Mean over tokens of ``−Σ_e p_e log p_e`` (nats)."""
  p = probs.astype(jnp.float32)
  return jnp.mean(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1))
