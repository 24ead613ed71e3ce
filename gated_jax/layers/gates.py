"""The gate design space of Gated Attention (Qiu et al. 2025, arXiv 2505.06708 §2.2, eq. 5; Tables 1, 3, 4).

    Y' = Y ⊙ act(X W_θ)   (multiplicative)        Y' = Y + act(X W_θ)   (additive)

``X`` is the attention layer's input (after the pre-norm), ``Y`` the tensor at the gate position:

* ``G1``: SDPA output per query head ``(B, T, H, D)``; ``G2``: value projection ``(B, T, KV, D)``;
  ``G3``: key projection ``(B, T, KV, D)``; ``G4``: query projection ``(B, T, H, D)``;
  ``G5``: output of ``W_O`` ``(B, T, d_model)``.
* ``granularity``: ``"elementwise"`` (a score per channel, ``W_θ`` is ``d_model × N·D``) or ``"headwise"``
  (one score per head, ``d_model × N``).
* ``head_shared``: one score shared by all heads. As in the paper (Table 1 row 12: the same 201M parameters as
  the head-specific gate), the head-specific logits are computed and averaged over the head axis before the
  activation [derived: the paper says it averages the score over the query-head axis].
* ``activation``: ``"sigmoid"`` (default), ``"silu"``, ``"ns_sigmoid"`` (the non-sparse control of Table 4,
  range [0.5, 1]; we use ``0.5 + 0.5·σ(x)``, which matches the stated range [derived]), ``"identity"``,
  ``"spike"`` (a binary gate ``H(X W_θ)`` trained through the arctangent surrogate, SymbolicLight's
  spike gating, arXiv 2605.21333; multiplicative only — ``gated_jax.layers.spiking``).
* ``input_dependent=False``: the Table 4 control, a learnable zero-initialised tensor of the score's shape
  (no ``X``) through the activation.

Combinations are limited to what the paper tests or what is well defined (:func:`validate`): additive gates
are elementwise with SiLU or identity (Table 1 row 14, Table 3); SiLU multiplies only elementwise (row 15);
a multiplicative identity "gate" is an unbounded bilinear product the paper does not use; ``G5`` has no heads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.spiking_scan.surrogates import Surrogate, spike

POSITIONS = ("none", "G1", "G2", "G3", "G4", "G5")
GRANULARITIES = ("elementwise", "headwise")
MODES = ("multiplicative", "additive")
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,
    "ns_sigmoid": lambda x: 0.5 + 0.5 * jax.nn.sigmoid(x),
    "identity": lambda x: x,
    "spike": lambda x: spike(Surrogate("atan", 2.0), x, jnp.ones((), jnp.float32)),
}
INIT_STDDEV = 0.02  # N(0, 0.02), zero biases: the official code's initializer_range
# (Qiu et al., arXiv 2505.06708).


def _choice(name: str, value: Any, allowed) -> None:
  if not isinstance(value, str) or value not in allowed:
    raise ValueError(f"{name}: got {value!r}; allowed: {', '.join(map(repr, allowed))}")


def _flag(name: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise ValueError(f"{name}: got {value!r}; allowed: True or False")


@dataclasses.dataclass(frozen=True)
class GateSpec:
  """One point of the gate design space (field meanings in the module docstring)."""
  position: str = "G1"
  granularity: str = "elementwise"
  head_shared: bool = False
  mode: str = "multiplicative"
  activation: str = "sigmoid"
  input_dependent: bool = True

  @property
  def enabled(self) -> bool:
    return self.position != "none"

  def validate(self) -> None:
    """ValueError naming the field (with the layer's field names) for a bad choice or combination."""
    _choice("gate_position", self.position, POSITIONS)
    _choice("granularity", self.granularity, GRANULARITIES)
    _choice("gate_mode", self.mode, MODES)
    _choice("gate_activation", self.activation, tuple(ACTIVATIONS))
    _flag("head_shared", self.head_shared)
    _flag("input_dependent", self.input_dependent)
    if not self.enabled:
      return
    headwise = self.granularity == "headwise"
    if self.position == "G5" and (headwise or self.head_shared):
      raise ValueError(f"granularity/head_shared: got {self.granularity!r}/{self.head_shared} at G5; allowed: "
                       "'elementwise' and head_shared=False (G5 gates the W_O output, which has no heads)")
    if headwise and self.head_shared:
      raise ValueError("head_shared: got True with granularity='headwise'; allowed: head_shared with "
                       "'elementwise' (a head-shared score has one value per channel, Table 1 rows 12-13)")
    if self.mode == "additive":
      if self.activation not in ("silu", "identity"):
        raise ValueError(f"gate_activation: got {self.activation!r} with gate_mode='additive'; allowed: 'silu' or "
                         "'identity' (the additive forms of Table 1 row 14 and Table 3)")
      if headwise:
        raise ValueError("granularity: got 'headwise' with gate_mode='additive'; allowed: 'elementwise' "
                         "(the paper's additive gates are elementwise)")
    else:
      if self.activation == "identity":
        raise ValueError("gate_activation: got 'identity' with gate_mode='multiplicative'; allowed: 'sigmoid', "
                         "'silu' (elementwise) or 'ns_sigmoid' (identity is an additive-only control)")
      if self.activation == "silu" and headwise:
        raise ValueError("granularity: got 'headwise' with gate_activation='silu'; allowed: 'elementwise' (the "
                         "paper's SiLU gates are elementwise, Table 1 rows 14-15)")


def apply_gate(y: jax.Array, score: jax.Array, mode: str) -> jax.Array:
  """``y * score`` or ``y + score`` in float32, cast back to ``y.dtype`` (score broadcasts against ``y``)."""
  y32 = y.astype(jnp.float32)
  out = y32 * score if mode == "multiplicative" else y32 + score
  return out.astype(y.dtype)


class Gate(nn.Module):
  """The activated gate score ``act(X W_θ)`` for a target with ``num_heads`` heads of ``width`` channels.

  Attributes:
    spec: the gate design (validated by the caller).
    num_heads: heads of the target (``H`` for G1/G4, ``KV`` for G2/G3); None for G5 (no head axis).
    width: channels per head of the target (``D``; ``d_model`` for G5).
    heads_axis: logical axis name of the head axis (``"heads"`` or ``"kv_heads"``).
    dtype: compute dtype of the projection.
    param_dtype: parameter dtype.
  """
  spec: GateSpec
  num_heads: int | None
  width: int
  heads_axis: str = "heads"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    """float32 score broadcastable to the target: ``(B|1, T|1, N|1, D|1)``, or ``(B|1, T|1, d_model)`` at G5."""
    spec = self.spec
    shape, axes = [], []
    if self.num_heads is not None:
      shape.append(self.num_heads)
      axes.append(self.heads_axis)
    if spec.granularity == "elementwise":
      shape.append(self.width)
      axes.append("head_dim" if self.num_heads is not None else None)
    if spec.input_dependent:
      init = nn.with_logical_partitioning(nn.initializers.normal(INIT_STDDEV), ("embed", *axes))
      kernel = self.param("kernel", init, (x_BTD.shape[-1], *shape), self.param_dtype)
      logits = jnp.tensordot(x_BTD.astype(self.dtype), kernel.astype(self.dtype), axes=1).astype(jnp.float32)
    else:
      if spec.head_shared:
        shape[0] = 1
      init = nn.with_logical_partitioning(nn.initializers.zeros, tuple(axes))
      logits = self.param("logits", init, tuple(shape), self.param_dtype).astype(jnp.float32)[None, None]
    if spec.head_shared:
      logits = jnp.mean(logits, axis=2, keepdims=True)
    if spec.granularity == "headwise":
      logits = logits[..., None]
    return ACTIVATIONS[spec.activation](logits)
