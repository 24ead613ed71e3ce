"""Inference-time budgets for a GateSkip ``DecoderLM`` (arXiv 2510.13876; the gate is
``gated_jax.layers.residual_gates.ResidualGate``).

The authors skip, in each gated module, the tokens whose importance lies at or below the budget quantile of
the batch. That rule sees the whole batch, so a token's decision depends on later tokens; a causal model that
decodes token by token needs a rule each token can apply alone. :func:`calibrate_thresholds` turns a budget
into one importance threshold per module: the quantile the authors' rule uses in one pass over all the
calibration sequences together (with the earlier modules already skipping), so that the threshold rule
reproduces the quantile rule's skip pattern exactly on the calibration data. (Averaging per-batch quantiles
does not: importance takes few distinct values in the first layers — at layer 0 it is a function of the byte
— so per-batch quantiles jump between tied values and the downstream modules see a different skip pattern.)
:func:`with_skip_rule` sets the rule a model evaluates and decodes with.
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
  """Per-module importance thresholds that skip ``budget`` of the eligible tokens of ``batches`` (dicts with
  ``inputs`` and optionally ``segment_ids`` / ``positions``, all of one sequence length), in module order
  (layer by layer, the mixer's before the MLP's). Tied importances skip together, so a module whose
  importance takes few values may skip more than ``budget``."""
  batches = [dict(b) for b in batches]
  if not batches:
    raise ValueError("batches: got none; allowed: at least one calibration batch")
  names = [k for k in ("inputs", "segment_ids", "positions") if all(k in b for b in batches)]
  data = {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in names}
  quantile = with_skip_rule(model, "quantile", budget=budget)
  extra = {k: data[k] for k in names if k != "inputs"}
  _, state = jax.jit(lambda p: quantile.apply({"params": p}, data["inputs"], **extra,
                                              mutable=["intermediates"]))(params)
  found = {}
  for path, values in traverse_util.flatten_dict(state["intermediates"], sep="/").items():
    match = _MODULE.search(path)
    if match:
      found[(int(match.group(1)), match.group(2) == "mlp")] = float(values[0])
  return tuple(found[k] for k in sorted(found))


__all__ = ["calibrate_thresholds", "with_skip_rule"]
