"""Tests for gated_jax.layers.norms: RMSNorm and the per-head RMSNorm against the numpy formula."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy import testing as npt

from gated_jax.layers.norms import HeadRMSNorm, RMSNorm


def _np_rms(x, scale, eps=1e-6):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * np.asarray(scale, np.float64)


def test_rmsnorm_matches_numpy_with_trained_scale():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8)) * 3.0
  norm = RMSNorm()
  params = norm.init(jax.random.PRNGKey(1), x)["params"]
  assert params["scale"].names == ("embed",)
  npt.assert_array_equal(nn.unbox(params["scale"]), np.ones(8))
  scale = jnp.linspace(0.5, 2.0, 8)
  y = jax.jit(norm.apply)({"params": {"scale": scale}}, x)
  npt.assert_allclose(y, _np_rms(x, scale), rtol=1e-5, atol=1e-6)


def test_rmsnorm_computes_in_float32_and_returns_dtype():
  x = (jax.random.normal(jax.random.PRNGKey(0), (2, 4, 16)) * 100).astype(jnp.bfloat16)
  norm = RMSNorm()
  y = norm.apply(norm.init(jax.random.PRNGKey(0), x), x)
  chex.assert_type(y, jnp.bfloat16)
  npt.assert_allclose(np.asarray(y, np.float32), _np_rms(np.asarray(x, np.float32), 1.0), rtol=1e-2, atol=1e-2)
  y32 = RMSNorm(dtype=jnp.float32).apply(norm.init(jax.random.PRNGKey(0), x), x)
  chex.assert_type(y32, jnp.float32)


@pytest.mark.parametrize("axes,scale_shape", [(("head_dim",), (4,)), (("heads", "head_dim"), (3, 4))])
def test_head_rmsnorm_normalises_each_head(axes, scale_shape):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 4)) * jnp.array([1.0, 10.0, 100.0])[:, None]
  norm = HeadRMSNorm(scale_axes=axes)
  params = norm.init(jax.random.PRNGKey(0), x)["params"]
  assert params["scale"].names == axes and params["scale"].value.shape == scale_shape
  scale = jax.random.uniform(jax.random.PRNGKey(2), scale_shape, minval=0.5, maxval=2.0)
  y = jax.jit(norm.apply)({"params": {"scale": scale}}, x)
  npt.assert_allclose(y, _np_rms(x, scale), rtol=1e-5, atol=1e-6)


def test_rank_error():
  with pytest.raises(ValueError, match="x: got shape"):
    HeadRMSNorm(scale_axes=("heads", "head_dim")).init(jax.random.PRNGKey(0), jnp.ones((4,)))
