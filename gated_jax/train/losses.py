"""Classification losses of the grokking study (Prieto et al., "Grokking at the Edge of Numerical Stability",
arXiv 2501.04697) and its Softmax Collapse measure.

* ``softmax_cross_entropy(logits, labels, dtype)``: cross-entropy with the log-softmax evaluated in ``dtype``
  (the paper compares float16/32/64, its Figure 2).
* ``stablemax_cross_entropy(logits, labels, dtype)``: ``-log StableMax(z)_y`` with
  ``StableMax(z)_i = s(z_i) / Σ_j s(z_j)``, ``s(x) = x + 1`` for ``x >= 0`` and ``1 / (1 - x)`` below (the
  paper's eq. for StableMax): linear growth instead of ``exp``, so large logits do not absorb the small terms.
* ``absorbed_fraction(logits, normalizer, dtype)``: the share of rows whose normaliser sum, computed in
  ``dtype``, equals the largest term alone — every other class is absorbed, so the log-probability of the top
  class is exactly 0 and a correctly classified sample contributes exactly zero loss (Softmax Collapse).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NORMALIZERS = ("softmax", "stablemax")


def _check(logits: jax.Array, labels: jax.Array | None, normalizer: str | None = None) -> None:
  if logits.ndim != 2:
    raise ValueError(f"logits: got shape {logits.shape}; allowed: (batch, classes)")
  if labels is not None and (labels.shape != logits.shape[:1] or not jnp.issubdtype(labels.dtype, jnp.integer)):
    raise ValueError(f"labels: got {labels.dtype}{tuple(labels.shape)}; allowed: integer labels of shape "
                     f"({logits.shape[0]},)")
  if normalizer is not None and normalizer not in NORMALIZERS:
    raise ValueError(f"normalizer: got {normalizer!r}; allowed: {', '.join(NORMALIZERS)}")


def _stable_s(x: jax.Array) -> jax.Array:
  return jnp.where(x >= 0, x + 1.0, 1.0 / (1.0 - jnp.minimum(x, 0.0)))


def log_stablemax(logits: jax.Array) -> jax.Array:
  """``log StableMax`` over the last axis, in ``logits.dtype``."""
  s = _stable_s(logits)
  return jnp.log(s) - jnp.log(jnp.sum(s, axis=-1, keepdims=True))


def _nll(log_probs: jax.Array, labels: jax.Array) -> jax.Array:
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1))


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Mean cross-entropy with ``log_softmax`` in ``dtype`` (returned in ``dtype``)."""
  _check(logits, labels)
  return _nll(jax.nn.log_softmax(logits.astype(dtype), axis=-1), labels)


def stablemax_cross_entropy(logits: jax.Array, labels: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Mean ``-log StableMax(z)_y`` in ``dtype`` (module docstring)."""
  _check(logits, labels)
  return _nll(log_stablemax(logits.astype(dtype)), labels)


def absorbed_fraction(logits: jax.Array, normalizer: str = "softmax", dtype=jnp.float32) -> jax.Array:
  """Share of rows whose normaliser sum in ``dtype`` equals its largest term (module docstring)."""
  _check(logits, None, normalizer)
  z = logits.astype(dtype)
  if normalizer == "softmax":
    terms = jnp.exp(z - jnp.max(z, axis=-1, keepdims=True))  # the largest term is exactly 1
  else:
    terms = _stable_s(z)
  return jnp.mean((jnp.sum(terms, axis=-1) == jnp.max(terms, axis=-1)).astype(jnp.float32))
