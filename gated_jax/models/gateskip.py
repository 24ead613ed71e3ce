"""Inference-time budgets for a GateSkip ``DecoderLM`` (arXiv 2510.13876; the gate is
``gated_jax.layers.residual_gates.ResidualGate``).

The authors skip, in each gated module, the tokens whose importance lies at or below the budget quantile of
the batch. That rule sees the whole batch, so a token's decision depends on later tokens; a causal model that
decodes token by token needs a rule each token can apply alone. :func:`calibrate_thresholds` turns a budget
into one importance threshold per module (the mean over calibration batches of the quantile the authors' rule
uses there, with the earlier modules already skipping at the same budget), and :func:`with_skip_rule` sets
the rule a model evaluates and decodes with.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from gated_jax.models.lm import DecoderLM

_MODULE = re.compile(r"layer_(\d+)/(mixer|mlp)_skip_gate/threshold")


def with_skip_rule(model: DecoderLM, rule: str, *, budget: float = 0.0,
                   thresholds: tuple[float, ...] = ()) -> DecoderLM:
  """``model`` with GateSkip's evaluation rule replaced (the parameters are unchanged)."""
  if model.gateskip is None:
    raise ValueError("model: got a DecoderLM with gateskip=None; allowed: a GateSkip model")
  settings = {**model.gateskip, "rule": rule, "budget": budget, "thresholds": tuple(thresholds)}
  clone = model.clone(gateskip=settings)
  clone.gateskip_spec()  # validates
  return clone


def calibrate_thresholds(model: DecoderLM, params: Any, batches: Iterable[Mapping[str, np.ndarray]],
                         budget: float) -> tuple[float, ...]:
  """Per-module importance thresholds that skip about ``budget`` of the eligible tokens of data like
  ``batches`` (dicts with ``inputs`` and optionally ``segment_ids`` / ``positions``), in module order
  ``2·layer + branch``."""
  quantile = with_skip_rule(model, "quantile", budget=budget)

  @jax.jit
  def thresholds(params, batch):
    extra = {k: batch[k] for k in ("segment_ids", "positions") if k in batch}
    _, state = quantile.apply({"params": params}, batch["inputs"], **extra, mutable=["intermediates"])
    return state["intermediates"]

  per_batch = []
  for batch in batches:
    flat = traverse_util.flatten_dict(thresholds(params, dict(batch)), sep="/")
    found = {}
    for path, values in flat.items():
      match = _MODULE.search(path)
      if match:
        found[2 * int(match.group(1)) + (match.group(2) == "mlp")] = float(values[0])
    per_batch.append([found[i] for i in range(len(found))])
  if not per_batch:
    raise ValueError("batches: got none; allowed: at least one calibration batch")
  return tuple(float(t) for t in np.mean(np.asarray(per_batch), axis=0))


__all__ = ["calibrate_thresholds", "with_skip_rule"]
