"""Dense attention over short sequences with an additive per-head score bias and a multiplicative weight:
the window and positional attentions of vision backbones (Swin windows, RMT's Manhattan decay, ConViT's
positional attention).

    s_ij = scale * q_i . k_j + bias_ij           (the q.k term is left out when q and k are None)
    P_i. = softmax_j(s_ij)  or  sigmoid(s_ij)     over the keys j with mask_ij (hidden keys get weight 0)
    o_i  = sum_j P_ij * weight_ij * v_j

Layout ``(batch, seq, heads, dim)``; ``bias`` and ``weight`` are per head, ``(H, T, S)`` or ``(B, H, T, S)``,
``mask`` ``(T, S)`` or ``(B, T, S)`` bool (a softmax row needs at least one visible key). The ``(T, S)``
scores are materialised, which is the fast form for windows of tens of tokens; long sequences belong to
:func:`pallas_kernels.attention`. Implementations: ``reference`` (float32 at the highest matmul precision,
the oracle) and ``xla`` (matmuls in the input dtype with float32 accumulation, float32 normaliser).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

from pallas_kernels import _checks
from pallas_kernels.dispatch import Op

NORMALIZERS = ("softmax", "sigmoid")
_LAYOUT = "(batch, seq, heads, dim)"

biased_attention_op = Op.public("biased_attention")
biased_attention_op.register("reference", "pallas_kernels.biased_attention.dense:reference")
biased_attention_op.register("xla", "pallas_kernels.biased_attention.dense:xla", auto_priority=100)


def biased_attention(q, k, v, *, bias=None, weight=None, mask=None, normalizer: str = "softmax",
                     scale: float | None = None, implementation: str | Sequence[str] | None = None):
  """Dense biased attention (module docstring).

  Args:
    q: ``(B, T, H, D)`` queries, or None together with ``k`` (scores are ``bias`` alone; ``T = S``).
    k: ``(B, S, H, D)`` keys, or None.
    v: ``(B, S, H, Dv)`` values.
    bias: additive score bias ``(H, T, S)`` or ``(B, H, T, S)``; required when q and k are None.
    weight: multiplicative weight on the normalised scores, ``(H, T, S)`` or ``(B, H, T, S)``.
    mask: ``(T, S)`` or ``(B, T, S)`` bool, True where key ``j`` is visible from query ``i``.
    normalizer: ``"softmax"`` (over the visible keys) or ``"sigmoid"`` (elementwise).
    scale: logit scale, default ``D ** -0.5``.
    implementation: see :mod:`pallas_kernels.dispatch`.
  Returns:
    ``o`` ``(B, T, H, Dv)`` in the dtype of ``v``.
  """
  _checks.check_array("v", v, rank=4, layout=_LAYOUT)
  batch, num_keys, heads, _ = v.shape
  if (q is None) != (k is None):
    raise ValueError(f"q, k: got {'q' if k is None else 'k'} only; allowed: both arrays or both None")
  if q is None:
    if bias is None:
      raise ValueError("bias: got None with q and k None; allowed: an (H, T, S) or (B, H, T, S) array")
    seq = num_keys
  else:
    _checks.check_array("q", q, rank=4, layout=_LAYOUT)
    _checks.check_array("k", k, rank=4, layout=_LAYOUT)
    seq = q.shape[1]
    _checks.check_shape("k", k, (batch, num_keys, heads, q.shape[3]), f"(batch, keys, heads, dim) for q {q.shape}")
    if q.shape[0] != batch or q.shape[2] != heads:
      raise ValueError(f"q: got shape {tuple(q.shape)}; allowed: ({batch}, seq, {heads}, dim) to match v")
  for name, x in (("bias", bias), ("weight", weight)):
    if x is not None:
      _checks.check_array(name, x, rank=x.ndim, layout="(heads, seq, keys)")
      if tuple(x.shape) not in ((heads, seq, num_keys), (batch, heads, seq, num_keys)):
        raise ValueError(f"{name}: got shape {tuple(x.shape)}; allowed: {(heads, seq, num_keys)} or "
                         f"{(batch, heads, seq, num_keys)}")
  if mask is not None:
    if not hasattr(mask, "dtype") or mask.dtype != jnp.bool_ or tuple(mask.shape) not in (
        (seq, num_keys), (batch, seq, num_keys)):
      got = f"{getattr(mask, 'dtype', type(mask).__name__)}{tuple(getattr(mask, 'shape', ()))}"
      raise ValueError(f"mask: got {got}; allowed: a bool array of shape {(seq, num_keys)} or "
                       f"{(batch, seq, num_keys)}")
  _checks.check_choice("normalizer", normalizer, NORMALIZERS)
  if scale is None:
    scale = 1.0 if q is None else q.shape[-1] ** -0.5
  elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
    raise ValueError(f"scale: got {scale!r}; allowed: a positive float or None (head_dim ** -0.5)")
  return biased_attention_op(q, k, v, bias, weight, mask, implementation=implementation, normalizer=normalizer,
                             scale=float(scale))
