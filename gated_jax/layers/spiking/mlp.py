"""Spiking channel mixer (SymbolicLight's ``SpikingFeedForward``, arXiv 2605.21333): the hidden activation is a
spike ``H(x W - θ)`` trained through a surrogate, so the down projection only adds rows of ``W_2``:

    FFN(x) = H(x W - θ) W_2

Per token and stateless (a LIF neuron's first step from rest), so it fits the ``MLPS`` contract and decoding
needs no state; the spike rate is sown as ``spike_rate`` (``gated_jax.layers.collections``). ``W`` is
LeCun-normal (unit-variance pre-activations on normalised inputs, so a threshold of 1 passes ~16% of them at
initialisation; N(0, 0.02) leaves a narrow model with no spikes at all), ``W_2`` is N(0, 0.02), no biases.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gated_jax.layers.linear_base import check_flag, check_positive_float
from gated_jax.layers.registry import MLPS
from gated_jax.layers.spiking.neurons import sow_rate
from gated_jax.layers.spiking.surrogates import spike_fn

_INIT_STDDEV = 0.02


@MLPS.register("spiking")
class SpikingMLP(nn.Module):
  """``H(x W - θ) W_2`` with a surrogate gradient (module docstring).

  Attributes:
    d_model: input/output width.
    hidden_dim: hidden (spiking) width.
    threshold: firing threshold of the hidden neurons.
    surrogate: surrogate name; surrogate_scale: its scale (None: default).
    rate_loss: also sow the hidden spike rate as the ``spike_rate`` auxiliary loss.
    dtype: compute dtype; param_dtype: parameter dtype.
  """
  d_model: int
  hidden_dim: int
  threshold: float = 1.0
  surrogate: str = "atan"
  surrogate_scale: float | None = None
  rate_loss: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ("d_model", "hidden_dim"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: got {value!r}; allowed: a positive int")
    check_positive_float("threshold", self.threshold)
    check_flag("rate_loss", self.rate_loss)
    spike_fn(self.surrogate, self.surrogate_scale)
    super().__post_init__()

  @nn.compact
  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    """``x_BTD`` ``(..., d_model)`` -> same shape and dtype."""
    if x_BTD.shape[-1] != self.d_model:
      raise ValueError(f"x_BTD: got shape {tuple(x_BTD.shape)}; allowed: (..., {self.d_model})")
    up = nn.Dense(self.hidden_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="wi",
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")))
    h = up(x_BTD.astype(self.dtype)).astype(jnp.float32)
    spikes = spike_fn(self.surrogate, self.surrogate_scale)(h - self.threshold, self.threshold)
    sow_rate(self, spikes, self.rate_loss)
    spikes = nn.with_logical_constraint(spikes.astype(self.dtype), ("batch", "length", "mlp"))
    down = nn.Dense(self.d_model, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="wo",
                    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(_INIT_STDDEV), ("mlp", "embed")))
    return down(spikes).astype(x_BTD.dtype)
