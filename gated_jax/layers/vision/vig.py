"""ViG, Vision Gated Linear Attention (Liao et al. arXiv 2405.18425 §3.2-3.3; hustvl/ViG
``GatedLinearAttention``): bidirectional GLA with ViG's two locality mechanisms.

    x_loc = SiLU(DWConv_3x3(x))                      2-D locality prior on the token grid; every projection reads it
    o     = (GLA_fwd(x_loc) + flip(GLA_bwd(flip(x_loc)))) / 2
                                                     direction-wise gating: shared q/k/v, one decay per direction
    g     = sigmoid(W_g x_loc + b)
    y     = W_O (g * RMSNorm_h(o) + (1 - g) * RMSNorm_h(x_loc))
                                                     2-D gating locality injection: a convex blend of the global
                                                     (GLA) and local (conv) features, per head-wise channel

The GLA is ``gated_jax.layers.linear_gla.GLA`` with ``bidirectional=True`` (key width ``expand_k = 0.5``, value
width ``d_model``). ``conv_size = 0`` drops the conv and ``locality_gate = False`` replaces the blend by GLA's
usual ``RMSNorm(o) * swish(g_proj x)`` output — the ablations of the paper's Table 5.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from gated_jax.layers.linear_base import check_flag
from gated_jax.layers.linear_gla import GLA
from gated_jax.layers.norms import HeadRMSNorm
from gated_jax.layers.vision.common import VISION_MIXERS, DepthwiseConv2D, VisionMixer


class _LocallyGatedGLA(GLA):
  """Bidirectional GLA whose output blends in its (local) input through a sigmoid gate."""
  locality_gate: bool = True

  def _output(self, o_BTHV, x):
    if not self.locality_gate:
      return super()._output(o_BTHV, x)
    o = HeadRMSNorm(eps=self.norm_eps, dtype=self.dtype, name="o_norm")(o_BTHV)
    local = HeadRMSNorm(eps=self.norm_eps, dtype=self.dtype, name="local_norm")(x.reshape(o_BTHV.shape))
    gate = jax.nn.sigmoid(self.dense(x, o.shape[2:], ("embed", "heads", "head_dim"), "locality_gate",
                                     use_bias=True))
    return self.out_proj(gate * o + (1.0 - gate) * local)


@VISION_MIXERS.register("vig")
class ViG(VisionMixer):
  """ViG's token mixer (module docstring).

  Attributes:
    conv_size: side of the depthwise conv (0: none).
    locality_gate: the 2-D gating locality injection (False: GLA's output gate).
    expand_k: GLA key width as a fraction of ``d_model``.
    implementation: passed to ``pallas_kernels.linear_attention``.
  """
  conv_size: int = 3
  locality_gate: bool = True
  expand_k: float = 0.5
  implementation: Any = None

  def __post_init__(self):
    if isinstance(self.conv_size, bool) or not isinstance(self.conv_size, int) or self.conv_size < 0:
      raise ValueError(f"conv_size: got {self.conv_size!r}; allowed: an int >= 0 (0: no conv)")
    check_flag("locality_gate", self.locality_gate)
    super().__post_init__()

  @nn.compact
  def __call__(self, x_BND: jax.Array) -> jax.Array:
    x = self.check_input(x_BND)
    if self.conv_size:
      x = nn.silu(DepthwiseConv2D(self.grid, self.conv_size, self.dtype, name="conv")(x))
    gla = _LocallyGatedGLA(d_model=self.d_model, num_heads=self.num_heads, expand_k=self.expand_k, expand_v=1.0,
                           bidirectional=True, locality_gate=self.locality_gate, implementation=self.implementation,
                           dtype=self.dtype, name="gla")
    return gla(x).astype(x_BND.dtype)
