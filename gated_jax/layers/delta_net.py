"""Delta-rule mixers: DeltaNet and Gated DeltaNet (both on ``pallas_kernels.delta_rule``).

Both follow fla's layers by default: q and k go through the feature map (fla's ``qk_activation``, SiLU by
default) after the optional short conv, v through SiLU — whether the short conv is on or off — and q, k are
then normalised (L2 by default).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _checks
from gated_jax.layers.linear_base import LinearMixer, check_flag, check_positive_float
from gated_jax.layers.registry import MIXERS


@MIXERS.register("deltanet")
class DeltaNet(LinearMixer):
  """DeltaNet, Yang et al. arXiv 2406.06484 eq. 2 (fla ``DeltaNet``):
  ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` with ``beta = sigmoid(b_proj x)`` (times 2 with
  ``allow_neg_eigval``: eigenvalues in (-1, 1), Grazzi et al. arXiv 2411.12537; 1 with ``use_beta=False``),
  q/k/v through a size-4 short conv, then ``feature_map`` on q/k and SiLU on v, q/k normalised
  (``qk_norm`` "l2" or fla's "sum"); output per-head RMSNorm (gated when ``output_gate`` != "none").

  fla's ``qk_activation`` is ``feature_map`` here ("silu" -> "swish", "relu", "elu" -> "elu_plus_one",
  "identity"); the short conv itself has no activation by default (``conv_activation``), so SiLU is applied
  exactly once whether the conv is on or off.

  Attributes:
    use_beta: learn ``beta`` (False: ``beta = 1``, a pure delta-rule overwrite).
    allow_neg_eigval: ``beta = 2 sigmoid(.)``.
  """
  supports_kv_heads: ClassVar[bool] = False
  feature_map: str = "swish"
  qk_norm: str = "l2"
  use_short_conv: bool = True
  conv_activation: bool = False
  use_beta: bool = True
  allow_neg_eigval: bool = False

  def __post_init__(self):
    check_flag("use_beta", self.use_beta)
    check_flag("allow_neg_eigval", self.allow_neg_eigval)
    super().__post_init__()

  def _qkv(self, x, log_decay, segment_ids, mode):
    q, k, v = super()._qkv(x, log_decay, segment_ids, mode)
    return q, k, nn.silu(v)

  def _beta(self, x):
    heads = self.value_heads
    if not self.use_beta:
      beta = jnp.ones((*x.shape[:2], heads), jnp.float32)
    else:
      beta = jax.nn.sigmoid(self.dense(x, (heads,), ("embed", "heads"), "b_proj").astype(jnp.float32))
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
  log-uniform in ``[1e-3, 0.1]``), SiLU then L2-normalised q/k, SiLU v, short convs, output RMSNorm(o) *
  swish(g_proj(x)).

  Separate value heads (fla's GVA, ``num_v_heads`` > ``num_heads``): values, ``beta``, the gate, the output
  gate and the state have ``num_v_heads`` heads; value head ``j`` reads query/key head
  ``j // (num_v_heads / num_heads)``.

  Attributes:
    head_dim: key head dim (None: ``expand_k * d_model / num_heads``); values are ``expand_v * head_dim``.
    num_v_heads: value heads (None: ``num_heads``), a multiple of ``num_heads``.
    a_init_range: ``(low, high)`` of the uniform init of ``A``.
    dt_min, dt_max, dt_init_floor: the ``dt`` init range and floor.
  """
  head_dim: int | None = None
  num_v_heads: int | None = None
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
    _checks.check_positive_int("num_v_heads", self.num_v_heads)
    if self.num_v_heads is not None and self.num_v_heads % self.num_heads:
      raise ValueError(f"num_v_heads: got {self.num_v_heads}; allowed: a multiple of num_heads={self.num_heads}")
    super().__post_init__()

  @property
  def key_dim(self) -> int:
    return super().key_dim if self.head_dim is None else self.head_dim

  @property
  def value_dim(self) -> int:
    return super().value_dim if self.head_dim is None else int(self.head_dim * self.expand_v)

  @property
  def value_heads(self) -> int:
    return self.num_heads if self.num_v_heads is None else self.num_v_heads

  def _qkv(self, x, log_decay, segment_ids, mode):
    q, k, v = super()._qkv(x, log_decay, segment_ids, mode)
    group = self.value_heads // self.num_heads
    return jnp.repeat(q, group, axis=2), jnp.repeat(k, group, axis=2), v

  def _log_decay(self, x):
    heads = self.value_heads
    a_log = self.param("A_log", nn.with_logical_partitioning(_a_log_init(*self.a_init_range), ("heads",)),
                       (heads,), jnp.float32)
    dt_bias = self.param("dt_bias", nn.with_logical_partitioning(
        _dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor), ("heads",)), (heads,), jnp.float32)
    a = self.dense(x, (heads,), ("embed", "heads"), "a_proj").astype(jnp.float32)
    return -jnp.exp(a_log) * jax.nn.softplus(a + dt_bias)
