"""Name -> class registries that make a new variant one registry entry (docs/architecture.md, "Modules").

``MIXERS`` holds sequence mixers (softmax attention variants, linear-attention family, spiking, ...);
``MLPS`` holds channel mixers (GLU family, MoE). Each family module registers its classes at import:

    @MIXERS.register("gated_attention")
    class GatedAttention(nn.Module): ...

Every mixer is a linen Module built as ``MIXERS.get(name)(d_model=..., num_heads=..., **kwargs)`` and called
as ``mixer(x_BTD, segment_ids=None, positions=None, decode=False) -> y_BTD``; with ``decode=True`` it reads
and updates its ``"cache"`` collection (KV cache, recurrent state or membrane state) and must agree with the
full-sequence path. Every MLP is built as ``MLPS.get(name)(d_model=..., hidden_dim=..., **kwargs)`` and
called as ``mlp(x_BTD) -> y_BTD``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pallas_kernels import _checks

T = TypeVar("T")


class Registry:
  """A named table of classes; unknown names raise ValueError listing the known ones."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, type] = {}

  def register(self, name: str) -> Callable[[T], T]:
    def decorator(cls: T) -> T:
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is already registered to {self._entries[name].__name__}")
      self._entries[name] = cls
      return cls
    return decorator

  def get(self, name: str) -> type:
    if name not in self._entries:
      raise ValueError(f"{self.kind}: got {name!r}; known: {', '.join(sorted(self._entries))}")
    return self._entries[name]

  def names(self) -> tuple[str, ...]:
    return tuple(sorted(self._entries))

  def __contains__(self, name: str) -> bool:
    return name in self._entries


MIXERS = Registry("mixer")
MLPS = Registry("mlp")


def check_mixer_input(x_BTD: Any, d_model: int, segment_ids: Any = None) -> None:
  """ValueError unless ``x_BTD`` is a floating ``(batch, seq, d_model)`` array and ``segment_ids`` None or an
  integer ``(batch, seq)`` array (the call contract above)."""
  _checks.check_array("x_BTD", x_BTD, rank=3, layout="(batch, seq, d_model)")
  if x_BTD.shape[-1] != d_model:
    raise ValueError(f"x_BTD: got last dim {x_BTD.shape[-1]}; allowed: d_model={d_model}")
  if segment_ids is not None:
    _checks.check_array("segment_ids", segment_ids, rank=2, layout="(batch, seq)", floating=False)
    _checks.check_shape("segment_ids", segment_ids, x_BTD.shape[:2], "(batch, seq)")
