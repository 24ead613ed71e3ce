"""Softmax-family attention: public op, argument checks, registry.

    o_i = gate_i * sum_{j visible from i} P_ij v_j,     P_i. = normalizer(scale * q_i . k_j  for visible j)

(Vaswani et al. arXiv 1706.03762 eq. 1 for softmax; the other normalizers are in :mod:`.normalizers`.)
Layout ``(batch, seq, heads, dim)``; ``k``/``v`` may have fewer heads than ``q`` (GQA: query head ``h`` reads
key/value head ``h // (H // KV)``). Masking is described in :mod:`.masking`: query ``i`` sits at absolute
position ``query_offset + i`` (default ``S - T``, bottom-right alignment; a KV cache decodes with
``query_offset = cache_index``) and keys at ``0..S-1``. A row with no visible key outputs 0.

Implementations receive canonical arguments ``fn(q, k, v, *, normalizer, mask, q_scale, gate, block_sizes)``:
``q``/``k``/``v`` as given (k/v with KV heads), ``normalizer`` a resolved static
:class:`.normalizers.Normalizer`, ``mask`` a :class:`.masking.Mask`, ``q_scale`` a ``(B, T, H)`` float32 factor
on each row's logits (the scale times the row-local scaling of SSMax / selective attention, already computed
here so that every implementation shares it and gradients reach its parameters), ``gate`` the activated
output gate or None, ``block_sizes`` a :class:`BlockSizes` or None. They return ``o`` ``(B, T, H, Dv)`` in
``q.dtype``.

Implementations: ``reference`` (materialised, the test oracle), ``xla`` (blockwise with block skipping),
``pallas_tpu`` and ``pallas_triton`` (Pallas kernels, opt-in by name until validated on hardware; see
``docs/attention_kernels.md``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _checks
from pallas_kernels.attention import masking, normalizers
from pallas_kernels.attention._blocks import BlockSizes
from pallas_kernels.attention.normalizers import Normalizer
from pallas_kernels.dispatch import Op

_LAYOUT = "(batch, seq, heads, dim)"

attention_op = Op.public("attention")
attention_op.register("reference", "pallas_kernels.attention.reference:attention")
attention_op.register("xla", "pallas_kernels.attention.xla:attention", auto_priority=100)
attention_op.register("pallas_tpu", "pallas_kernels.attention.tpu:attention", platforms=("tpu",),
                      auto_priority=0, pallas=True)
attention_op.register("pallas_triton", "pallas_kernels.attention.gpu:attention", platforms=("gpu",),
                      auto_priority=1, pallas=True)


def attention(q, k, v, *, normalizer: str | Normalizer = "softmax", causal: bool = True,
              window: int | None = None, segment_ids=None, key_mask=None, scale: float | None = None,
              gate=None, query_offset=None, block_sizes: BlockSizes | None = None,
              implementation: str | Sequence[str] | None = None):
  """Attention with a choice of score normalizer, GQA, causal / sliding-window / segment masks.

  Args:
    q: ``(B, T, H, D)`` queries.
    k: ``(B, S, KV, D)`` keys, ``H % KV == 0``.
    v: ``(B, S, KV, Dv)`` values.
    normalizer: a name from :data:`.normalizers.NORMALIZERS` (defaults) or an instance, e.g.
      ``SSMax(s=s_H)``, ``Selective(temperature=t_BTH)``, ``Sigmoid(bias=None)``, ``ClippedSoftmax(...)``.
      ``"sparsemax"``/``"entmax15"``/``"entmax"``/``"sinkhorn"`` and ``LSSA(reweight=True)`` exist only in
      ``implementation="reference"``; ``"sinkhorn"`` needs ``causal=False``; ``"lssa"`` expects l2-normalised
      ``q``, ``k`` and ``scale=1.0``.
    causal: key ``j`` is visible from query ``i`` only if ``j <= query_offset + i``.
    window: positive int: also ``pos_i - j < window`` (``|pos_i - j| < window`` when not causal).
    segment_ids: ``(B, T)`` int when ``T == S``, or a pair ``(q_segment_ids (B, T), kv_segment_ids (B, S))``:
      keys are visible only within the query's segment.
    key_mask: ``(B, S)`` bool, True where the key may be attended (padding, gated-off keys); None: all.
      Masking a key is the same as removing it (the keys keep their positions).
    scale: logit scale, default ``D ** -0.5``.
    gate: optional multiplicative output gate, elementwise ``(B, T, H, Dv)`` or headwise ``(B, T, H, 1)``,
      already activated (e.g. ``sigmoid(x W_theta)``, the G1 gate of arXiv 2505.06708 eq. 5): ``o * gate``.
      The blockwise implementations apply it in their epilogue and differentiate it from the saved un-gated
      output (no division by the gate).
    query_offset: absolute position of query 0: an int >= 0 or a ``(B,)`` int array; default ``S - T``.
    block_sizes: :class:`BlockSizes` tiles for the blockwise implementations (None: per-device defaults).
    implementation: see :mod:`pallas_kernels.dispatch`.
  Returns:
    ``o`` ``(B, T, H, Dv)`` in the dtype of ``q``.
  """
  batch, seq, heads, num_keys = _check_qkv(q, k, v)
  norm = normalizers.get(normalizer)
  norm.validate(batch=batch, seq=seq, heads=heads)
  if not isinstance(causal, bool):
    raise ValueError(f"causal: got {causal!r}; allowed: True or False")
  if causal and norm.mixes_queries:
    raise ValueError(f"causal: got True with normalizer {norm.name!r}, whose column sums mix the queries (a "
                     "query would see later ones); allowed: causal=False")
  _checks.check_positive_int("window", window)
  mask = masking.Mask(query_offset=_query_offset(query_offset, batch, seq, num_keys),
                      **_segment_ids(segment_ids, batch, seq, num_keys),
                      key_mask=_key_mask(key_mask, batch, num_keys), causal=causal, window=window)
  q_scale = _q_scale(norm, mask, _scale(scale, q.shape[-1]), batch, seq, heads, num_keys)
  if gate is not None:
    _checks.check_array("gate", gate, rank=4, layout="(batch, seq, heads, value_dim or 1)")
    allowed = ((batch, seq, heads, v.shape[-1]), (batch, seq, heads, 1))
    if tuple(gate.shape) not in allowed:
      raise ValueError(f"gate: got shape {tuple(gate.shape)}; allowed: {allowed[0]} or {allowed[1]}")
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes: got {block_sizes!r}; allowed: None or "
                     "pallas_kernels.attention.BlockSizes(q=..., kv=..., q_bwd=..., kv_bwd=...)")
  return attention_op(q, k, v, implementation=implementation, normalizer=norm.resolve(num_keys), mask=mask,
                      q_scale=q_scale, gate=gate, block_sizes=block_sizes)


def _check_qkv(q, k, v) -> tuple[int, int, int, int]:
  for name, x in (("q", q), ("k", k), ("v", v)):
    _checks.check_array(name, x, rank=4, layout=_LAYOUT)
    if 0 in x.shape:
      raise ValueError(f"{name}: every dimension must be positive, got shape {tuple(x.shape)}")
  batch, seq, heads, dim = q.shape
  if k.shape[0] != batch or k.shape[3] != dim:
    raise ValueError(f"k: expected shape ({batch}, keys, kv_heads, {dim}) to match q {tuple(q.shape)}, "
                     f"got {tuple(k.shape)}")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"v: expected shape {tuple(k.shape[:3]) + ('value_dim',)} to match k, got {tuple(v.shape)}")
  _checks.check_group(heads, k.shape[2])
  return batch, seq, heads, k.shape[1]


def _scale(scale, dim: int) -> float:
  if scale is None:
    return dim ** -0.5
  if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (math.isfinite(scale) and scale > 0):
    raise ValueError(f"scale: got {scale!r}; allowed: a positive finite float or None (head_dim ** -0.5)")
  return float(scale)


def _query_offset(query_offset, batch: int, seq: int, num_keys: int) -> jax.Array:
  """``(B,)`` int32 position of query 0."""
  allowed = f"None, an int >= 0 or a ({batch},) int array"
  if query_offset is None:
    query_offset = num_keys - seq
  elif hasattr(query_offset, "shape"):
    if tuple(query_offset.shape) not in ((), (batch,)) or not jnp.issubdtype(query_offset.dtype, jnp.integer):
      raise ValueError(f"query_offset: got an array {query_offset.dtype}{tuple(query_offset.shape)}; "
                       f"allowed: {allowed}")
    if not isinstance(query_offset, jax.core.Tracer) and np.any(np.asarray(query_offset) < 0):
      raise ValueError(f"query_offset: got negative values {query_offset}; allowed: offsets >= 0")
  elif isinstance(query_offset, bool) or not isinstance(query_offset, int) or query_offset < 0:
    raise ValueError(f"query_offset: got {query_offset!r}; allowed: {allowed}")
  return jnp.broadcast_to(jnp.asarray(query_offset, jnp.int32), (batch,))


def _segment_ids(segment_ids, batch: int, seq: int, num_keys: int) -> dict[str, jax.Array | None]:
  if segment_ids is None:
    return dict(q_segment_ids=None, kv_segment_ids=None)
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError(f"segment_ids: got a sequence of {len(segment_ids)} items; allowed: (B, T) ids or a pair "
                       "(q_segment_ids (B, T), kv_segment_ids (B, S))")
    q_ids, kv_ids = segment_ids
    checks = (("segment_ids[0]", q_ids, seq), ("segment_ids[1]", kv_ids, num_keys))
  elif seq != num_keys:
    raise ValueError(f"segment_ids: a single (B, T) array needs T == S, got T={seq}, S={num_keys}; pass a pair "
                     "(q_segment_ids (B, T), kv_segment_ids (B, S))")
  else:
    q_ids = kv_ids = segment_ids
    checks = (("segment_ids", q_ids, seq),)
  for name, ids, length in checks:
    _checks.check_array(name, ids, rank=2, layout="(batch, seq)", floating=False)
    _checks.check_shape(name, ids, (batch, length), "(batch, seq)")
  return dict(q_segment_ids=q_ids.astype(jnp.int32), kv_segment_ids=kv_ids.astype(jnp.int32))


def _key_mask(key_mask, batch: int, num_keys: int) -> jax.Array | None:
  if key_mask is None:
    return None
  if not hasattr(key_mask, "shape") or not hasattr(key_mask, "dtype"):
    raise ValueError(f"key_mask: expected a ({batch}, {num_keys}) bool array or None, got "
                     f"{type(key_mask).__name__}")
  if tuple(key_mask.shape) != (batch, num_keys) or key_mask.dtype != jnp.bool_:
    raise ValueError(f"key_mask: got an array {key_mask.dtype}{tuple(key_mask.shape)}; allowed: a "
                     f"({batch}, {num_keys}) bool array (batch, keys) or None")
  return key_mask


def _q_scale(norm: Normalizer, mask: masking.Mask, scale: float, batch: int, seq: int, heads: int,
             num_keys: int) -> jax.Array:
  """``(B, T, H)`` float32: the scale times the normalizer's row-local logit scaling (if any)."""
  counts_BT = masking.visible_counts(mask, seq, num_keys) if norm.needs_counts else None
  row_BTH = norm.row_scale(counts_BT, heads)
  if row_BTH is None:
    return jnp.full((batch, seq, heads), scale, jnp.float32)
  return scale * jnp.broadcast_to(row_BTH, (batch, seq, heads)).astype(jnp.float32)


__all__ = ["BlockSizes", "attention", "attention_op", "masking", "normalizers"]
