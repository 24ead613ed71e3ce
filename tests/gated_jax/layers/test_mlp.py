"""Tests for gated_jax.layers.mlp: every registered MLP against its numpy formula, alpha, GoLU, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy import testing as npt
from scipy.special import erf

from gated_jax.layers import MLPS
from gated_jax.layers.mlp import golu

D, F = 6, 10
_sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
_gelu = lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2)))  # noqa: E731
_ACT = {
    "swiglu": lambda x: x * _sig(x), "geglu": _gelu, "reglu": lambda x: np.maximum(x, 0), "gelu": _gelu,
    "xgelu": lambda x, a: x * ((1 + 2 * a) * 0.5 * (1 + erf(x / np.sqrt(2))) - a),
    "xsilu": lambda x, a: x * ((1 + 2 * a) * _sig(x) - a),
    "golu": lambda x: x * np.exp(-np.exp(-x)),
}


def test_registry_names():
  assert set(_ACT) <= set(MLPS.names())


@pytest.mark.parametrize("name", sorted(_ACT))
def test_matches_numpy_formula(name):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, D)) * 2
  mlp = MLPS.get(name)(d_model=D, hidden_dim=F)
  boxed = mlp.init(jax.random.PRNGKey(1), x)["params"]
  assert boxed["wi"]["kernel"].names == ("embed", "mlp") and boxed["wo"]["kernel"].names == ("mlp", "embed")
  params = nn.unbox(boxed)
  glu = name in ("swiglu", "geglu", "reglu")
  assert ("wi_up" in params) == glu
  expanded = name in ("xgelu", "xsilu")
  if expanded:
    assert float(params["alpha"]) == 0.0
    params["alpha"] = jnp.asarray(0.3)
  scale = lambda k: {"kernel": params[k]["kernel"] * 10}  # noqa: E731  (larger pre-activations)
  params = {**params, "wi": scale("wi")}
  y = jax.jit(mlp.apply)({"params": params}, x)
  xn = np.asarray(x, np.float64)
  h = xn @ np.asarray(params["wi"]["kernel"], np.float64)
  h = _ACT[name](h, 0.3) if expanded else _ACT[name](h)
  if glu:
    h = h * (xn @ np.asarray(params["wi_up"]["kernel"], np.float64))
  npt.assert_allclose(y, h @ np.asarray(params["wo"]["kernel"], np.float64), rtol=1e-4, atol=1e-6)


def test_expanded_mlp_with_zero_alpha_is_the_plain_one():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, D))
  params = nn.unbox(MLPS.get("xgelu")(d_model=D, hidden_dim=F).init(jax.random.PRNGKey(1), x)["params"])
  plain = {k: v for k, v in params.items() if k != "alpha"}
  npt.assert_allclose(MLPS.get("xgelu")(d_model=D, hidden_dim=F).apply({"params": params}, x),
                      MLPS.get("gelu")(d_model=D, hidden_dim=F).apply({"params": plain}, x), rtol=1e-5, atol=1e-7)


def test_golu_is_finite_with_finite_gradient_far_left():
  x = jnp.array([-1e4, -200.0, -5.0, 0.0, 5.0])
  with np.errstate(over="ignore"):
    expected = np.asarray(x) * np.exp(-np.exp(-np.asarray(x, np.float64)))
  npt.assert_allclose(golu(x), expected, atol=1e-6)
  grad = jax.grad(lambda v: jnp.sum(golu(v)))(x)
  assert bool(jnp.all(jnp.isfinite(grad)))
  npt.assert_allclose(grad[3], np.exp(-1.0), rtol=1e-6)  # d/dx at 0: e^{-1}(1 + 0)


def test_bfloat16_output_dtype():
  x = jnp.ones((1, 2, D), jnp.bfloat16)
  mlp = MLPS.get("swiglu")(d_model=D, hidden_dim=F, dtype=jnp.bfloat16)
  assert mlp.apply(mlp.init(jax.random.PRNGKey(0), x), x).dtype == jnp.bfloat16


def test_errors():
  with pytest.raises(ValueError, match="x_BTD"):
    MLPS.get("swiglu")(d_model=D, hidden_dim=F).init(jax.random.PRNGKey(0), jnp.ones((1, 2, D + 1)))
  with pytest.raises(ValueError, match="hidden_dim"):
    MLPS.get("gelu")(d_model=D, hidden_dim=0).init(jax.random.PRNGKey(0), jnp.ones((1, 2, D)))
  with pytest.raises(ValueError, match="mlp"):
    MLPS.get("swish")
