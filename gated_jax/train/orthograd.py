"""⊥Grad as an optax transformation: each parameter tensor's gradient projected orthogonal to that tensor
(Prieto et al., "Grokking at the Edge of Numerical Stability", ICLR 2025, arXiv 2501.04697).

After a model fits its training set, the gradient of the cross-entropy aligns with the weights themselves
("naïve loss minimisation": scaling the logits up lowers the loss without changing a prediction), which drives
the logits into Softmax Collapse. ⊥Grad removes that component from each parameter tensor ``w``'s gradient
``g`` before the base optimizer sees it:

    g_⊥ = g - (<w, g> / (<w, w> + eps)) w,        g ← g_⊥ · ‖g‖ / (‖g_⊥‖ + eps)

The rescaling to the original norm follows the authors' code (``orthograd.py`` of their repository);
``rescale=False`` keeps the plain projection. ``orthograd(optax.adamw(...))`` is the paper's ⊥AdamW.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

EPS = 1e-30  # the paper code's epsilon (representable in float32: the smallest normal is 1.2e-38)


def _project(g: jax.Array, w: jax.Array, eps: float, rescale: bool) -> jax.Array:
  g32, w32 = g.astype(jnp.promote_types(g.dtype, jnp.float32)), w.astype(jnp.promote_types(w.dtype, jnp.float32))
  g_orth = g32 - (jnp.vdot(w32, g32) / (jnp.vdot(w32, w32) + eps)) * w32
  if rescale:
    g_orth = g_orth * (jnp.linalg.norm(g32) / (jnp.linalg.norm(g_orth) + eps))
  return g_orth.astype(g.dtype)


def orthogonalize_gradients(eps: float = EPS, rescale: bool = True) -> optax.GradientTransformation:
  """Projects each parameter tensor's update orthogonal to that tensor (module docstring); stateless.

  Args:
    eps: added to ``<w, w>`` and to ``‖g_⊥‖`` (a zero weight tensor leaves its gradient unchanged).
    rescale: rescale ``g_⊥`` to the norm of the incoming update (the paper's code) or not.

  Returns:
    A transformation whose ``update(updates, state, params)`` requires ``params``.
  """
  if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
    raise ValueError(f"eps: got {eps!r}; allowed: a finite float >= 0")
  if not isinstance(rescale, bool):
    raise ValueError(f"rescale: got {rescale!r}; allowed: True or False")

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("params: got None; allowed: the current parameters (orthogonalize_gradients projects "
                       "each update orthogonal to its parameter tensor)")
    return jax.tree.map(lambda g, w: _project(g, w, eps, rescale), updates, params), state

  return optax.GradientTransformation(init, update)


def orthograd(base: optax.GradientTransformation, eps: float = EPS, rescale: bool = True
              ) -> optax.GradientTransformation:
  """``base`` applied to ⊥-projected gradients, e.g. ``orthograd(optax.adamw(1e-2, weight_decay=0.0))``."""
  return optax.chain(orthogonalize_gradients(eps, rescale), base)
