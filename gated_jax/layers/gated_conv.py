"""Gated causal convolutions as sequence mixers: Zoology's BaseConv and Dauphin et al.'s gated conv layers.

* ``"base_conv"``, BaseConv (Arora et al., "Zoology", arXiv 2312.04927 §4 and Appendix; Zoology's
  ``mixers/base_conv.py``): ``y = (W u + b) ⊙ (κ * u) + u`` with ``κ`` a depthwise causal convolution of
  width 3 (with bias) — a short convolution gated by a linear map, plus the identity. Zoology puts one before
  every mixer of its MQAR models (its ``Hybrid`` stacks alternate BaseConv and the mixer). ``activation=True``
  is Zoology's ``use_act``: SiLU on both factors.
* ``"gated_conv"`` (Dauphin et al., "Language Modeling with Gated Convolutional Networks", arXiv 1612.08083
  eq. 1-2): a full causal convolution over channels, ``A = X * W + b``, ``B = X * V + c``, then the gate:
  ``"glu"`` ``A ⊗ σ(B)`` (eq. 2), ``"gtu"`` ``tanh(A) ⊗ σ(B)``, ``"bilinear"`` ``A ⊗ B``, and the ungated
  controls ``"relu"``, ``"tanh"``, ``"linear"`` (``A`` alone) of §4.3 / Figure 3.

Both are causal; decode keeps the last ``K - 1`` inputs (``conv.causal_taps``) and agrees with the full
forward; packed segments never see each other. Their cache has a ``cache_index`` like the other mixers'.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels import _checks
from gated_jax.layers.conv import ShortConv, causal_taps
from gated_jax.layers.linear_base import cache_mode, check_flag, check_positive_float
from gated_jax.layers.registry import MIXERS

GATES = {
    "glu": lambda a, b: a * nn.sigmoid(b),
    "gtu": lambda a, b: jnp.tanh(a) * nn.sigmoid(b),
    "bilinear": lambda a, b: a * b,
    "relu": lambda a, b: nn.relu(a),
    "tanh": lambda a, b: jnp.tanh(a),
    "linear": lambda a, b: a,
}
_TWO_BRANCH = ("glu", "gtu", "bilinear")
ZOOLOGY_INIT_STD = 0.02  # Zoology's _init_weights: every nn.Linear N(0, 0.02), bias 0 (convs keep PyTorch's)


def dense(width: int, init_std: float, dtype, name: str, axes: tuple[str, str] = ("embed", "mlp")) -> nn.Dense:
  """A linear map with Zoology's init: kernel ``N(0, init_std)``, bias 0."""
  return nn.Dense(width, dtype=dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.normal(init_std), axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


class ConvMixer(nn.Module):
  """Shared fields and input checks of the convolutional mixers.

  Attributes:
    d_model: input/output width D.
    num_heads: unused (the ``MIXERS`` call contract passes it); the convolutions have no heads.
    kernel_size: taps of the causal convolution.
    dtype: compute dtype (parameters are float32).
  """
  d_model: int
  num_heads: int = 1
  kernel_size: int = 3
  dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ("d_model", "num_heads", "kernel_size"):
      _checks.check_positive_int(name, getattr(self, name), allow_none=False)
    super().__post_init__()

  def _start(self, x_BTD: jax.Array, segment_ids: jax.Array | None, decode: bool) -> tuple[jax.Array, str]:
    """Checks the inputs; returns ``x`` in the compute dtype and the cache mode."""
    _checks.check_array("x_BTD", x_BTD, rank=3, layout="(batch, seq, d_model)")
    if x_BTD.shape[-1] != self.d_model:
      raise ValueError(f"x_BTD: got last dim {x_BTD.shape[-1]}; allowed: d_model={self.d_model}")
    if segment_ids is not None:
      _checks.check_array("segment_ids", segment_ids, rank=2, layout="(batch, seq)", floating=False)
      _checks.check_shape("segment_ids", segment_ids, x_BTD.shape[:2], "(batch, seq)")
    return nn.with_logical_constraint(x_BTD.astype(self.dtype), ("batch", "length", "embed")), \
        cache_mode(self, decode)

  def _finish(self, y_BTD: jax.Array, x_BTD: jax.Array, mode: str) -> jax.Array:
    if mode != "off":
      index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
      if mode == "step":
        index.value = index.value + x_BTD.shape[1]
    return nn.with_logical_constraint(y_BTD.astype(x_BTD.dtype), ("batch", "length", "embed"))


@MIXERS.register("base_conv")
class BaseConv(ConvMixer):
  """Zoology's BaseConv (module docstring): ``(W u + b) ⊙ conv(u) + u``.

  Attributes:
    activation: SiLU on both factors (Zoology ``use_act``).
    init_std: ``N(0, init_std)`` for the linear map (Zoology's init; its bias starts at 0). The convolution
      keeps PyTorch's ``Conv1d`` default ``U(-1/sqrt(K), 1/sqrt(K))`` for kernel and bias, as in Zoology.
  """
  activation: bool = False
  init_std: float = ZOOLOGY_INIT_STD

  def __post_init__(self):
    check_flag("activation", self.activation)
    check_positive_float("init_std", self.init_std)
    super().__post_init__()

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, decode: bool = False) -> jax.Array:
    """``x_BTD`` -> ``y_BTD``; ``positions`` is unused (the convolution is position-free)."""
    del positions
    u, mode = self._start(x_BTD, segment_ids, decode)
    conv = ShortConv(self.kernel_size, activation=False, dtype=self.dtype, use_bias=True, init_std=None,
                     channel_axes=("mlp",), name="conv")(u, segment_ids, mode)
    proj = dense(self.d_model, self.init_std, self.dtype, "proj")(u)
    if self.activation:
      conv, proj = nn.silu(conv), nn.silu(proj)
    return self._finish(proj * conv + u, x_BTD, mode)


@MIXERS.register("gated_conv")
class GatedConv(ConvMixer):
  """Dauphin et al.'s gated causal convolution layer (module docstring); output width D, no projection
  after the gate (the model's residual block wraps it, as the paper's residual blocks do).

  Attributes:
    gate: a ``GATES`` name.
    init_std: ``N(0, init_std)`` for the convolution kernel (bias 0); None: fairseq's GCNN init
      ``sqrt(4 / (K * D))`` (``fconv``: ``sqrt(4 (1 - dropout) / (K * C_in))`` with dropout 0).
  """
  kernel_size: int = 4
  gate: str = "glu"
  init_std: float | None = None

  def __post_init__(self):
    _checks.check_choice("gate", self.gate, tuple(GATES))
    if self.init_std is not None:
      check_positive_float("init_std", self.init_std)
    super().__post_init__()

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, decode: bool = False) -> jax.Array:
    """``x_BTD`` -> ``y_BTD``; ``positions`` is unused."""
    del positions
    x, mode = self._start(x_BTD, segment_ids, decode)
    branches = 2 if self.gate in _TWO_BRANCH else 1
    std = math.sqrt(4.0 / (self.kernel_size * self.d_model)) if self.init_std is None else self.init_std
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(std),
                                                               (None, "embed", None, "mlp")),
                        (self.kernel_size, self.d_model, branches, self.d_model), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None, "mlp")),
                      (branches, self.d_model), jnp.float32)
    taps = causal_taps(self, x, segment_ids, mode, self.kernel_size)
    h = jnp.einsum("kbtd,kdne->bnte", taps, kernel.astype(self.dtype)) + bias.astype(self.dtype)[:, None]
    y = GATES[self.gate](h[:, 0], h[:, -1])
    return self._finish(y, x_BTD, mode)
