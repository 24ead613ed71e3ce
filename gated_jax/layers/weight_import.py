"""PyTorch-layout checkpoints -> our params: gated attention (``attention_params``) and flash-linear-attention's
linear-attention layers (``fla_params``).

A PyTorch ``nn.Linear`` stores ``weight`` as ``(out_features, in_features)`` and computes ``x @ weight.T``.

**Gated attention** (Qiu et al., arXiv 2505.06708, and Qwen3-Next).
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

**flash-linear-attention layers** (``fla.layers``; one layer's ``state_dict``, its keys relative to the layer):
``GatedLinearAttention`` -> ``"gla"``, ``GatedDeltaNet`` -> ``"gated_deltanet"``, ``DeltaNet`` ->
``"deltanet"``, ``MultiScaleRetention`` -> ``"retnet"``, ``HGRN2Attention`` -> ``"hgrn2"``. fla flattens heads
as ``(h d)`` (head-major), so a projection's rows ``h*D .. h*D + D - 1`` are head ``h``; its depthwise
``ShortConvolution`` weight is ``(channels, 1, taps)``; the output norm is ``g_norm_swish_gate`` /
``g_norm`` / ``o_norm`` (one scale per head channel; HGRN2's ``g_norm`` spans all heads). Our layer with the
same widths and fla's defaults (``MIXERS.get(kind)(d_model, num_heads, ...)``; ``output_gate="swish"`` on
DeltaNet when the checkpoint has ``g_proj``, ``use_short_conv`` as the checkpoint, ``conv_bias`` likewise)
then computes fla's function; the tests check this against a numpy transcription of each fla layer.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

LAYOUTS = ("qiuzh20", "qwen3_next")
FLA_LAYERS = ("gla", "gated_deltanet", "deltanet", "retnet", "hgrn2")
_FLA_PROJECTIONS = {"hgrn2": ("q", "f", "i")}  # default: q, k, v
_FLA_CONVS = {"hgrn2": ("q", "i")}  # default: q, k, v (our HGRN2 has no conv on f)
_NORM_KEYS = ("g_norm_swish_gate.weight", "g_norm.weight", "o_norm.weight")


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


def _array(state: Mapping[str, object], key: str, ndim: int) -> np.ndarray:
  if key not in state:
    raise ValueError(f"state: missing {key!r}; got keys {sorted(state)}")
  array = np.asarray(state[key])
  if array.ndim != ndim:
    raise ValueError(f"{key}: got shape {array.shape}; allowed: a rank-{ndim} array")
  return array


def _split_heads(key: str, weight: np.ndarray, heads: int) -> np.ndarray:
  """``(heads*D, d_model)`` -> kernel ``(d_model, heads, D)``."""
  if weight.shape[0] % heads:
    raise ValueError(f"{key}: got shape {weight.shape}; allowed: (heads*head_dim, d_model) with {heads} heads")
  return heads_kernel(key, weight, heads, weight.shape[0] // heads)


def _conv(key: str, weight: np.ndarray, heads: int) -> np.ndarray:
  """fla ``ShortConvolution.weight`` ``(heads*D, 1, taps)`` -> our ``ShortConv`` kernel ``(taps, heads, D)``."""
  if weight.shape[1] != 1 or weight.shape[0] % heads:
    raise ValueError(f"{key}: got shape {weight.shape}; allowed: (heads*head_dim, 1, taps) with {heads} heads")
  return weight[:, 0].T.reshape(weight.shape[2], heads, weight.shape[0] // heads)


def fla_params(state: Mapping[str, object], *, kind: str, num_heads: int, num_kv_heads: int | None = None,
               num_v_heads: int | None = None) -> dict:
  """Our mixer's ``params`` tree from one fla layer's PyTorch ``state_dict`` (see the module docstring).

  Args:
    state: parameter name -> array (``np.asarray``-able, e.g. ``tensor.detach().numpy()``).
    kind: one of ``FLA_LAYERS``.
    num_heads: query heads ``H`` (HGRN2: ``hidden_size // expand_ratio``).
    num_kv_heads: key/value heads of a GQA ``"gla"`` / ``"retnet"`` layer (None: ``H``).
    num_v_heads: value heads of a ``"gated_deltanet"`` layer with GVA (None: ``H``).
  Returns:
    A nested dict of numpy arrays for ``layer.apply({"params": ...}, x)``.
  """
  if kind not in FLA_LAYERS:
    raise ValueError(f"kind: got {kind!r}; allowed: {', '.join(map(repr, FLA_LAYERS))}")
  if num_kv_heads is not None and kind not in ("gla", "retnet"):
    raise ValueError(f"num_kv_heads: got {num_kv_heads!r}; allowed: None for {kind!r} (gla and retnet have it)")
  if num_v_heads is not None and kind != "gated_deltanet":
    raise ValueError(f"num_v_heads: got {num_v_heads!r}; allowed: None for {kind!r} (gated_deltanet has it)")
  if "f_conv1d.weight" in state:
    raise ValueError("state: has 'f_conv1d.weight'; allowed: an HGRN2 layer without short convs on its forget "
                     "gate (ours has none)")
  kv_heads = num_heads if num_kv_heads is None else num_kv_heads
  v_heads = num_v_heads if num_v_heads is not None else kv_heads
  out_heads = v_heads if kind == "gated_deltanet" else num_heads  # output gate, norm and o_proj
  heads = {"q": num_heads, "f": num_heads, "i": num_heads, "k": kv_heads, "v": v_heads, "g": out_heads}
  params: dict = {}
  for name in (*_FLA_PROJECTIONS.get(kind, ("q", "k", "v")), "g"):
    key = f"{name}_proj.weight"
    if name != "g" or key in state:
      params[f"{name}_proj"] = {"kernel": _split_heads(key, _array(state, key, 2), heads[name])}
  for name in _FLA_CONVS.get(kind, ("q", "k", "v")):
    key = f"{name}_conv1d"
    if f"{key}.weight" in state:
      kernel = _conv(f"{key}.weight", _array(state, f"{key}.weight", 3), heads[name])
      params[f"{name}_conv"] = {"kernel": kernel}
      if f"{key}.bias" in state:
        params[f"{name}_conv"]["bias"] = _array(state, f"{key}.bias", 1).reshape(kernel.shape[1:])
  out = _array(state, "o_proj.weight", 2)
  params["o_proj"] = {"kernel": out_kernel(out, out_heads, out.shape[1] // out_heads)}
  norm_key = next((k for k in _NORM_KEYS if k in state), None)
  if norm_key is None:
    raise ValueError(f"state: missing the output norm (one of {', '.join(_NORM_KEYS)})")
  params["o_norm"] = {"scale": _array(state, norm_key, 1)}
  if kind == "gla":
    params["gk_down_proj"] = {"kernel": _array(state, "gk_proj.0.weight", 2).T}
    up = _array(state, "gk_proj.1.weight", 2)
    params["gk_proj"] = {"kernel": up.T.reshape(up.shape[1], kv_heads, up.shape[0] // kv_heads),
                         "bias": _array(state, "gk_proj.1.bias", 1).reshape(kv_heads, up.shape[0] // kv_heads)}
  for name in ("a", "b"):
    if kind in ("deltanet", "gated_deltanet") and f"{name}_proj.weight" in state:
      params[f"{name}_proj"] = {"kernel": _array(state, f"{name}_proj.weight", 2).T}
  if kind == "gated_deltanet":
    params["A_log"], params["dt_bias"] = _array(state, "A_log", 1), _array(state, "dt_bias", 1)
  return params
