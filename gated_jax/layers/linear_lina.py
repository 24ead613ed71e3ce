"""LINA's bidirectional linear attention with a KV gate, arXiv 2601.22630 (LINA ``kvscale`` variant):

    o_i = phi(q_i) . (sum_j w_k[p_j] phi(k_j) (w_v[p_j] v_j)^T / N) / (phi(q_i) . mean_j w_k[p_j] phi(k_j) + 1e-6)

with ``phi = ReLU + 1e-6`` and data-independent learnable per-head, per-position scalars ``w_k``, ``w_v``
(initialised to 1: "token-wise memory weights"). Non-causal; the sums run over the token's packed segment
(``N`` is its length). Computed with two causal ``linear_attention`` passes (left-to-right and
right-to-left, minus the doubly counted diagonal); values carry a ones column so the denominator comes out
of the same pass. LINA's 5x5 depthwise-conv branch (a vision component) is left out.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels import _checks
from gated_jax.layers.linear_base import LinearMixer, both_directions
from gated_jax.layers.registry import MIXERS

_EPS = 1e-6


def segment_lengths(segment_ids: jax.Array | None, batch: int, seq: int) -> jax.Array:
  """``(B, T)`` float32 length of the segment each token is in (``seq`` without ``segment_ids``)."""
  if segment_ids is None:
    return jnp.full((batch, seq), float(seq), jnp.float32)

  def tokens_since_start(ids):
    index = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    starts = jnp.concatenate([jnp.ones((batch, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)

  before = tokens_since_start(segment_ids)
  after = jnp.flip(tokens_since_start(jnp.flip(segment_ids, axis=1)), axis=1)
  return (before + after + 1).astype(jnp.float32)


@MIXERS.register("lina")
class LINA(LinearMixer):
  """Non-causal linear attention with LINA's KV gate (see module docstring); no decode path.

  Attributes:
    max_len: number of positions with their own gate scalars (``positions`` must be below it).
  """
  supports_kv_heads: ClassVar[bool] = False
  feature_map: str = "relu_eps"
  max_len: int = 2048

  def __post_init__(self):
    _checks.check_positive_int("max_len", self.max_len, allow_none=False)
    super().__post_init__()

  @property
  def causal(self) -> bool:
    return False

  def _mix(self, q, k, v, log_decay, x, segment_ids, mode, positions):
    del log_decay, x, mode
    batch, seq = q.shape[:2]
    if positions is None:
      if seq > self.max_len:
        raise ValueError(f"x_BTD: got {seq} tokens; allowed: at most max_len={self.max_len} (one KV-gate "
                         "scalar per position)")
      positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    _checks.check_array("positions", positions, rank=2, layout="(batch, seq)", floating=False)
    _checks.check_shape("positions", positions, (batch, seq), "(batch, seq)")
    gate_init = nn.with_logical_partitioning(nn.initializers.ones, ("heads", None))
    w_k = self.param("kv_gate_k", gate_init, (self.num_heads, self.max_len), jnp.float32)
    w_v = self.param("kv_gate_v", gate_init, (self.num_heads, self.max_len), jnp.float32)
    gate = lambda w: jnp.moveaxis(jnp.take(w, positions, axis=1), 0, -1)[..., None]  # (B, T, H, 1)
    q32 = q.astype(jnp.float32)
    k32 = k.astype(jnp.float32) * gate(w_k)
    v_aug = jnp.concatenate([v.astype(jnp.float32) * gate(w_v), jnp.ones((*v.shape[:3], 1), jnp.float32)], -1)
    o_fwd, o_bwd = both_directions(q32, k32, v_aug, None, None, segment_ids, scale=1.0,
                                   **self.op_options)
    diagonal = jnp.sum(q32 * k32, axis=-1, keepdims=True) * v_aug
    total = o_fwd + o_bwd - diagonal
    count = segment_lengths(segment_ids, batch, seq)[:, :, None, None]
    return (total[..., :-1] / (total[..., -1:] + _EPS * count)).astype(q.dtype)
