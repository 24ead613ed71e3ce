"""Residual-stream statistics the LM sows for the outlier/attention-sink diagnostics.

``max_abs`` is the largest |hidden-state| entry (the per-layer term of the Gated Attention paper's
"M-Act", arXiv 2505.06708 Table 4); ``kurtosis`` is the excess-free fourth standardised moment
``E[(x - mu)^4] / Var(x)^2`` over all entries (3 for a Gaussian), the outlier measure of Bondarenko et al.
(arXiv 2306.12929). Both are computed in float32 and returned as scalars.
"""

import jax
import jax.numpy as jnp


def max_abs(x: jax.Array) -> jax.Array:
  """Largest absolute entry of ``x`` as a float32 scalar."""
  return jnp.max(jnp.abs(x.astype(jnp.float32)))


def kurtosis(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Fourth standardised moment of all entries of ``x`` (float32 scalar; 3 for a Gaussian)."""
  x = x.astype(jnp.float32)
  centered = x - jnp.mean(x)
  var = jnp.mean(centered**2)
  return jnp.mean(centered**4) / (var**2 + eps)
