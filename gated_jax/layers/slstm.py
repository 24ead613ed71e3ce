"""sLSTM mixer (xLSTM, Beck et al. arXiv 2405.04517 §2.2 eq. 8-17 and Appendix A.2; the layer of NX-AI's
``xlstm/blocks/slstm/layer.py``).

    x_c           = SiLU(CausalConv_4(x))                       (optional, ``conv_size = 0`` turns it off)
    i~, f~        = headwise(x_c) + b,    z~, o~ = headwise(x) + b   (block-diagonal: one D x D map per head)
    h             = sLSTM recurrence with block-diagonal R        (``pallas_kernels.slstm``)
    y             = head-wise LayerNorm(h), heads concatenated    (no output projection: in xLSTM's
                                                                   post-up-projection block the gated FFN follows)

Exponential input gate, sigmoid (default) or exponential forget gate, normaliser and stabiliser states; the
memory mixing of ``R`` stays within each head. Initialisation as the xLSTM code: input projections small-init
``N(0, 2 / (5 D_model))``, ``R = 0``, biases 0 except the forget gate's "power-law block-dependent" init
``b_f[j] = 5 - 12 (j / (D - 1))^(0.3 + 1.3 layer_idx / (num_layers - 1))`` (+5 ... -7 along the head dim), or
``linspace(3, 6)``. Decode (flax lm1b idiom as the other recurrent mixers): ``init(..., decode=True)`` creates
the ``"cache"`` collection (the state ``(h, c, n, m)``, each ``(B, H, D)`` float32, and the conv window); later
``decode=True`` calls continue from it, so prefill + token-by-token equals the full-sequence call.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels import SLSTMState, _checks
from pallas_kernels.slstm import FORGET_GATES
from gated_jax.layers.conv import ShortConv
from gated_jax.layers.linear_base import cache_mode, check_implementation
from gated_jax.layers.registry import MIXERS, check_mixer_input

FORGET_BIAS_INITS = ("powerlaw_blockdependent", "linspace")


def forget_bias(head_dim: int, kind: str, layer_idx: int, num_layers: int) -> np.ndarray:
  """``(head_dim,)`` initial forget-gate bias (module docstring)."""
  if kind == "linspace":
    return np.linspace(3.0, 6.0, head_dim)
  ratio = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
  position = np.arange(head_dim) / max(head_dim - 1, 1)
  return 5.0 - 12.0 * position ** (0.3 + 1.3 * ratio)


@MIXERS.register("slstm")
class SLSTM(nn.Module):
  """The sLSTM layer as a sequence mixer (module docstring).

  Attributes:
    d_model: model width (= heads x head_dim; the layer keeps the width).
    num_heads: heads H (4 in xLSTM).
    conv_size: taps of the causal conv feeding the input and forget gates (0: none).
    forget_gate: ``"sigmoid"`` or ``"exp"``.
    forget_bias_init: ``"powerlaw_blockdependent"`` or ``"linspace"``.
    layer_idx: this layer's index (for the block-dependent forget bias).
    num_layers: layers in the model.
    norm_eps: epsilon of the head-wise LayerNorm.
    implementation: passed to ``pallas_kernels.slstm`` (None: auto).
    dtype: compute dtype of the projections (the recurrence is float32).
  """
  d_model: int
  num_heads: int = 4
  conv_size: int = 4
  forget_gate: str = "sigmoid"
  forget_bias_init: str = "powerlaw_blockdependent"
  layer_idx: int = 0
  num_layers: int = 1
  norm_eps: float = 1e-6
  implementation: Any = None
  dtype: Any = jnp.float32

  def __post_init__(self):
    _checks.check_positive_int("d_model", self.d_model, allow_none=False)
    _checks.check_positive_int("num_heads", self.num_heads, allow_none=False)
    _checks.check_positive_int("num_layers", self.num_layers, allow_none=False)
    if self.d_model % self.num_heads:
      raise ValueError(f"num_heads: got {self.num_heads!r}; allowed: a divisor of d_model={self.d_model}")
    if isinstance(self.conv_size, bool) or not isinstance(self.conv_size, int) or self.conv_size < 0:
      raise ValueError(f"conv_size: got {self.conv_size!r}; allowed: an int >= 0 (0: no conv)")
    if isinstance(self.layer_idx, bool) or not isinstance(self.layer_idx, int) or not (
        0 <= self.layer_idx < self.num_layers):
      raise ValueError(f"layer_idx: got {self.layer_idx!r}; allowed: an int in [0, num_layers={self.num_layers})")
    _checks.check_choice("forget_gate", self.forget_gate, FORGET_GATES)
    _checks.check_choice("forget_bias_init", self.forget_bias_init, FORGET_BIAS_INITS)
    if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or not self.norm_eps > 0:
      raise ValueError(f"norm_eps: got {self.norm_eps!r}; allowed: a positive number")
    check_implementation(self.implementation)
    super().__post_init__()

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  def _headwise(self, x_BTHD: jax.Array, name: str, forget_bias_D: np.ndarray | None) -> jax.Array:
    """Two gates' pre-activations ``(B, T, H, 2, D)`` through per-head ``D x 2D`` maps plus biases (the
    second gate's bias is ``forget_bias_D`` when given)."""
    heads, dim = self.num_heads, self.head_dim
    init = nn.initializers.normal((2.0 / (5.0 * self.d_model)) ** 0.5)
    kernel = self.param(f"{name}_kernel", nn.with_logical_partitioning(init, ("heads", "head_dim", None, None)),
                        (heads, dim, 2, dim), jnp.float32)
    bias = np.zeros((2, dim), np.float32)
    if forget_bias_D is not None:
      bias[1] = forget_bias_D
    bias = self.param(f"{name}_bias", nn.with_logical_partitioning(
        lambda *_: jnp.broadcast_to(jnp.asarray(bias), (heads, 2, dim)), ("heads", None, "head_dim")))
    y = jnp.einsum("bthd,hdge->bthge", x_BTHD, kernel.astype(self.dtype))
    return y.astype(jnp.float32) + bias

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, decode: bool = False) -> jax.Array:
    """``x_BTD`` -> ``y_BTD`` (dtype of ``x``); see the module docstring for ``decode``."""
    del positions
    check_mixer_input(x_BTD, self.d_model, segment_ids)
    mode = cache_mode(self, decode)
    batch, seq, _ = x_BTD.shape
    heads, dim = self.num_heads, self.head_dim
    x_BTHD = x_BTD.astype(self.dtype).reshape(batch, seq, heads, dim)
    x_conv = x_BTHD
    if self.conv_size:
      x_conv = ShortConv(self.conv_size, True, self.dtype, name="conv")(x_BTHD, segment_ids, mode)
    bias_f = forget_bias(dim, self.forget_bias_init, self.layer_idx, self.num_layers)
    i_pre, f_pre = jnp.unstack(self._headwise(x_conv, "if", bias_f), axis=3)
    z_pre, o_pre = jnp.unstack(self._headwise(x_BTHD, "zo", None), axis=3)
    recurrent = self.param("recurrent_kernel", nn.with_logical_partitioning(
        nn.initializers.zeros, ("heads", "head_dim", None, None)), (heads, dim, 4, dim), jnp.float32)
    run = lambda state: pallas_kernels.slstm(
        z_pre, i_pre, f_pre, o_pre, recurrent, forget_gate=self.forget_gate, initial_state=state,
        return_final_state=True, segment_ids=segment_ids, implementation=self.implementation)
    if mode == "off":
      h_BTHD, _ = run(None)
    else:
      empty = SLSTMState.empty(batch, heads, dim)
      cached = self.variable("cache", "state", lambda: jnp.stack(empty))
      index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
      h_BTHD, final = run(None if mode == "init" else SLSTMState(*cached.value))
      if mode == "step":
        cached.value, index.value = jnp.stack(final), index.value + seq
    h_BTHD = nn.LayerNorm(epsilon=self.norm_eps, use_bias=False, feature_axes=(-2, -1), dtype=jnp.float32,
                          scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("heads", "head_dim")),
                          name="norm")(h_BTHD)
    y_BTD = h_BTHD.reshape(batch, seq, self.d_model).astype(x_BTD.dtype)
    return nn.with_logical_constraint(y_BTD, ("batch", "length", "embed"))
