"""Parameters for tests that need some weights of the right shapes: drawn with numpy from the shapes of
``init`` traced by ``jax.eval_shape``, so no initialiser is compiled."""

import flax
import jax
import jax.numpy as jnp
import numpy as np


def random_params(module, *args, scale=0.3, seed=0, **kwargs):
  """``N(0, scale²)`` arrays shaped like ``module.init(key, *args, **kwargs)["params"]`` (unboxed)."""
  shapes = flax.core.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), s.dtype), shapes["params"])
