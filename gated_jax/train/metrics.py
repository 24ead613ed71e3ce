"""Diagnostics summarised from the ``"intermediates"`` the model sows (Gated Attention, arXiv 2505.06708 §4.3).

Sown leaves (each a tuple of one value per forward call, nested by module path):

* ``first_token_attention`` ``(H,)`` per attention layer: mean over batch and queries of the attention weight
  on key 0;
* ``gate_mean`` scalar per gated-attention layer: mean gate score;
* ``max_abs_activation`` and ``kurtosis`` scalars per LM block: residual-stream statistics.

``summarize_intermediates`` reduces them to the paper's Table 4 columns: ``first_token_attention`` (F-Attn,
mean over layers and heads), ``sink_rate`` (share of (layer, head) pairs whose mean first-token attention
exceeds ``SINK_THRESHOLD = 0.3``, the epsilon of Gu et al., "When Attention Sink Emerges", arXiv
2410.10781), ``max_activation`` (M-Act: mean over layers of the largest |hidden state|), ``kurtosis`` and
``gate_mean`` (means over layers); only the ones whose leaves are present.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gated_jax.models.diagnostics import kurtosis, max_abs

__all__ = ["SINK_THRESHOLD", "collect", "kurtosis", "max_abs", "summarize_intermediates"]

SINK_THRESHOLD = 0.3
_LEAVES = ("first_token_attention", "gate_mean", "max_abs_activation", "kurtosis")


def collect(intermediates: Mapping[str, Any], leaf: str) -> list[np.ndarray]:
  """Every value sown under the key ``leaf`` (one float64 array per layer, averaged over repeated calls)."""
  found = []
  for key, value in intermediates.items():
    if isinstance(value, Mapping):
      found.extend(collect(value, leaf))
    elif key == leaf:
      calls = value if isinstance(value, (tuple, list)) else (value,)
      found.append(np.mean([np.asarray(v, np.float64) for v in calls], axis=0))
  return found


def summarize_intermediates(intermediates: Mapping[str, Any]) -> dict[str, float]:
  """Table-4 style diagnostics from sown intermediates (see the module docstring); missing leaves are skipped."""
  values = {leaf: collect(intermediates, leaf) for leaf in _LEAVES}
  summary = {}
  if values["first_token_attention"]:
    heads = np.concatenate([np.ravel(v) for v in values["first_token_attention"]])
    summary["first_token_attention"] = float(heads.mean())
    summary["sink_rate"] = float((heads > SINK_THRESHOLD).mean())
  for leaf, out in (("max_abs_activation", "max_activation"), ("kurtosis", "kurtosis"), ("gate_mean", "gate_mean")):
    if values[leaf]:
      summary[out] = float(np.mean([np.mean(v) for v in values[leaf]]))
  return summary
