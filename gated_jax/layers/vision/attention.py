"""Global self-attention over patch tokens: ViT's multi-head attention and ConViT's gated positional
self-attention.

``vit`` (Dosovitskiy et al. arXiv 2010.11929 eq. 2-3; DeiT's ``qkv_bias=True``): ``softmax(q k^T / sqrt(d)) v``
over all tokens, then an output projection; positions come from the backbone's learned position embedding.

``convit`` — GPSA, d'Ascoli et al. arXiv 2103.10697 eq. 5-7 (facebookresearch/convit ``GPSA``). Per head ``h``

    A^h = (1 - sigmoid(lambda_h)) softmax(q_i . k_j / sqrt(d)) + sigmoid(lambda_h) softmax_j(v_pos^h . r_ij)

with ``r_ij = (dx, dy, dx^2 + dy^2)`` the offset of key ``j`` from query ``i`` (columns, rows; in patches) and
``v_pos`` a ``3 -> H`` map; ``A`` mixes the values ``x W_v``. Both terms are row-stochastic, so ConViT's row
renormalisation is the identity here. Locality initialisation (eq. 8, ``local_init``): the heads' centres
``Delta_h`` lie on a ``sqrt(H) x sqrt(H)`` grid around the query with spacing ``locality_distance``, and
``v_pos^h = alpha (2 Delta_h^x, 2 Delta_h^y, -1)``, so ``v_pos^h . r_ij = -alpha |r_ij - Delta_h|^2 +
const``: each head starts as a soft convolution tap at offset ``Delta_h`` with sharpness ``alpha``
(``locality_strength``). ``lambda_h`` starts at 1 (sigmoid = 0.73 on position), ``W_v`` at the identity.
The content term runs on ``pallas_kernels.attention``, the positional one on
``pallas_kernels.biased_attention`` (scores from the bias alone).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from gated_jax.layers.vision.common import VISION_MIXERS, VisionMixer, grid_coordinates


@VISION_MIXERS.register("vit")
class ViTAttention(VisionMixer):
  """Multi-head self-attention over all tokens (module docstring)."""

  @nn.compact
  def __call__(self, x_BND: jax.Array) -> jax.Array:
    x = self.check_input(x_BND)
    q, k, v = (self.heads(x, name, use_bias=True) for name in ("query", "key", "value"))
    o = pallas_kernels.attention(q, k, v, causal=False)
    return self.out_proj(o).astype(x_BND.dtype)


def relative_offsets(grid: tuple[int, int]) -> np.ndarray:
  """``(N, N, 3)`` float32 ``r_ij = (dx, dy, dx^2 + dy^2)`` with ``d = position_j - position_i``."""
  coords = grid_coordinates(grid)
  dy = coords[None, :, 0] - coords[:, None, 0]
  dx = coords[None, :, 1] - coords[:, None, 1]
  return np.stack([dx, dy, dx ** 2 + dy ** 2], axis=-1).astype(np.float32)


def local_position_weights(num_heads: int, strength: float, distance: float) -> np.ndarray:
  """``(3, H)`` ConViT locality initialisation of ``v_pos`` (module docstring)."""
  side = math.isqrt(num_heads)
  centre = (side - 1) / 2
  weights = np.zeros((3, num_heads), np.float32)
  for h in range(num_heads):
    row, col = divmod(h, side)
    weights[:, h] = (2 * (col - centre) * distance, 2 * (row - centre) * distance, -1.0)
  return strength * weights


@VISION_MIXERS.register("convit")
class GPSA(VisionMixer):
  """Gated positional self-attention (module docstring).

  Attributes:
    locality_strength: ``alpha`` of the locality initialisation.
    locality_distance: spacing of the heads' centres.
    local_init: start local (ConViT); False: random ``v_pos`` and ``W_v`` (``lambda`` still starts at 1).
  """
  locality_strength: float = 1.0
  locality_distance: float = 1.0
  local_init: bool = True

  def __post_init__(self):
    if self.local_init and math.isqrt(self.num_heads) ** 2 != self.num_heads:
      raise ValueError(f"num_heads: got {self.num_heads!r}; allowed: a square number with local_init=True "
                       "(the heads' centres lie on a square grid)")
    if isinstance(self.locality_strength, bool) or not isinstance(self.locality_strength, (int, float)) or not (
        self.locality_strength > 0):
      raise ValueError(f"locality_strength: got {self.locality_strength!r}; allowed: a positive number")
    super().__post_init__()

  @nn.compact
  def __call__(self, x_BND: jax.Array) -> jax.Array:
    x = self.check_input(x_BND)
    heads = self.num_heads
    q, k = self.heads(x, "query"), self.heads(x, "key")
    identity = lambda key, shape, dtype=jnp.float32: jnp.eye(shape[0], dtype=dtype).reshape(shape)
    v = self.heads(x, "value", kernel_init=identity if self.local_init else None)
    init = (lambda *_: jnp.asarray(local_position_weights(heads, self.locality_strength, self.locality_distance))) \
        if self.local_init else nn.initializers.normal(1.0)
    pos_weights = self.param("pos_proj", nn.with_logical_partitioning(init, (None, "heads")), (3, heads))
    gate_H = jax.nn.sigmoid(self.param("gating_param", nn.with_logical_partitioning(
        nn.initializers.ones, ("heads",)), (heads,)))
    scores_HNN = jnp.einsum("ijc,ch->hij", jnp.asarray(relative_offsets(self.grid)), pos_weights)
    content = pallas_kernels.attention(q, k, v, causal=False)
    positional = pallas_kernels.biased_attention(None, None, v, bias=scores_HNN)
    gate = gate_H[:, None].astype(content.dtype)
    o = (1.0 - gate) * content + gate * positional.astype(content.dtype)
    if self.is_mutable_collection("intermediates"):
      self.sow("intermediates", "position_gate", gate_H)
    return self.out_proj(o).astype(x_BND.dtype)
