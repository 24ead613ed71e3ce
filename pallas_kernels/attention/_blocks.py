"""Block sizes and per-block mask classes: which (query block, key block) tiles a blockwise pass visits.

A tile is *empty* (no query row of the block sees any key of the block: skipped), *full* (every row sees
every key: no mask work) or *partial* (masked per element). The classes are computed once per call, in XLA,
from per-block summaries, never from a ``(T, S)`` mask: the first and last query position of each query
block (``query_offset + i``), the key range of each key block, per-block minimum and maximum segment ids and
per-block any/all of the key mask. For causal and sliding-window masks the classes are exact; segment ids are
judged by their ranges (a block whose ids are all one segment, equal on both sides, is full; disjoint ranges
are empty), which is exact for packed, contiguous segments and conservative (partial) otherwise, and
combining criteria is conservative too: a tile is never called empty or full when it is not.

From the classes come the loop bounds: per query block the half-open range of key blocks to visit (forward and
``dq`` passes), per key block the range of query blocks (``dk``/``dv`` pass). Tiles inside a range may still
be empty (segments); passes check the class of every tile they visit.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.attention import masking

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the blockwise implementations (``xla``, ``pallas_tpu``, ``pallas_triton``).

  Each field is a positive int or None (the implementation's default for the device; the tables are in
  ``xla.py``, ``tpu.py`` and ``gpu.py``). Each implementation checks its own constraints (Triton: powers of
  two >= 16; TPU: multiples of 8, and of 128 for key blocks) and raises a ValueError naming the field.

  Attributes:
    q: query rows per tile in the forward pass.
    kv: keys per tile in the forward pass.
    q_bwd: query rows per tile in the backward passes (default: the implementation's backward default).
    kv_bwd: keys per tile in the backward passes.
  """
  q: int | None = None
  kv: int | None = None
  q_bwd: int | None = None
  kv_bwd: int | None = None

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"block_sizes.{field.name}: got {value!r}; allowed: a positive int or None (default)")

  def resolve(self, defaults: BlockSizes, seq: int, num_keys: int, fit=None) -> BlockSizes:
    """Fills unset fields from ``defaults`` (which has every field set) and fits each to the length it tiles
    with ``fit(block, length, field)`` (default: at most the length, so a short sequence is one tile)."""
    fit = fit or (lambda block, length, field: min(block, length))
    return BlockSizes(*(fit(given or default, length, field.name) for given, default, length, field in zip(
        dataclasses.astuple(self), dataclasses.astuple(defaults), (seq, num_keys, seq, num_keys),
        dataclasses.fields(self))))


def check_block_sizes(blocks: BlockSizes, implementation: str, rule, allowed: str,
                      fields: tuple[str, ...] = ("q", "kv", "q_bwd", "kv_bwd")) -> None:
  """ValueError naming the first of ``fields`` of ``blocks`` (resolved) for which ``rule(value)`` is false."""
  for name in fields:
    value = getattr(blocks, name)
    if not rule(value):
      raise ValueError(f"block_sizes.{name}: got {value} for {implementation}; allowed: {allowed}")


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


class BlockMeta(NamedTuple):
  """Per-call block metadata (int32 arrays; ``NQ``/``NK`` query/key blocks; ``B`` batch rows, or 1 after
  :func:`batch_union`).

  Attributes:
    classes: ``(B, NQ, NK)`` EMPTY / PARTIAL / FULL.
    kv_lo: ``(B, NQ)`` first key block a query block visits.
    kv_hi: ``(B, NQ)`` one past the last (``kv_lo == kv_hi``: none).
    q_lo: ``(B, NK)`` first query block that visits a key block.
    q_hi: ``(B, NK)`` one past the last.
  """
  classes: jax.Array
  kv_lo: jax.Array
  kv_hi: jax.Array
  q_lo: jax.Array
  q_hi: jax.Array


def _min_max(x_BN, block: int, fill):
  """Per-block min and max over the last axis, padded with ``fill`` (a value or "edge")."""
  pad = round_up(x_BN.shape[1], block) - x_BN.shape[1]
  x = jnp.pad(x_BN, ((0, 0), (0, pad)), mode="edge") if fill == "edge" else jnp.pad(
      x_BN, ((0, 0), (0, pad)), constant_values=fill)
  x = x.reshape(x.shape[0], -1, block)
  return x.min(-1), x.max(-1)


def _range(nonempty, axis: int):
  """First index and one past the last index of True along ``axis`` (0, 0 where none)."""
  index = jax.lax.broadcasted_iota(jnp.int32, nonempty.shape, axis)
  lo = jnp.min(jnp.where(nonempty, index, nonempty.shape[axis]), axis)
  hi = jnp.max(jnp.where(nonempty, index + 1, 0), axis)
  return jnp.where(hi > 0, lo, 0), hi


def block_meta(mask: masking.Mask, seq: int, num_keys: int, block_q: int, block_kv: int) -> BlockMeta:
  """Tile classes and loop ranges for ``T = seq`` queries and ``S = num_keys`` keys (module docstring)."""
  num_q, num_k = -(-seq // block_q), -(-num_keys // block_kv)
  q_start = jnp.arange(num_q, dtype=jnp.int32) * block_q
  p0 = (mask.query_offset[:, None] + q_start)[:, :, None]  # (B, NQ, 1) first and last query position
  p1 = (mask.query_offset[:, None] + jnp.minimum(q_start + block_q, seq) - 1)[:, :, None]
  k_start = jnp.arange(num_k, dtype=jnp.int32) * block_kv
  k0 = k_start[None, None, :]  # (1, 1, NK) first and last real key
  k1 = (jnp.minimum(k_start + block_kv, num_keys) - 1)[None, None, :]
  some = jnp.ones((mask.query_offset.shape[0], num_q, num_k), bool)
  every = jnp.broadcast_to(k_start + block_kv <= num_keys, some.shape)  # padded keys are masked
  window = mask.window
  if mask.causal:
    some, every = some & (k0 <= p1), every & (k1 <= p0)
    if window is not None:
      some, every = some & (k1 > p0 - window), every & (k0 > p1 - window)
  elif window is not None:
    some = some & (k1 > p0 - window) & (k0 < p1 + window)
    every = every & (k0 > p1 - window) & (k1 < p0 + window)
  if mask.q_segment_ids is not None:
    q_min, q_max = (x[:, :, None] for x in _min_max(mask.q_segment_ids, block_q, "edge"))
    k_min, k_max = (x[:, None, :] for x in _min_max(mask.kv_segment_ids, block_kv, "edge"))
    some = some & (q_max >= k_min) & (k_max >= q_min)
    every = every & (q_min == q_max) & (k_min == k_max) & (q_min == k_min)
  if mask.key_mask is not None:
    _, any_ok = _min_max(mask.key_mask.astype(jnp.int32), block_kv, 0)
    all_ok, _ = _min_max(mask.key_mask.astype(jnp.int32), block_kv, 1)
    some, every = some & (any_ok[:, None, :] > 0), every & (all_ok[:, None, :] > 0)
  classes = jnp.where(some, jnp.where(every, FULL, PARTIAL), EMPTY).astype(jnp.int32)
  return BlockMeta(classes, *_range(some, 2), *_range(some, 1))


def batch_union(meta: BlockMeta) -> BlockMeta:
  """One set of classes and ranges valid for every batch row (for passes that tile all rows at once): full
  where all rows are full, empty where all are empty, ranges covering every row's."""
  least, most = meta.classes.min(0, keepdims=True), meta.classes.max(0, keepdims=True)  # EMPTY < PARTIAL < FULL
  union = jnp.where(least == FULL, FULL, jnp.where(most == EMPTY, EMPTY, PARTIAL)).astype(jnp.int32)
  return BlockMeta(union, *_range(most > EMPTY, 2), *_range(most > EMPTY, 1))


def by_class(classes, step, carry):
  """``step(carry, masked)`` by the tile class: empty tiles leave ``carry`` as it is, partial ones run
  ``masked=True``, full ones ``masked=False`` (a ``switch``: one branch runs)."""
  return jax.lax.switch(classes, (lambda c: c, lambda c: step(c, True), lambda c: step(c, False)), carry)
