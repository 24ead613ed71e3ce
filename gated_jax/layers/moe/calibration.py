"""Offline calibration of MoDES expert skipping (Huang et al. 2025, "MoDES", arXiv 2511.15690 §3).

MoDES skips, at inference, a token's routed expert ``i`` in layer ``l`` when its importance
``s = α_l · π_i`` is below a threshold ``τ``, where ``π_i`` is the router's combine weight and ``α_l`` a
per-layer factor calibrated offline ("globally-modulated local gating"): the mean KL divergence between the
model's output distribution and its output with layer ``l``'s routed experts removed, so that layers whose
experts matter more (in the paper, the shallow ones) are skipped less. ``τ`` is then searched on the
calibration data for a target fraction of skipped expert slots. The paper searches two thresholds (text and
vision tokens) for the least KL under a skip-ratio constraint, using that KL and skip ratio both grow with the
thresholds; with one modality that search reduces to the smallest ``τ`` whose skip ratio reaches the target,
found here by bisection on the model itself (skipping in one layer changes the routing of the next, so the
ratio is measured with every threshold in place, not from the unskipped routing).

:func:`calibrate_skip_thresholds` returns the ``SKIP_THRESHOLDS`` variable collection, one threshold per MoE
layer with ``α_l`` folded in (``α_l π < τ`` ⇔ ``π < τ / α_l``), for
``model.apply({"params": params, **thresholds}, ...)``. Modes: ``"kl"`` (the paper's α from the KL),
``"uniform"`` (α = 1: one threshold on the raw weights of every layer) and ``"per_layer"`` (each layer, in
call order and with the earlier layers' thresholds in place, its own quantile, so every layer skips the target
fraction).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gated_jax.layers.moe.layer import SKIP_THRESHOLDS
from gated_jax.layers.moe.routing import Router

MODES = ("kl", "uniform", "per_layer")
_BISECTION_STEPS = 60
Path = tuple[str, ...]
Slots = dict[Path, tuple[np.ndarray, np.ndarray]]


def threshold_for_fraction(scores: np.ndarray, fraction: float) -> float:
  """A threshold with ``round(fraction · len(scores))`` of ``scores`` below it (fewer on ties): midway between
  the last skipped and the first kept score, so rounding cannot move either across; ``±inf`` keeps or skips
  them all."""
  ordered = np.sort(np.asarray(scores, np.float64).reshape(-1))
  skipped = int(round(fraction * ordered.size))
  if skipped == 0:
    return float("-inf")
  return float("inf") if skipped == ordered.size else float(ordered[skipped - 1] + ordered[skipped]) / 2


def _collection(thresholds: Mapping[Path, float]) -> dict[str, Any]:
  return {SKIP_THRESHOLDS: flax.traverse_util.unflatten_dict(
      {path + ("threshold",): jnp.float32(value) for path, value in thresholds.items()})}


def routing_pass(model: nn.Module, params: Any, inputs: jax.Array, **kwargs
                 ) -> tuple[list[Path], Callable[[Mapping[Path, float]], Slots]]:
  """The MoE layers' paths (in call order) and ``thresholds -> {path: (weights, active)}``: each layer's slot
  weights as its router returned them (before its own skipping, after the earlier layers') and which slots
  are active, on ``inputs`` with ``thresholds`` in place (compiled once)."""
  capture = lambda module, method: isinstance(module, Router) and method == "__call__"

  def routers(p, x, collection):
    _, state = model.apply({"params": p, **collection}, x, mutable=["intermediates"], capture_intermediates=capture,
                           **kwargs)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(state["intermediates"]))
    # a router's path ends (..., "router", "__call__"); the threshold belongs to its layer, the parent
    return {path[:-2]: (jnp.concatenate([r.weights.reshape(-1) for r in calls]),
                        jnp.concatenate([(r.indices < r.probs.shape[-1]).reshape(-1) for r in calls]))
            for path, calls in flat.items() if path[-1] == "__call__"}

  paths = list(jax.eval_shape(routers, params, inputs, {}))
  if not paths:
    raise ValueError(f"model: got {type(model).__name__} with no MoE router; allowed: a model with MoE layers")
  compiled = jax.jit(routers)
  return paths, lambda thresholds: {p: tuple(np.asarray(a) for a in v)
                                    for p, v in compiled(params, inputs, _collection(thresholds)).items()}


def kl_scales(model: nn.Module, params: Any, inputs: jax.Array, paths: list[Path], **kwargs) -> dict[Path, float]:
  """MoDES's α_l: the mean over positions of KL(output ‖ output with layer ``l``'s routed experts skipped)."""
  @jax.jit
  def log_probs(p, x, thresholds):  # one compilation for every pass: the thresholds are traced
    logits = model.apply({"params": p, **thresholds}, x, **kwargs)
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  full = log_probs(params, inputs, _collection(dict.fromkeys(paths, float("-inf"))))
  scales = {}
  for path in paths:
    skipped = log_probs(params, inputs, _collection({p: float("inf") if p == path else float("-inf")
                                                     for p in paths}))
    kl = float(jnp.mean(jnp.sum(jnp.exp(full) * (full - skipped), axis=-1)))
    scales[path] = max(kl, 0.0)  # float32 rounding can make a vanishing KL slightly negative
  return scales


def _skipped(slots: Slots, thresholds: Mapping[Path, float]) -> int:
  """Active slots below their layer's threshold (the layer's own float32 comparison)."""
  return sum(int(np.sum(active & (weights < np.float32(thresholds[p])))) for p, (weights, active) in slots.items())


def _scaled(tau: float, scales: Mapping[Path, float]) -> dict[Path, float]:
  """Per-layer thresholds ``τ / α_l`` (a layer with α = 0, whose experts do not change the output, is skipped
  whole once ``τ > 0``)."""
  return {p: tau / a if a > 0 else (float("inf") if tau > 0 else float("-inf")) for p, a in scales.items()}


def calibrate_skip_thresholds(model: nn.Module, params: Any, inputs: jax.Array, target_fraction: float, *,
                              mode: str = "kl", **kwargs) -> dict[str, Any]:
  """The ``SKIP_THRESHOLDS`` collection that skips ``target_fraction`` of the active expert slots of the
  calibration batch ``inputs`` over all MoE layers (``"kl"``, ``"uniform"``: the nearest slot count at or above
  the target the search reaches) or in each (``"per_layer"``: exactly, up to ties); see the module docstring.
  ``model``'s output must be logits; ``kwargs`` go to its apply."""
  if mode not in MODES:
    raise ValueError(f"mode: got {mode!r}; allowed: {', '.join(map(repr, MODES))}")
  if isinstance(target_fraction, bool) or not isinstance(target_fraction, (int, float)) \
      or not 0.0 <= target_fraction <= 1.0:
    raise ValueError(f"target_fraction: got {target_fraction!r}; allowed: a float in [0, 1]")
  paths, routing = routing_pass(model, params, inputs, **kwargs)
  thresholds = dict.fromkeys(paths, float("-inf"))
  if mode == "per_layer":
    for path in paths:
      weights, active = routing(thresholds)[path]
      thresholds[path] = threshold_for_fraction(weights[active], target_fraction)
    return _collection(thresholds)
  scales = kl_scales(model, params, inputs, paths, **kwargs) if mode == "kl" else {}
  if not any(a > 0 for a in scales.values()):  # "uniform", or no layer's experts change the output: weigh alike
    scales = dict.fromkeys(paths, 1.0)
  unskipped = routing(thresholds)
  total = sum(int(np.sum(active)) for _, active in unskipped.values())
  target = int(round(target_fraction * total))
  if target in (0, total):
    return _collection(dict.fromkeys(paths, float("-inf") if target == 0 else float("inf")))
  low, high = 0.0, 2.0 * max(scales.values()) * max(1.0, max(float(np.max(w)) for w, _ in unskipped.values()))
  for _ in range(_BISECTION_STEPS):  # smallest τ (to float precision) whose skipped count reaches the target
    mid = (low + high) / 2
    thresholds = _scaled(mid, scales)
    if _skipped(routing(thresholds), thresholds) >= target:
      high = mid
    else:
      low = mid
  return _collection(_scaled(_midway(routing(_scaled(high, scales)), scales, high), scales))


def _midway(slots: Slots, scales: Mapping[Path, float], tau: float) -> float:
  """``τ`` moved to midway between the highest skipped and the lowest kept score ``α_l · π`` it leaves: every
  ``τ`` in that gap makes the same decisions in the first layer, hence the same routing and decisions in the
  next ones, and the margin keeps another compilation's float32 rounding from moving a slot across."""
  skipped, kept = [], []
  for path, (weights, active) in slots.items():
    if scales[path] > 0:
      below = weights < np.float32(tau / scales[path])
      skipped.append(scales[path] * weights[active & below])
      kept.append(scales[path] * weights[active & ~below])
  skipped, kept = np.concatenate(skipped), np.concatenate(kept)
  return (float(np.max(skipped)) + float(np.min(kept))) / 2 if skipped.size and kept.size else tau


__all__ = ["MODES", "calibrate_skip_thresholds", "kl_scales", "routing_pass", "threshold_for_fraction"]
