"""Delta-rule mixers: DeltaNet and Gated DeltaNet (both on ``pallas_kernels.delta_rule``)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gated_jax.layers.linear_base import LinearMixer, check_flag, check_positive_float
from gated_jax.layers.registry import MIXERS


@MIXERS.register("deltanet")
class DeltaNet(LinearMixer):
  """DeltaNet, Yang et al. arXiv 2406.06484 eq. 2 (fla ``DeltaNet``):
  ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` with ``beta = sigmoid(b_proj x)`` (times 2 with
  ``allow_neg_eigval``: eigenvalues in (-1, 1), Grazzi et al. arXiv 2411.12537), q/k/v through a size-4
  short conv with SiLU, q/k L2-normalised; output per-head RMSNorm (gated when ``output_gate`` != "none").

  Attributes:
    allow_neg_eigval: ``beta = 2 sigmoid(.)``.
  """
  qk_norm: bool = True
  use_short_conv: bool = True
  allow_neg_eigval: bool = False

  def __post_init__(self):
    check_flag("allow_neg_eigval", self.allow_neg_eigval)
    super().__post_init__()

  def _beta(self, x):
    beta = jax.nn.sigmoid(self.dense(x, (self.num_heads,), ("embed", "heads"), "b_proj").astype(jnp.float32))
    return 2.0 * beta if self.allow_neg_eigval else beta

  def _mix(self, q, k, v, log_decay, x, segment_ids, mode, positions):
    del positions
    return self.recurrence(q, k, v, log_decay, segment_ids, mode, beta=self._beta(x))


def _a_log_init(low: float, high: float):
  """``A_log = log A``, ``A ~ U(low, high)`` (floored at 1e-4 so the log stays finite)."""
  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jnp.log(jnp.maximum(jax.random.uniform(key, shape, dtype, low, high), 1e-4))
  return init


def _dt_bias_init(dt_min: float, dt_max: float, floor: float):
  """``dt_bias = softplus^-1(dt)``, ``dt`` log-uniform in ``[dt_min, dt_max]``, floored (Mamba-2)."""
  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    u = jax.random.uniform(key, shape, dtype)
    dt = jnp.maximum(jnp.exp(u * (np.log(dt_max) - np.log(dt_min)) + np.log(dt_min)), floor)
    return dt + jnp.log(-jnp.expm1(-dt))
  return init


@MIXERS.register("gated_deltanet")
class GatedDeltaNet(DeltaNet):
  """Gated DeltaNet, Yang et al. arXiv 2412.06464 eq. 10 (fla ``GatedDeltaNet``):
  ``S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` with the Mamba-2 gate
  ``log alpha_t = -exp(A_log) softplus(a_proj(x_t) + dt_bias)`` per head (``A ~ U(0, 16)``, ``dt``
  log-uniform in ``[1e-3, 0.1]``), L2-normalised q/k, short convs, output RMSNorm(o) * swish(g_proj(x)).

  Attributes:
    head_dim: key head dim (None: ``expand_k * d_model / num_heads``); values are ``expand_v * head_dim``.
    a_init_range: ``(low, high)`` of the uniform init of ``A``.
    dt_min, dt_max, dt_init_floor: the ``dt`` init range and floor.
  """
  head_dim: int | None = None
  expand_v: float = 2.0
  output_gate: str = "swish"
  a_init_range: tuple[float, float] = (0.0, 16.0)
  dt_min: float = 1e-3
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4

  def __post_init__(self):
    if self.head_dim is not None and (isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int)
                                      or self.head_dim <= 0):
      raise ValueError(f"head_dim: got {self.head_dim!r}; allowed: None or a positive int")
    low_high = tuple(self.a_init_range) if isinstance(self.a_init_range, (tuple, list)) else ()
    if len(low_high) != 2 or not 0 <= low_high[0] < low_high[1]:
      raise ValueError(f"a_init_range: got {self.a_init_range!r}; allowed: (low, high) with 0 <= low < high")
    for name in ("dt_min", "dt_max", "dt_init_floor"):
      check_positive_float(name, getattr(self, name))
    if not self.dt_min < self.dt_max:
      raise ValueError(f"dt_max: got {self.dt_max!r}; allowed: a number > dt_min={self.dt_min!r}")
    if self.head_dim is not None and float(self.head_dim * self.expand_v) != int(self.head_dim * self.expand_v):
      raise ValueError(f"expand_v: got {self.expand_v!r}; allowed: head_dim * expand_v must be a whole number")
    super().__post_init__()

  @property
  def key_dim(self) -> int:
    return super().key_dim if self.head_dim is None else self.head_dim

  @property
  def value_dim(self) -> int:
    return super().value_dim if self.head_dim is None else int(self.head_dim * self.expand_v)

  def _log_decay(self, x):
    a_log = self.param("A_log", nn.with_logical_partitioning(_a_log_init(*self.a_init_range), ("heads",)),
                       (self.num_heads,), jnp.float32)
    dt_bias = self.param("dt_bias", nn.with_logical_partitioning(
        _dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor), ("heads",)), (self.num_heads,), jnp.float32)
    a = self.dense(x, (self.num_heads,), ("embed", "heads"), "a_proj").astype(jnp.float32)
    return -jnp.exp(a_log) * jax.nn.softplus(a + dt_bias)
