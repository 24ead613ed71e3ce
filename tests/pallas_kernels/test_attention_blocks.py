"""Tile classes and loop ranges of the blockwise attention passes (``pallas_kernels.attention._blocks``) against
the dense mask: a tile is empty exactly when no query of the block sees a key of the block and full exactly
when every query sees every key (causal, sliding-window, decode offsets, packed segments, key mask), never
wrongly so when masks combine; the loop ranges are exactly the non-empty tiles; a causal pass visits about
half of the tiles and a sliding window O(T * window)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import _blocks, masking
from pallas_kernels.attention._blocks import EMPTY, FULL, PARTIAL


def _mask(batch, *, offset=0, causal=True, window=None, q_seg=None, kv_seg=None, key_mask=None):
  return masking.Mask(jnp.broadcast_to(jnp.asarray(offset, jnp.int32), (batch,)), q_seg, kv_seg, key_mask,
                      causal=causal, window=window)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _meta(mask, seq, num_keys, block_q, block_kv):
  return _blocks.block_meta(mask, seq, num_keys, block_q, block_kv)


def _dense(mask, seq, num_keys, block_q, block_kv):
  """Classes from the dense ``(B, T, S)`` visibility (padded keys invisible, padded rows ignored)."""
  vis = np.asarray(masking.visible(mask.positions(seq)[..., None], jnp.arange(num_keys),
                                   masking.rows(mask.q_segment_ids), masking.keys(mask.kv_segment_ids),
                                   masking.keys(mask.key_mask), causal=mask.causal, window=mask.window,
                                   num_keys=num_keys))
  num_q, num_k = -(-seq // block_q), -(-num_keys // block_kv)
  vis = np.pad(vis, ((0, 0), (0, 0), (0, num_k * block_kv - num_keys)))
  classes = np.zeros((vis.shape[0], num_q, num_k), np.int32)
  for i in range(num_q):
    for j in range(num_k):
      tile = vis[:, i * block_q:(i + 1) * block_q, j * block_kv:(j + 1) * block_kv]
      classes[:, i, j] = np.where(tile.all((1, 2)), FULL, np.where(tile.any((1, 2)), PARTIAL, EMPTY))
  return classes


def _first_last(nonempty, axis):
  index = np.arange(nonempty.shape[axis]).reshape([-1 if a == axis else 1 for a in range(nonempty.ndim)])
  has = nonempty.any(axis)
  lo = np.where(nonempty, index, nonempty.shape[axis]).min(axis)
  hi = np.where(nonempty, index + 1, 0).max(axis)
  return np.where(has, lo, 0), hi


PACKED = jnp.array([[0] * 5 + [1] * 7 + [2] * 6, [0] * 9 + [1] * 9])
EXACT = {
    "causal_offsets": (_mask(2, offset=jnp.array([0, 5])), 13, 18),
    "causal_window": (_mask(2, offset=jnp.array([5, 2]), window=5), 13, 18),
    "window": (_mask(2, causal=False, window=3), 18, 18),
    "packed_segments": (_mask(2, q_seg=PACKED, kv_seg=PACKED), 18, 18),
    "key_mask": (_mask(2, causal=False, key_mask=jnp.array([[True] * 8 + [False] * 5 + [True] * 5,
                                                            [False] * 4 + [True] * 14])), 18, 18),
}


@pytest.mark.parametrize("case", sorted(EXACT))
def test_classes_and_ranges_equal_the_dense_mask(case):
  mask, seq, num_keys = EXACT[case]
  meta = jax.tree.map(np.asarray, _meta(mask, seq, num_keys, 4, 4))
  dense = _dense(mask, seq, num_keys, 4, 4)
  np.testing.assert_array_equal(meta.classes, dense)
  np.testing.assert_array_equal((meta.kv_lo, meta.kv_hi), _first_last(dense > EMPTY, 2))
  np.testing.assert_array_equal((meta.q_lo, meta.q_hi), _first_last(dense > EMPTY, 1))


@pytest.mark.parametrize("seed", [0, 1])
def test_classes_are_never_wrong_when_masks_combine(seed):
  """Unsorted segment ids, a key mask, causal and window together: the classes may be conservative
  (partial) but never empty where a key is visible nor full where one is hidden; the union over the batch
  holds for every row."""
  rng = np.random.default_rng(seed)
  seq, num_keys = 11, 17
  mask = _mask(3, offset=jnp.asarray(rng.integers(0, 8, 3)), window=int(rng.integers(3, 9)),
               q_seg=jnp.asarray(rng.integers(0, 3, (3, seq))), kv_seg=jnp.asarray(rng.integers(0, 3, (3, num_keys))),
               key_mask=jnp.asarray(rng.random((3, num_keys)) < 0.8))
  meta = jax.tree.map(np.asarray, _meta(mask, seq, num_keys, 4, 4))
  dense = _dense(mask, seq, num_keys, 4, 4)
  assert np.all((meta.classes == EMPTY) <= (dense == EMPTY))
  assert np.all((meta.classes == FULL) <= (dense == FULL))
  assert np.any(dense == EMPTY) and np.any(meta.classes == PARTIAL)
  union = np.asarray(_blocks.batch_union(_blocks.BlockMeta(*map(jnp.asarray, meta))).classes[0])
  assert np.all((union == EMPTY) <= np.all(dense == EMPTY, 0))
  assert np.all((union == FULL) <= np.all(dense == FULL, 0))


def test_causal_visits_half_and_a_window_visits_t_times_window():
  """T = S = 4096 in tiles of 512: causal visits 36 of 64 tiles (8 masked, on the diagonal); a causal window of
  1024 visits at most 3 key blocks per query block (21 tiles) and masks only 2 per query block."""
  causal = jax.tree.map(np.asarray, _meta(_mask(1), 4096, 4096, 512, 512))
  assert (causal.classes > EMPTY).sum() == 36 and (causal.classes == PARTIAL).sum() == 8
  np.testing.assert_array_equal(causal.kv_hi - causal.kv_lo, [np.arange(1, 9)])
  window = jax.tree.map(np.asarray, _meta(_mask(1, window=1024), 4096, 4096, 512, 512))
  visited = (window.classes > EMPTY).sum(-1)
  assert visited.max() == 3 and visited.sum() == 21
  assert (window.classes == PARTIAL).sum(-1).max() == 2
