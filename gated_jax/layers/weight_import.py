"""PyTorch-layout attention weights -> ``GatedAttention`` params (reference/attention.md §1.4).

A PyTorch ``nn.Linear`` stores ``weight`` as ``(out_features, in_features)`` and computes ``x @ weight.T``.
The gate's ``W_θ`` has no layer of its own in either checkpoint family: ``q_proj`` is widened.

* **qiuzh20/gated_attention** (``modeling_qwen3.py``, the paper's code, arXiv 2505.06708): packed per KV group.
  The ``q_proj`` output is viewed as ``(KV, -1)`` and each group's slice is split into
  ``[g·D query values | g gate logits]`` (headwise, ``out = H·D + H``) or ``[g·D | g·D]`` (elementwise,
  ``out = 2·H·D``), ``g = H / KV``; query head ``kv·g + i`` is the ``i``-th head of group ``kv``.
* **Qwen3-Next** (transformers ``modular_qwen3_next.py``): interleaved per head. The output is viewed as
  ``(H, 2·D)``; the first ``D`` of each head is its query, the second ``D`` its (elementwise) gate logits.
  Its RMSNorms are zero-centred (``y = norm(x)·(1 + weight)``), so their scales import as ``1 + weight``.

Both use sigmoid G1 gates on the SDPA output, so the matching layer is ``GatedAttention(gate_position="G1",
granularity=..., head_dim=D, num_kv_heads=KV)`` (QK-norm on, as in Qwen3).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

LAYOUTS = ("qiuzh20", "qwen3_next")


def _weight(name: str, weight, out_features: int) -> np.ndarray:
  weight = np.asarray(weight)
  if weight.ndim != 2 or weight.shape[0] != out_features:
    raise ValueError(f"{name}: got shape {weight.shape}; allowed: ({out_features}, d_model) (PyTorch "
                     "(out_features, in_features))")
  return weight


def heads_kernel(name: str, weight, heads: int, head_dim: int) -> np.ndarray:
  """``(heads·D, d_model)`` projection -> ``(d_model, heads, D)`` kernel (``k_proj``, ``v_proj``, plain ``q``)."""
  weight = _weight(name, weight, heads * head_dim)
  return weight.T.reshape(weight.shape[1], heads, head_dim)


def out_kernel(weight, heads: int, head_dim: int) -> np.ndarray:
  """``o_proj`` ``(d_model, heads·D)`` -> ``(heads, D, d_model)``."""
  weight = np.asarray(weight)
  if weight.ndim != 2 or weight.shape[1] != heads * head_dim:
    raise ValueError(f"o_proj.weight: got shape {weight.shape}; allowed: (d_model, {heads * head_dim})")
  return weight.T.reshape(heads, head_dim, weight.shape[0])


def qiuzh20_q_proj(weight, *, num_heads: int, num_kv_heads: int, head_dim: int,
                   granularity: str) -> tuple[np.ndarray, np.ndarray]:
  """Widened official ``q_proj.weight`` -> (query kernel ``(d, H, D)``, gate kernel ``(d, H)`` headwise or
  ``(d, H, D)`` elementwise)."""
  if granularity not in ("headwise", "elementwise"):
    raise ValueError(f"granularity: got {granularity!r}; allowed: 'headwise', 'elementwise'")
  if num_heads % num_kv_heads:
    raise ValueError(f"num_kv_heads: got {num_kv_heads}; allowed: a divisor of num_heads={num_heads}")
  group = num_heads // num_kv_heads
  gate_width = 1 if granularity == "headwise" else head_dim
  weight = _weight("q_proj.weight", weight, num_heads * (head_dim + gate_width))
  d_model = weight.shape[1]
  grouped = weight.T.reshape(d_model, num_kv_heads, group * (head_dim + gate_width))
  query = grouped[..., :group * head_dim].reshape(d_model, num_heads, head_dim)
  gate = grouped[..., group * head_dim:].reshape(d_model, num_heads, gate_width)
  return query, gate[..., 0] if granularity == "headwise" else gate


def qwen3_next_q_proj(weight, *, num_heads: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
  """Qwen3-Next ``q_proj.weight`` ``(H·2D, d)`` -> (query kernel ``(d, H, D)``, gate kernel ``(d, H, D)``)."""
  weight = _weight("q_proj.weight", weight, num_heads * 2 * head_dim)
  per_head = weight.T.reshape(weight.shape[1], num_heads, 2 * head_dim)
  return per_head[..., :head_dim], per_head[..., head_dim:]


def attention_params(state: Mapping[str, object], *, layout: str, num_heads: int, num_kv_heads: int,
                     head_dim: int, granularity: str = "elementwise") -> dict:
  """A ``GatedAttention`` ``params`` tree from one layer's PyTorch state dict.

  Args:
    state: ``q_proj.weight``, ``k_proj.weight``, ``v_proj.weight``, ``o_proj.weight`` and optionally
      ``q_norm.weight``, ``k_norm.weight`` (arrays or tensors converted with ``np.asarray``).
    layout: ``"qiuzh20"`` or ``"qwen3_next"``.
    num_heads: query heads ``H``.
    num_kv_heads: key/value heads.
    head_dim: ``D``.
    granularity: gate granularity of a ``"qiuzh20"`` checkpoint (Qwen3-Next is elementwise).
  Returns:
    ``{"query", "key", "value", "out", "gate"[, "q_norm", "k_norm"]}`` with plain numpy leaves.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout: got {layout!r}; allowed: {', '.join(map(repr, LAYOUTS))}")
  missing = sorted({"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"} - set(state))
  if missing:
    raise ValueError(f"state: missing {missing}; allowed keys: q/k/v/o_proj.weight, q_norm.weight, k_norm.weight")
  if layout == "qiuzh20":
    query, gate = qiuzh20_q_proj(state["q_proj.weight"], num_heads=num_heads, num_kv_heads=num_kv_heads,
                                 head_dim=head_dim, granularity=granularity)
  else:
    query, gate = qwen3_next_q_proj(state["q_proj.weight"], num_heads=num_heads, head_dim=head_dim)
  params = {
      "query": {"kernel": query},
      "key": {"kernel": heads_kernel("k_proj.weight", state["k_proj.weight"], num_kv_heads, head_dim)},
      "value": {"kernel": heads_kernel("v_proj.weight", state["v_proj.weight"], num_kv_heads, head_dim)},
      "out": {"kernel": out_kernel(state["o_proj.weight"], num_heads, head_dim)},
      "gate": {"kernel": gate},
  }
  for norm in ("q_norm", "k_norm"):
    if f"{norm}.weight" in state:
      scale = np.asarray(state[f"{norm}.weight"])
      params[norm] = {"scale": 1.0 + scale if layout == "qwen3_next" else scale}
  return params
