"""Channel mixers: the GLU family and single-activation MLPs, registered in ``MLPS``. No biases; weights
``N(0, 0.02)`` (logical axes ``(embed, mlp)`` in, ``(mlp, embed)`` out). Activations run in float32.

GLU variants (Shazeer 2020, "GLU Variants Improve Transformer", arXiv 2002.05202 eq. 5-6), three matrices:

    FFN(x) = (act(x W) ⊙ x V) W_2       swiglu: act = SiLU (Swish_1), geglu: act = GELU, reglu: act = ReLU

Activation MLPs, two matrices, ``FFN(x) = act(x W) W_2``:

* ``gelu``: exact (erf) GELU (Hendrycks & Gimpel, arXiv 1606.08415).
* ``xgelu`` / ``xsilu``: expanded gating ranges (Huang 2024, arXiv 2405.20768 §3): a self-gated activation
  ``x·g(x)`` with gate ``g`` in (0, 1) gets the gate ``(1 + 2α)·g(x) − α`` with range (−α, 1 + α), one
  trainable scalar ``α`` per MLP block initialised to 0 (so it starts as GELU / SiLU). Source: the paper's
  abstract and summaries ("a trainable parameter for every MLP block to expand the range of the gating
  function beyond zero and one"); the affine form of the expansion is our reading of the stated range.
* ``golu``: Gompertz linear unit (Das et al. 2025, arXiv 2502.03654 eq. 2), ``x·exp(−exp(−x))``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from gated_jax.layers.registry import MLPS

_INIT_STDDEV = 0.02


def _dense(features: int, axes: tuple[str, str], dtype: Any, param_dtype: Any, name: str) -> nn.Dense:
  init = nn.with_logical_partitioning(nn.initializers.normal(_INIT_STDDEV), axes)
  return nn.Dense(features, use_bias=False, kernel_init=init, dtype=dtype, param_dtype=param_dtype, name=name)


def golu(x: jax.Array) -> jax.Array:
  """``x·exp(−exp(−x))``; ``exp(−x)`` is capped where the gate is already 0 in float32 (no inf·0 NaN)."""
  return x * jnp.exp(-jnp.exp(-jnp.maximum(x, -60.0)))


def expanded_gate(gate: jax.Array, alpha: jax.Array) -> jax.Array:
  """Maps a gate in (0, 1) to (−α, 1 + α): ``(1 + 2α)·gate − α`` (arXiv 2405.20768)."""
  return (1.0 + 2.0 * alpha) * gate - alpha


class _MLP(nn.Module):
  """Shared body: ``act(x W_in) [⊙ x W_up] W_out``; subclasses set ``glu`` and ``activate``.

  Attributes:
    d_model: input/output width.
    hidden_dim: hidden width.
    dtype: compute dtype (the output has the input's dtype).
    param_dtype: parameter dtype.
  """
  d_model: int
  hidden_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  glu: ClassVar[bool] = False

  def activate(self, h: jax.Array) -> jax.Array:
    raise NotImplementedError

  @nn.compact
  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    """``x_BTD`` ``(..., d_model)`` -> same shape and dtype."""
    for name in ("d_model", "hidden_dim"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: got {value!r}; allowed: a positive int")
    if x_BTD.shape[-1] != self.d_model:
      raise ValueError(f"x_BTD: got shape {tuple(x_BTD.shape)}; allowed: (..., {self.d_model})")
    h = _dense(self.hidden_dim, ("embed", "mlp"), self.dtype, self.param_dtype, "wi")(x_BTD.astype(self.dtype))
    h = self.activate(h.astype(jnp.float32))
    if self.glu:
      h = h * _dense(self.hidden_dim, ("embed", "mlp"), self.dtype, self.param_dtype, "wi_up")(
          x_BTD.astype(self.dtype)).astype(jnp.float32)
    h = nn.with_logical_constraint(h.astype(self.dtype), ("batch", "length", "mlp"))
    return _dense(self.d_model, ("mlp", "embed"), self.dtype, self.param_dtype, "wo")(h).astype(x_BTD.dtype)


@MLPS.register("swiglu")
class SwiGLU(_MLP):
  """``(SiLU(x W) ⊙ x V) W_2`` (arXiv 2002.05202 eq. 6)."""
  glu: ClassVar[bool] = True

  def activate(self, h):
    return jax.nn.silu(h)


@MLPS.register("geglu")
class GeGLU(_MLP):
  """``(GELU(x W) ⊙ x V) W_2`` (arXiv 2002.05202 eq. 6)."""
  glu: ClassVar[bool] = True

  def activate(self, h):
    return jax.nn.gelu(h, approximate=False)


@MLPS.register("reglu")
class ReGLU(_MLP):
  """``(ReLU(x W) ⊙ x V) W_2`` (arXiv 2002.05202 eq. 6)."""
  glu: ClassVar[bool] = True

  def activate(self, h):
    return jax.nn.relu(h)


@MLPS.register("gelu")
class GeluMLP(_MLP):
  """``GELU(x W) W_2`` (arXiv 1606.08415, exact erf form)."""

  def activate(self, h):
    return jax.nn.gelu(h, approximate=False)


class _ExpandedMLP(_MLP):
  """``x·((1 + 2α)·g(x) − α)`` with a learnable scalar ``α`` (param ``alpha``, init 0; arXiv 2405.20768)."""

  def gate(self, h: jax.Array) -> jax.Array:
    raise NotImplementedError

  def activate(self, h):
    alpha = self.param("alpha", nn.with_logical_partitioning(nn.initializers.zeros, ()), (), self.param_dtype)
    return h * expanded_gate(self.gate(h), alpha.astype(jnp.float32))


@MLPS.register("xgelu")
class XGeluMLP(_ExpandedMLP):
  """xGELU: gate ``Φ(x)`` (the standard normal CDF) expanded to (−α, 1 + α)."""

  def gate(self, h):
    return jax.scipy.stats.norm.cdf(h)


@MLPS.register("xsilu")
class XSiluMLP(_ExpandedMLP):
  """xSiLU: gate ``σ(x)`` expanded to (−α, 1 + α)."""

  def gate(self, h):
    return jax.nn.sigmoid(h)


@MLPS.register("golu")
class GoluMLP(_MLP):
  """``GoLU(x W) W_2``, GoLU(x) = x·exp(−exp(−x)) (arXiv 2502.03654 eq. 2)."""

  def activate(self, h):
    return golu(h)
