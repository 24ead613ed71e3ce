"""Image classifier on patch tokens whose token mixer comes from ``gated_jax.layers.vision.VISION_MIXERS``.

ViT layout (Dosovitskiy et al. arXiv 2010.11929 eq. 1-4): non-overlapping ``p x p`` patches, each flattened and
linearly embedded; an optional learned absolute position embedding; ``num_layers`` pre-norm blocks
``x += mixer(LN(x)); x += mlp(LN(x))``; a final LayerNorm, the mean over tokens (instead of a class token, so
every mixer sees only patch tokens) and a linear head. The mixer of block ``i`` is ``mixer[i % len(mixer)]``
with ``mixer_kwargs[i % len(mixer)]`` (ConViT: GPSA blocks then plain attention, e.g.
``("convit",) * 4 + ("vit",) * 2``); mixers that declare ``layer_idx`` receive it (Swin's alternating shift).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gated_jax.layers import MLPS
from gated_jax.layers.vision import VISION_MIXERS
from gated_jax.models.lm import layer_kwargs, layer_names
from pallas_kernels import _checks


class VisionClassifier(nn.Module):
  """Patch embedding, mixer blocks, mean pooling, linear head.

  Attributes:
    image_size: ``(height, width)`` of the input images.
    patch_size: side ``p`` of the square patches (divides both image sides).
    num_classes: logits per image.
    d_model: token width.
    num_layers: blocks.
    num_heads: heads of every mixer.
    mixer: a ``VISION_MIXERS`` name, or a tuple of names cycled over the blocks.
    mixer_kwargs: one dict for every block, or a tuple of dicts parallel to ``mixer``.
    mlp: an ``MLPS`` name, or ``"none"``.
    mlp_hidden_dim: MLP width (None: ``4 * d_model``).
    position_embedding: add a learned absolute position embedding to the patch embeddings.
    dtype: compute dtype (logits are float32).
  """
  image_size: tuple[int, int]
  patch_size: int
  num_classes: int
  d_model: int
  num_layers: int
  num_heads: int
  mixer: str | tuple[str, ...] = "vit"
  mixer_kwargs: Any = None
  mlp: str = "gelu"
  mlp_hidden_dim: int | None = None
  position_embedding: bool = True
  dtype: Any = jnp.float32

  @property
  def grid(self) -> tuple[int, int]:
    return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

  def block_specs(self) -> tuple[tuple[str, dict[str, Any]], ...]:
    """Validated ``(mixer name, complete kwargs)`` per block (ValueError on bad fields)."""
    for name in ("patch_size", "num_classes", "d_model", "num_layers", "num_heads"):
      _checks.check_positive_int(name, getattr(self, name), allow_none=False)
    size = tuple(self.image_size) if isinstance(self.image_size, (tuple, list)) else ()
    if len(size) != 2 or any(not isinstance(s, int) or s % self.patch_size for s in size):
      raise ValueError(f"image_size: got {self.image_size!r}; allowed: (height, width) ints divisible by "
                       f"patch_size={self.patch_size}")
    names = layer_names(self.mixer, VISION_MIXERS)
    kwargs = layer_kwargs(self.mixer_kwargs, len(names))
    specs = []
    for i in range(self.num_layers):
      name, own = names[i % len(names)], kwargs[i % len(names)]
      fields = {f.name for f in dataclasses.fields(VISION_MIXERS.get(name))}
      full = {"d_model": self.d_model, "num_heads": self.num_heads, "grid": self.grid, "dtype": self.dtype,
              **({"layer_idx": i} if "layer_idx" in fields else {}), **own}
      specs.append((name, full))
    return tuple(specs)

  @nn.compact
  def __call__(self, images_BHWC: jax.Array, *, block_outputs: bool = False) -> jax.Array:
    """Logits ``(B, num_classes)`` float32 for images ``(B, height, width, channels)``; with ``block_outputs``
    instead the token states after every block, ``(num_layers, B, tokens, d_model)``, and no final norm or head
    (the multi-exit models of ``gated_jax.models.early_exit`` put their own heads on them)."""
    specs = self.block_specs()
    _checks.check_array("images_BHWC", images_BHWC, rank=4, layout="(batch, height, width, channels)")
    if tuple(images_BHWC.shape[1:3]) != tuple(self.image_size):
      raise ValueError(f"images_BHWC: got shape {tuple(images_BHWC.shape)}; allowed: (batch, "
                       f"{self.image_size[0]}, {self.image_size[1]}, channels)")
    if self.mlp != "none":
      MLPS.get(self.mlp)
    batch, _, _, channels = images_BHWC.shape
    p, (rows, cols) = self.patch_size, self.grid
    patches = images_BHWC.reshape(batch, rows, p, cols, p, channels).transpose(0, 1, 3, 2, 4, 5)
    x = nn.Dense(self.d_model, dtype=self.dtype, name="patch_embed")(patches.reshape(batch, rows * cols, -1))
    if self.position_embedding:
      x = x + self.param("position_embedding", nn.initializers.normal(0.02), (rows * cols, self.d_model))
    hidden = self.mlp_hidden_dim or 4 * self.d_model
    states = []
    for i, (name, kwargs) in enumerate(specs):
      h = nn.LayerNorm(dtype=self.dtype, name=f"block_{i}_mixer_norm")(x)
      x = x + VISION_MIXERS.get(name)(name=f"block_{i}_mixer", **kwargs)(h)
      if self.mlp != "none":
        h = nn.LayerNorm(dtype=self.dtype, name=f"block_{i}_mlp_norm")(x)
        x = x + MLPS.get(self.mlp)(d_model=self.d_model, hidden_dim=hidden, dtype=self.dtype,
                                   name=f"block_{i}_mlp")(h)
      states.append(x)
    if block_outputs:
      return jnp.stack(states)
    x = nn.LayerNorm(dtype=jnp.float32, name="final_norm")(x).mean(axis=1)
    return nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(x)
