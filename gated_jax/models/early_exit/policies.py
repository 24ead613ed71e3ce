"""Exit policies of a multi-exit classifier and how they are scored: the max-softmax confidence cascade, JEI-DNN's
learned gates, and the expected calibration error of the exiting prediction.

* **Confidence cascade** (the threshold baseline: BranchyNet, Teerapittayanon et al. arXiv 1709.01686, with
  the maximum softmax probability as the confidence, as JEI-DNN's threshold baselines, arXiv 2310.09163): exit at
  the first ``l`` whose IM's max probability is ``≥ τ``; the last exit takes everything left. ``τ ≤ 0`` exits
  everything at the first IM; ``τ > 1`` runs everything to the end.
* **Learned gates** (JEI-DNN, its exit model): the exit distribution ``P(exit at l) = g_l Π_{j<l}(1 − g_j)``, the last
  exit taking the remainder ``Π_{j<L}(1 − g_j)``; at inference, exit at the first ``l`` with ``g_l ≥ ½``.
* **ECE** (Guo et al. arXiv 1706.04599 eq. 3): 15 equal-width confidence bins,
  ``Σ_b (n_b / n)·|acc_b − conf_b|``, of the prediction and max probability of the IM each example exits at.
  (The JEI-DNN code bins by quantiles instead; equal width is the usual definition.)

Every cost is the mean over examples of ``C_{exit}`` (``model.exit_costs``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _checks

ECE_BINS = 15


class ExitDecision(NamedTuple):
  """Per example: the exit taken, its prediction and max probability; and the mean cost of the decisions."""
  exit_B: jax.Array
  prediction_B: jax.Array
  confidence_B: jax.Array
  cost: jax.Array


def _check_logits(logits_LBC: jax.Array, costs_L) -> None:
  _checks.check_array("logits_LBC", logits_LBC, rank=3, layout="(exits, batch, classes)")
  if jnp.shape(costs_L) != (logits_LBC.shape[0],):
    raise ValueError(f"costs_L: got shape {jnp.shape(costs_L)}; allowed: ({logits_LBC.shape[0]},), one cost per "
                     "exit of logits_LBC")


def _check_number(name: str, value, low: float = -math.inf, high: float = math.inf) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not low <= value <= high:
    raise ValueError(f"{name}: got {value!r}; allowed: a number in [{low}, {high}]")


def first_exit(exit_LB: jax.Array) -> jax.Array:
  """Index of the first true row of ``exit_LB`` per column, the last row if none is true."""
  forced = exit_LB.at[-1].set(True)
  return jnp.argmax(forced, axis=0)


def decide(logits_LBC: jax.Array, exit_B: jax.Array, costs_L) -> ExitDecision:
  """The decision of exiting each example at ``exit_B``."""
  chosen_BC = jnp.take_along_axis(logits_LBC, exit_B[None, :, None], axis=0)[0]
  probs_BC = jax.nn.softmax(chosen_BC.astype(jnp.float32), axis=-1)
  return ExitDecision(exit_B, probs_BC.argmax(-1), probs_BC.max(-1), jnp.asarray(costs_L)[exit_B].mean())


def confidence_cascade(logits_LBC: jax.Array, threshold: float, costs_L) -> ExitDecision:
  """Exit at the first IM whose max softmax probability is ``≥ threshold`` (module docstring)."""
  _check_logits(logits_LBC, costs_L)
  _check_number("threshold", threshold)
  confidence_LB = jax.nn.softmax(logits_LBC.astype(jnp.float32), axis=-1).max(-1)
  return decide(logits_LBC, first_exit(confidence_LB >= threshold), costs_L)


def exit_distribution(gates_GB: jax.Array) -> jax.Array:
  """``(G + 1, B)``: ``P(exit at l) = g_l Π_{j<l}(1 − g_j)`` for the ``G`` gated exits, then the remainder
  ``Π_{j≤G}(1 − g_j)`` for the last exit; every column sums to 1."""
  _checks.check_array("gates_GB", gates_GB, rank=2, layout="(gated exits, batch)")
  survive = jnp.cumprod(1.0 - gates_GB, axis=0)
  before = jnp.concatenate([jnp.ones_like(gates_GB[:1]), survive[:-1]])
  return jnp.concatenate([gates_GB * before, survive[-1:]])


def gate_policy(logits_LBC: jax.Array, gate_logits_GB: jax.Array, costs_L, threshold: float = 0.5) -> ExitDecision:
  """JEI-DNN inference: exit at the first gate with ``σ(gate logit) ≥ threshold`` (paper: ½)."""
  _check_logits(logits_LBC, costs_L)
  _check_number("threshold", threshold, 0.0, 1.0)
  if gate_logits_GB.shape != (logits_LBC.shape[0] - 1, logits_LBC.shape[1]):
    raise ValueError(f"gate_logits_GB: got shape {tuple(gate_logits_GB.shape)}; allowed: "
                     f"({logits_LBC.shape[0] - 1}, {logits_LBC.shape[1]}), one gate per exit but the last")
  exit_LB = jnp.concatenate([jax.nn.sigmoid(gate_logits_GB) >= threshold,
                             jnp.ones_like(gate_logits_GB[:1], dtype=bool)])
  return decide(logits_LBC, first_exit(exit_LB), costs_L)


def expected_calibration_error(confidence_B: jax.Array, correct_B: jax.Array, num_bins: int = ECE_BINS
                               ) -> jax.Array:
  """ECE over ``num_bins`` equal-width bins of ``confidence_B`` in [0, 1] (module docstring)."""
  _checks.check_positive_int("num_bins", num_bins, allow_none=False)
  _checks.check_array("confidence_B", confidence_B, rank=1, layout="(batch,)")
  if jnp.shape(correct_B) != confidence_B.shape:
    raise ValueError(f"correct_B: got shape {jnp.shape(correct_B)}; allowed: {tuple(confidence_B.shape)}, as "
                     "confidence_B")
  bins = jnp.clip(jnp.ceil(confidence_B * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)  # (k/n, (k+1)/n]
  count = jnp.zeros(num_bins).at[bins].add(1.0)
  gap = jnp.zeros(num_bins).at[bins].add(jnp.asarray(correct_B, jnp.float32) - confidence_B)
  return jnp.abs(gap).sum() / jnp.maximum(count.sum(), 1.0)


def score(decision: ExitDecision, labels_B: jax.Array, num_exits: int) -> dict[str, float]:
  """Accuracy (%), mean cost, ECE (%) and the fraction of examples leaving at each exit."""
  correct_B = decision.prediction_B == labels_B
  fractions = np.bincount(np.asarray(decision.exit_B), minlength=num_exits) / len(labels_B)
  return {"accuracy": 100.0 * float(correct_B.mean()), "cost": float(decision.cost),
          "ece": 100.0 * float(expected_calibration_error(decision.confidence_B, correct_B)),
          **{f"exit_{l}": float(f) for l, f in enumerate(fractions)}}


def threshold_sweep(logits_LBC: jax.Array, labels_B: jax.Array, costs_L, thresholds: Sequence[float]
                    ) -> dict[str, np.ndarray]:
  """The cascade's accuracy–cost curve: per threshold, accuracy (%), mean cost and ECE (%), in the order given."""
  if len(thresholds) == 0:
    raise ValueError("thresholds: got an empty sequence; allowed: one or more numbers")
  rows = [score(confidence_cascade(logits_LBC, t, costs_L), labels_B, logits_LBC.shape[0]) for t in thresholds]
  return {"threshold": np.asarray(thresholds, np.float64),
          **{key: np.array([r[key] for r in rows]) for key in ("accuracy", "cost", "ece")}}


def at_cost(sweep: dict[str, np.ndarray], cost: float, key: str) -> float:
  """``sweep[key]`` linearly interpolated at ``cost`` along the sweep sorted by cost (clamped at its ends;
  equal costs averaged)."""
  costs, inverse = np.unique(sweep["cost"], return_inverse=True)
  values = np.bincount(inverse, weights=sweep[key]) / np.bincount(inverse)
  return float(np.interp(cost, costs, values))
