"""Blockwise attention in pure XLA with block skipping: O(T * block) memory, and only the tiles the mask needs.

Queries are cut into blocks of ``block_sizes.q`` positions (the query heads of a GQA group stacked as rows of
their key/value head), keys into blocks of ``block_sizes.kv``. :mod:`._blocks` classifies every tile once per
call; the forward pass maps over query blocks and runs a ``fori_loop`` over the key blocks in that query
block's range, skipping empty tiles and masking only partial ones (FlashAttention-2, arXiv 2307.08691 Alg. 1,
with the per-tile math of :mod:`._tile`). A causal mask therefore costs about half of the full product and a
sliding window O(T * window). Clipped softmax takes a second pass over the same tiles for ``phi``; adaptive
temperature a first pass (softmax with the keys as values) for the row entropy that sets its temperature.

The backward (``jax.custom_vjp``; FA-2 Alg. 2) is one pass: a scan over key blocks, each looping over the query
blocks that see it, accumulating ``dK``/``dV`` of the key block and adding each tile's ``dQ`` into a
``(T, D)`` accumulator (sequential, so no atomics are needed); a normalizer with a transform first gets its
``D`` rows from a pass shaped like the forward. Only the row statistics the normalizer needs are saved
(:func:`._tile.finalize`). The row scale (softmax scale, SSMax, selective) is multiplied into ``q`` and the
output gate into ``o`` outside the custom VJP, so autodiff differentiates them (the gate's gradient uses the
saved un-gated output).

A call that fits one tile (``T <= block_sizes.q``, ``S <= block_sizes.kv``) runs without loops, class switch or
block metadata: the materialised computation, whose backward recomputes the probabilities instead of saving
them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.attention import _blocks, _tile, masking
from pallas_kernels.attention._blocks import BlockSizes
from pallas_kernels.attention.normalizers import Normalizer

# Default tiles per backend (experiments/benchmarks/results/attention_cpu.md for the CPU choice).
DEFAULT_BLOCKS = {"cpu": BlockSizes(256, 256, 256, 256), "gpu": BlockSizes(512, 512, 512, 512),
                  "tpu": BlockSizes(512, 512, 512, 512)}


class _Config(NamedTuple):
  normalizer: Normalizer
  causal: bool
  window: int | None
  group: int
  blocks: BlockSizes


def attention(q, k, v, *, normalizer: Normalizer, mask: masking.Mask, q_scale, gate, block_sizes):
  """Same contract as :func:`pallas_kernels.attention.reference.attention`; ``block_sizes`` a
  :class:`._blocks.BlockSizes` or None (defaults per backend, :data:`DEFAULT_BLOCKS`)."""
  if not normalizer.blockwise:
    raise NotImplementedError(
        f"normalizer {normalizer.name!r} has no blockwise (online) form in xla; pass "
        f"implementation=\"reference\" or a sequence (\"xla\", \"reference\")")
  seq, heads, num_keys, kv_heads = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
  defaults = DEFAULT_BLOCKS.get(dispatch.current_backend(), DEFAULT_BLOCKS["cpu"])
  blocks = (block_sizes or BlockSizes()).resolve(defaults, seq, num_keys)
  q_scaled = (q.astype(jnp.float32) * q_scale[..., None]).astype(q.dtype)
  config = _Config(normalizer, mask.causal, mask.window, heads // kv_heads, blocks)
  if normalizer.entropy_temperature:
    q_scaled = (q_scaled.astype(jnp.float32) * _inverse_temperature(config, q_scaled, k, mask)).astype(q.dtype)
  o = _blockwise(config, q_scaled, k, v, mask)
  if gate is not None:
    o = o * gate.astype(jnp.float32)
  return o.astype(q.dtype)


def _inverse_temperature(config: _Config, q, k, mask: masking.Mask):
  """``beta`` ``(B, T, H, 1)`` of :class:`.normalizers.AdaptiveTemperature` from a first softmax pass with the
  keys as values: ``H_i = lse_i - sum_j p_ij s_ij`` and ``sum_j p_ij s_ij = q_i · sum_j p_ij k_j``."""
  pk, lse, _ = _forward(config, jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), jax.lax.stop_gradient(k),
                        mask)
  entropy = lse - jnp.sum(q.astype(jnp.float32) * pk, -1, keepdims=True)
  return config.normalizer.inverse_temperature(jnp.maximum(entropy, 0.0))


class _Tiles(NamedTuple):
  """Query-side arrays cut into blocks: ``x`` ``(NQ, B, KV, G * block, F)`` per array, rows ``g * block + t``."""
  seq: int
  group: int
  block: int

  def cut(self, x_BTHF):
    batch, _, heads, feat = x_BTHF.shape
    num = self.count
    x = jnp.pad(x_BTHF, ((0, 0), (0, num * self.block - self.seq), (0, 0), (0, 0)))
    x = x.reshape(batch, num, self.block, heads // self.group, self.group, feat).transpose(1, 0, 3, 4, 2, 5)
    return x.reshape(num, batch, heads // self.group, self.group * self.block, feat)

  def join(self, x):
    num, batch, kv_heads, _, feat = x.shape
    x = x.reshape(num, batch, kv_heads, self.group, self.block, feat).transpose(1, 0, 4, 2, 3, 5)
    return x.reshape(batch, num * self.block, kv_heads * self.group, feat)[:, :self.seq]

  @property
  def count(self) -> int:
    return -(-self.seq // self.block)

  def per_row(self, x_BT):
    """``(B, T)`` -> ``(NQ, B, 1, G * block, 1)`` (every head of the group has the row's value)."""
    return self.cut(jnp.broadcast_to(x_BT[:, :, None, None], x_BT.shape + (self.group, 1)))


class _KeyBlocks(NamedTuple):
  """Key-side arrays padded to whole blocks: ``k``/``v`` ``(B, KV, S', F)``, segment ids and key mask
  ``(B, 1, 1, S')`` or None."""
  k: jax.Array
  v: jax.Array
  kv_seg: jax.Array | None
  key_ok: jax.Array | None
  block: int
  num_keys: int

  @classmethod
  def make(cls, k, v, mask: masking.Mask, block: int) -> _KeyBlocks:
    num_keys = k.shape[1]
    pad = -(-num_keys // block) * block - num_keys
    heads_first = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    per_key = lambda x: None if x is None else jnp.pad(x, ((0, 0), (0, pad)))[:, None, None, :]
    return cls(heads_first(k), heads_first(v), per_key(mask.kv_segment_ids), per_key(mask.key_mask), block,
               num_keys)

  @property
  def count(self) -> int:
    return self.k.shape[2] // self.block

  def take(self, j):
    """Key block ``j``: ``(k, v, key indices, segment ids, key mask)``."""
    k_j = jax.lax.dynamic_slice_in_dim(self.k, j * self.block, self.block, axis=2)
    v_j = jax.lax.dynamic_slice_in_dim(self.v, j * self.block, self.block, axis=2)
    seg_j, ok_j = (None if x is None else jax.lax.dynamic_slice_in_dim(x, j * self.block, self.block, axis=3)
                   for x in (self.kv_seg, self.key_ok))
    return k_j, v_j, j * self.block + jnp.arange(self.block, dtype=jnp.int32), seg_j, ok_j


def _at(x, *index):
  """``x[index]`` for loop indices: a dynamic index without jnp's negative-index handling."""
  for i in index:
    x = jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)
  return x


def _visible(config: _Config, keys: _KeyBlocks, pos, q_seg, key_idx, kv_seg, key_ok):
  return masking.visible(pos, key_idx, q_seg, kv_seg, key_ok, causal=config.causal, window=config.window,
                         num_keys=keys.num_keys)


def _key_loop(config: _Config, meta, keys: _KeyBlocks, qi, pos, q_seg, init, step):
  """Runs ``step(carry, k_j, v_j, vis)`` over the key blocks query block ``qi`` sees (``vis`` None: full).
  Without ``meta`` (a single tile) the one key block runs masked, with no loop."""
  def run(j, carry, masked):
    k_j, v_j, key_idx, kv_seg, key_ok = keys.take(j)
    return step(carry, k_j, v_j, _visible(config, keys, pos, q_seg, key_idx, kv_seg, key_ok) if masked else None)

  if meta is None:
    return run(0, init, True)
  body = lambda j, carry: _blocks.by_class(_at(meta.classes[0], qi, j), functools.partial(run, j), carry)
  return jax.lax.fori_loop(_at(meta.kv_lo[0], qi), _at(meta.kv_hi[0], qi), body, init)


def _metadata(mask: masking.Mask, tiles: _Tiles, keys: _KeyBlocks):
  """Batch-union block metadata, or None for a single tile (no loops, no class switch)."""
  if tiles.count == 1 and keys.count == 1:
    return None
  return _blocks.batch_union(_blocks.block_meta(mask, tiles.seq, keys.num_keys, tiles.block, keys.block))


def _map(fn, xs, count: int):
  """``lax.map`` over query blocks (called directly for a single one)."""
  if count == 1:
    return jax.tree.map(lambda x: x[None], fn(jax.tree.map(lambda x: x[0], xs)))
  return jax.lax.map(fn, xs)


def _forward(config: _Config, q, k, v, mask: masking.Mask):
  """``o`` ``(B, T, H, Dv)`` float32 and the row statistics ``m``, ``inv_z`` ``(B, T, H, 1)`` (or None)."""
  norm, block_q, block_kv = config.normalizer, config.blocks.q, config.blocks.kv
  seq, value_dim = q.shape[1], v.shape[-1]
  tiles = _Tiles(seq, config.group, block_q)
  keys = _KeyBlocks.make(k, v, mask, block_kv)
  meta = _metadata(mask, tiles, keys)
  q_t, pos_t = tiles.cut(q), tiles.per_row(mask.positions(seq))
  seg_t = None if mask.q_segment_ids is None else tiles.per_row(mask.q_segment_ids)

  def query_block(xs):
    qi, q_i, pos_i, seg_i = xs
    def step(state, k_j, v_j, vis):
      return _tile.forward_step(norm, state, _tile.mm_nt(q_i, k_j), vis, v_j)
    state = _key_loop(config, meta, keys, qi, pos_i, seg_i, _tile.init(norm, q_i.shape[:-1], value_dim), step)
    o, m, inv_z = _tile.finalize(norm, state)
    if norm.has_transform:
      def transform(acc, k_j, v_j, vis):
        return _tile.transform_step(norm, acc, _tile.mm_nt(q_i, k_j), vis, v_j, m, inv_z)
      o = _key_loop(config, meta, keys, qi, pos_i, seg_i, jnp.zeros_like(o), transform)
    return o, m, inv_z

  o, m, inv_z = _map(query_block, (jnp.arange(tiles.count), q_t, pos_t, seg_t), tiles.count)
  join = lambda x: None if x is None else tiles.join(x)
  return join(o), join(m), join(inv_z)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise(config: _Config, q, k, v, mask):
  return _forward(config, q, k, v, mask)[0]


def _blockwise_fwd(config, q, k, v, mask):
  o, m, inv_z = _forward(config, q, k, v, mask)
  return o, (q, k, v, mask, o, m, inv_z)


def _blockwise_bwd(config, residuals, do):
  q, k, v, mask, o, m, inv_z = residuals
  norm, block_q, block_kv = config.normalizer, config.blocks.q_bwd, config.blocks.kv_bwd
  seq = q.shape[1]
  tiles = _Tiles(seq, config.group, block_q)
  keys = _KeyBlocks.make(k, v, mask, block_kv)
  meta = _metadata(mask, tiles, keys)
  cut = lambda x: None if x is None else tiles.cut(x)
  q_t, do_t, m_t, z_t, pos_t = cut(q), cut(do), cut(m), cut(inv_z), tiles.per_row(mask.positions(seq))
  seg_t = None if mask.q_segment_ids is None else tiles.per_row(mask.q_segment_ids)
  if norm.has_transform:
    def delta_block(xs):
      qi, q_i, do_i, m_i, z_i, pos_i, seg_i = xs
      def step(total, k_j, v_j, vis):
        return total + _tile.transform_delta(norm, _tile.mm_nt(q_i, k_j), vis, m_i, z_i, _tile.mm_nt(do_i, v_j))
      return _key_loop(config, meta, keys, qi, pos_i, seg_i, jnp.zeros(q_i.shape[:-1] + (1,), jnp.float32), step)
    delta_t = _map(delta_block, (jnp.arange(tiles.count), q_t, do_t, m_t, z_t, pos_t, seg_t), tiles.count)
  elif norm.normalized:
    delta_t = cut(jnp.sum(do.astype(jnp.float32) * o, axis=-1, keepdims=True))
  else:
    delta_t = None
  pick = lambda x, i: None if x is None else _at(x, i)

  def tile(i, k_j, v_j, key_idx, kv_seg, key_ok, _, masked):
    """``(dK, dV, dQ)`` contributions of tile (query block ``i``, this key block)."""
    q_i, do_i = _at(q_t, i), _at(do_t, i)
    vis = _visible(config, keys, _at(pos_t, i), pick(seg_t, i), key_idx, kv_seg, key_ok) if masked else None
    p, ds = _tile.backward_step(norm, _tile.mm_nt(q_i, k_j), vis, pick(m_t, i), pick(z_t, i),
                                _tile.mm_nt(do_i, v_j), pick(delta_t, i))
    return _tile.mm_tn(ds, q_i), _tile.mm_tn(p, do_i), _tile.mm(ds, k_j)

  def key_block(dq_t, j):
    block = keys.take(j)
    zeros = (jnp.zeros(block[0].shape, jnp.float32), jnp.zeros(block[1].shape, jnp.float32),
             jnp.zeros(q_t.shape[1:], jnp.float32))

    def body(i, carry):  # the switch returns the tile's contributions (never the whole dQ accumulator)
      dq_t, dk_j, dv_j = carry
      step = functools.partial(tile, i, *block)
      dk_add, dv_add, dq_add = (step(zeros, True) if meta is None
                                else _blocks.by_class(_at(meta.classes[0], i, j), step, zeros))
      return jax.lax.dynamic_update_index_in_dim(dq_t, _at(dq_t, i) + dq_add, i, 0), dk_j + dk_add, dv_j + dv_add

    init = (dq_t, zeros[0], zeros[1])
    if meta is None:
      dq_t, dk_j, dv_j = body(0, init)
    else:
      dq_t, dk_j, dv_j = jax.lax.fori_loop(_at(meta.q_lo[0], j), _at(meta.q_hi[0], j), body, init)
    return dq_t, (dk_j, dv_j)

  dq0 = jnp.zeros(q_t.shape, jnp.float32)
  if meta is None:
    dq_t, (dk, dv) = key_block(dq0, 0)
    dk, dv = dk[None], dv[None]
  else:
    dq_t, (dk, dv) = jax.lax.scan(key_block, dq0, jnp.arange(keys.count))
  num_keys = keys.num_keys
  merge = lambda x, like: jnp.moveaxis(x, 0, 2).reshape(like.shape[0], like.shape[2], -1, like.shape[3])[
      :, :, :num_keys].transpose(0, 2, 1, 3).astype(like.dtype)
  return tiles.join(dq_t).astype(q.dtype), merge(dk, k), merge(dv, v), None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
