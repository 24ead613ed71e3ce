"""Which keys each query row sees: causal / sliding-window / segment masks, computed per key block.

Query ``i`` sits at absolute position ``query_offset + i``, keys at ``0..S-1``. Key ``j`` is visible iff

* ``j < S`` (keys past ``S`` are padding added by blockwise implementations),
* ``causal``: ``j <= pos_i``; and with ``window``: ``pos_i - j < window`` (causal) or ``|pos_i - j| < window``
  (non-causal, a symmetric local window),
* with segment ids: ``q_segment_ids[i] == kv_segment_ids[j]``,
* with a key mask: ``key_mask[j]`` (per batch row: padding, or keys a spike gate switched off).

Nothing here builds a ``(T, S)`` array unless asked for a ``(T, S)`` block (the reference does).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

BLOCK_KV = 128  # keys per block in blockwise loops (the xla implementation and the key counts below)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
  """The canonical mask every implementation receives.

  Attributes:
    query_offset: ``(B,)`` int32, absolute position of query 0 in each batch row.
    q_segment_ids: ``(B, T)`` int32 or None.
    kv_segment_ids: ``(B, S)`` int32 or None (given together with ``q_segment_ids``).
    key_mask: ``(B, S)`` bool or None; True where the key may be attended.
    causal: static; keys after the query's position are hidden.
    window: static; positive int or None (no window).
  """
  query_offset: jax.Array
  q_segment_ids: jax.Array | None
  kv_segment_ids: jax.Array | None
  key_mask: jax.Array | None
  causal: bool = dataclasses.field(metadata=dict(static=True))
  window: int | None = dataclasses.field(metadata=dict(static=True))

  def positions(self, seq: int) -> jax.Array:
    """``(B, seq)`` int32 absolute query positions."""
    return self.query_offset[:, None] + jnp.arange(seq, dtype=jnp.int32)[None, :]


def visible(pos_BR, key_idx_J, q_seg_BR, kv_seg_BJ, key_ok_BJ, *, causal: bool, window: int | None,
            num_keys: int) -> jax.Array:
  """``(B, R, J)`` bool: whether query row ``r`` (at ``pos_BR``) sees key ``key_idx_J[j]``; ``key_ok_BJ`` is
  the key mask of those keys (or None)."""
  pos = pos_BR[:, :, None]
  key = key_idx_J[None, None, :]
  vis = key < num_keys
  if causal:
    vis = vis & (key <= pos)
  if window is not None:
    vis = vis & ((pos - key < window) if causal else (jnp.abs(pos - key) < window))
  if q_seg_BR is not None:
    vis = vis & (q_seg_BR[:, :, None] == kv_seg_BJ[:, None, :])
  if key_ok_BJ is not None:
    vis = vis & key_ok_BJ[:, None, :]
  return vis


def visible_counts(mask: Mask, seq: int, num_keys: int) -> jax.Array:
  """``(B, T)`` int32 number of keys each query row sees (``n_i``), scanning ``BLOCK_KV`` keys at a time."""
  block = min(BLOCK_KV, num_keys)
  num_blocks = -(-num_keys // block)
  padded = num_blocks * block
  pos_BT = mask.positions(seq)
  per_block = lambda x: None if x is None else jnp.pad(x, ((0, 0), (0, padded - num_keys))).reshape(
      x.shape[0], num_blocks, block).swapaxes(0, 1)

  def count_block(total_BT, xs):
    key_idx_J, kv_seg_BJ, key_ok_BJ = xs
    vis = visible(pos_BT, key_idx_J, mask.q_segment_ids, kv_seg_BJ, key_ok_BJ, causal=mask.causal,
                  window=mask.window, num_keys=num_keys)
    return total_BT + vis.sum(-1, dtype=jnp.int32), None

  key_idx = jnp.arange(padded, dtype=jnp.int32).reshape(num_blocks, block)
  total, _ = jax.lax.scan(count_block, jnp.zeros(pos_BT.shape, jnp.int32),
                          (key_idx, per_block(mask.kv_segment_ids), per_block(mask.key_mask)))
  return total
