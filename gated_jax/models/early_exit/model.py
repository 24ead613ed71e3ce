"""Multi-exit image classifier: an inference module (IM) after every block of a ``VisionClassifier`` backbone,
and JEI-DNN's learned exit gates on the IMs' uncertainty.

Regol, Chataoui & Coates, "Jointly-Learned Exit and Inference for a Dynamic Neural Network" (JEI-DNN, arXiv
2310.09163, ICLR 2024): exit ``l`` has an IM ``ŷ_l = IM_l(z_l)`` on the block output ``z_l`` and (except the
last) a gate ``g_l = σ(w_lᵀ u_l + b_l)`` whose input ``u_l`` are four uncertainty statistics of ``ŷ_l`` with
the gradient stopped (the authors' code, ``LearnableUncGate``: max probability, entropy, top-1 minus top-2
margin, entropy of the squared-and-renormalised probabilities). The gates only read the IMs; no gradient of
the gate loss reaches an IM or the backbone.

Cost (:func:`exit_costs`): ``C_l`` is the FLOP count of what exiting at ``l`` runs — the patch embedding,
blocks ``1..l`` and IMs ``1..l`` (an exit decision at ``j < l`` needed IM ``j``) — over the count for the last
exit, so ``C_L = 1``. FLOPs are XLA's count for the lowered program at batch 1 (matmuls, attention scores and
element-wise work alike), so every mixer of the registry is costed the same way; the gates (4 features and a
dot product per exit) are left out. The paper normalises multiply-adds the same way (final exit = 1).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gated_jax.models.vision import VisionClassifier
from pallas_kernels import _checks

NUM_FEATURES = 4


class ExitOutputs(NamedTuple):
  """Per-exit logits ``(L, B, classes)`` float32 and gate logits ``(L - 1, B)`` (the last exit has no gate)."""
  logits_LBC: jax.Array
  gate_logits_GB: jax.Array


def uncertainty_features(logits: jax.Array) -> jax.Array:
  """``(..., 4)``: max probability, entropy, top-1 − top-2 margin and the entropy of ``p² / Σ p²`` of the
  softmax of ``logits`` (``(..., classes)``, at least 2 classes), with the gradient stopped."""
  probs = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
  top2 = jax.lax.top_k(probs, 2)[0]
  squared = probs * probs
  squared = squared / squared.sum(-1, keepdims=True)
  entropy = lambda p: -jnp.sum(jax.scipy.special.xlogy(p, p), axis=-1)
  return jnp.stack([top2[..., 0], entropy(probs), top2[..., 0] - top2[..., 1], entropy(squared)], axis=-1)


class InferenceModule(nn.Module):
  """IM: LayerNorm, mean over tokens, linear classifier (the backbone's own head, at every exit)."""
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, states_BTD: jax.Array) -> jax.Array:
    x = nn.LayerNorm(dtype=jnp.float32, name="norm")(states_BTD).mean(axis=1)
    return nn.Dense(self.num_classes, dtype=jnp.float32, name="classifier")(x)


class ExitGates(nn.Module):
  """One ``Linear(4 → 1)`` per gated exit on the stop-gradient uncertainty features; returns gate logits
  ``(num_gates, B)``. Initialised at zero: every gate starts undecided (``g = ½``)."""
  num_gates: int

  @nn.compact
  def __call__(self, logits_GBC: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.zeros, (self.num_gates, NUM_FEATURES))
    bias = self.param("bias", nn.initializers.zeros, (self.num_gates,))
    return jnp.einsum("gbf,gf->gb", uncertainty_features(logits_GBC), kernel) + bias[:, None]


class MultiExitClassifier(nn.Module):
  """``VisionClassifier`` blocks with an IM after each (``L = backbone.num_layers`` exits) and ``L − 1`` gates.

  Parameters: ``backbone`` (patch embedding and blocks; the backbone's own final norm and head are not
  created), ``ims_0 .. ims_{L-1}``, ``gates``. ``__call__(images)`` runs everything; ``states`` and
  ``from_states`` split it at the block outputs, so heads and gates can be trained on a frozen backbone's
  cached states.
  """
  backbone: VisionClassifier

  def setup(self):
    self.ims = [InferenceModule(self.backbone.num_classes, dtype=self.backbone.dtype)
                for _ in range(self.backbone.num_layers)]
    self.gates = ExitGates(self.backbone.num_layers - 1)

  def __call__(self, images_BHWC: jax.Array) -> ExitOutputs:
    return self.from_states(self.states(images_BHWC))

  def states(self, images_BHWC: jax.Array) -> jax.Array:
    """Token states after every block, ``(L, B, tokens, d_model)``."""
    return self.backbone(images_BHWC, block_outputs=True)

  def from_states(self, states_LBTD: jax.Array) -> ExitOutputs:
    _checks.check_array("states_LBTD", states_LBTD, rank=4, layout="(exits, batch, tokens, d_model)")
    if states_LBTD.shape[0] != self.backbone.num_layers or states_LBTD.shape[-1] != self.backbone.d_model:
      raise ValueError(f"states_LBTD: got shape {tuple(states_LBTD.shape)}; allowed: ({self.backbone.num_layers}, "
                       f"batch, tokens, {self.backbone.d_model})")
    logits_LBC = jnp.stack([im(states_LBTD[l]) for l, im in enumerate(self.ims)])
    return ExitOutputs(logits_LBC, self.gates(logits_LBC[:-1]))


def _flops(module: nn.Module, *inputs: jax.ShapeDtypeStruct, **kwargs: Any) -> float:
  """XLA's FLOP count of ``module.apply`` on abstract ``inputs`` (nothing is compiled or run)."""
  init = functools.partial(module.init, **kwargs)
  params = jax.eval_shape(init, jax.random.key(0), *inputs)
  cost = jax.jit(functools.partial(module.apply, **kwargs)).trace(params, *inputs).lower().cost_analysis()
  return float(cost["flops"])


def exit_costs(backbone: VisionClassifier, channels: int = 1) -> np.ndarray:
  """``C_l`` for ``l = 1..L`` (module docstring): increasing, ``C_L = 1``; float64 ``(L,)``."""
  backbone.block_specs()
  _checks.check_positive_int("channels", channels, allow_none=False)
  image = jax.ShapeDtypeStruct((1, *backbone.image_size, channels), jnp.float32)
  depth = backbone.num_layers
  prefix = np.array([_flops(backbone.clone(num_layers=l), image, block_outputs=True) for l in range(1, depth + 1)])
  tokens = backbone.grid[0] * backbone.grid[1]
  im = _flops(InferenceModule(backbone.num_classes), jax.ShapeDtypeStruct((1, tokens, backbone.d_model), jnp.float32))
  cumulative = prefix + im * np.arange(1, depth + 1)
  return cumulative / cumulative[-1]
