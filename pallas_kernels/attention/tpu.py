"""Pallas TPU (Mosaic) kernels for blockwise attention with any one-pass normalizer (``pallas_tpu``).

FlashAttention-2 (arXiv 2307.08691 Alg. 1, 2) with the tile math of :mod:`._tile` and the shared wrapper of
:mod:`._pallas_wrap`. Block metadata (tile classes and loop ranges per batch row, :mod:`._blocks`) reaches the
kernels by scalar prefetch (SMEM), so it drives both the compute and the DMAs:

* forward, grid ``(B, H, NQ, NK)`` (the key axis last, "arbitrary"): running state ``m``, ``l``, ``acc`` in VMEM
  scratch; a tile runs unmasked when full, masked when partial, not at all when empty; the key/value
  ``index_map`` clamps the key block into the query block's range, so a skipped step re-uses the resident
  block and issues no DMA. Query heads of a GQA group read their key/value head's blocks (no repeat).
* ``dq``: grid ``(B, H, NQ, NK)``, ``dq`` accumulated in VMEM scratch over the key axis.
* ``dk``/``dv``: grid ``(B, KV, NK, G, NQ)``, the group's query heads and query blocks both "arbitrary", ``dk``
  and ``dv`` accumulated in VMEM over the whole group (reduced in the kernel) and written once.

Block shapes satisfy the (8, 128) tiling rule: query blocks are multiples of 8, key blocks multiples of 128
(they are the lane axis of the per-key segment-id and key-mask blocks), head dims up to 128 are whole, larger
ones padded to a multiple of 128; per-row statistics are ``(block, 1)`` blocks of ``(B, H, T, 1)`` arrays.
Matmuls accumulate in float32 (``preferred_element_type``), float32 operands at full precision; all
normalizer math is float32. Default tiles per TPU generation are in :data:`DEFAULT_BLOCKS` (v5e 512, v5p /
v6e 1024, as tuned for splash attention by tokamax); larger tiles raise the scoped VMEM limit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import dispatch
from pallas_kernels.attention import _blocks, _pallas_wrap, _tile
from pallas_kernels.attention._blocks import FULL, PARTIAL, BlockSizes

# (device_kind substring, tiles); first match wins, the last entry is the fallback.
DEFAULT_BLOCKS = (("v6", BlockSizes(1024, 1024, 1024, 1024)), ("v5 lite", BlockSizes(512, 512, 512, 512)),
                  ("v5e", BlockSizes(512, 512, 512, 512)), ("v5", BlockSizes(1024, 1024, 512, 512)),
                  ("", BlockSizes(512, 512, 512, 512)))
_LARGE_TILE_VMEM = 48 * 2**20  # scoped VMEM limit when a tile side reaches 1024 (v5p has 64 MiB per core)
_LANES, _SUBLANES = 128, 8


def _default_blocks(head_dim: int) -> BlockSizes:
  del head_dim
  kind = jax.devices()[0].device_kind.lower()
  return next(blocks for key, blocks in DEFAULT_BLOCKS if key in kind)


def _fit(block: int, length: int, field: str) -> int:
  """A short sequence is one tile, rounded up to the tiling of its axis (key blocks are lanes)."""
  return min(block, _blocks.round_up(length, _LANES if field.startswith("kv") else _SUBLANES))


def _check_blocks(blocks: BlockSizes) -> None:
  _blocks.check_block_sizes(blocks, "pallas_tpu", lambda b: b % _SUBLANES == 0, "multiples of 8")
  if not dispatch.interpret_mode():  # interpret mode runs any multiple of 8 (small tiles for CPU tests)
    _blocks.check_block_sizes(blocks, "pallas_tpu", lambda b: b % _LANES == 0,
                              "key blocks that are multiples of 128 (the lane axis of per-key blocks)",
                              fields=("kv", "kv_bwd"))


def _pad_dim(dim: int) -> int:
  return dim if dim <= _LANES else _blocks.round_up(dim, _LANES)


def _clamp(index, lo, hi):
  """``index`` moved into ``[lo, hi)`` (0 for an empty range): a skipped step keeps the resident block."""
  return jnp.maximum(jnp.minimum(index, hi - 1), lo)


def _call(body, *, grid, scalars, inputs: dict, outputs: dict, row_index, key_index, block_q, block_kv, scratch,
          semantics, name):
  """``pallas_call`` with scalar-prefetched ``scalars``; ``body(scalar_refs, ins, outs, scratch_refs)`` gets
  the refs by name. Per-row arrays are cut by ``row_index(*grid, *scalars) -> (b, head, q block)``, per-key
  arrays by ``key_index -> (b, kv head, k block)``."""
  def spec(array_name, shape):
    rank, last = len(shape), shape[-1]
    if array_name in _pallas_wrap.ROW_SIDE:
      if rank == 4:
        return pl.BlockSpec((None, None, block_q, last), lambda *a: (*row_index(*a), 0))
      return pl.BlockSpec((None, block_q, 1), lambda *a: (row_index(*a)[0], row_index(*a)[2], 0))
    if rank == 4:
      return pl.BlockSpec((None, None, block_kv, last), lambda *a: (*key_index(*a), 0))
    return pl.BlockSpec((None, 1, block_kv), lambda *a: (key_index(*a)[0], 0, key_index(*a)[2]))

  in_names, out_names = list(inputs), list(outputs)

  def kernel(*refs):
    scalar_refs, refs = refs[:len(scalars)], refs[len(scalars):]
    body(scalar_refs, dict(zip(in_names, refs)), dict(zip(out_names, refs[len(in_names):])),
         refs[len(in_names) + len(out_names):])

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(scalars), grid=grid, scratch_shapes=scratch,
      in_specs=[spec(n, x.shape) for n, x in inputs.items()], out_specs=[spec(n, x.shape) for n, x in outputs.items()])
  large = max(block_q, block_kv) >= 1024
  params = pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=_LARGE_TILE_VMEM if large else None)
  results = pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=list(outputs.values()), compiler_params=params,
                           interpret=dispatch.interpret_mode(), name=name)(*scalars, *inputs.values())
  return dict(zip(out_names, results))


def _kv_index(group: int, num_q: int):
  """``index_map`` of key/value blocks on grid ``(B, H, NQ, NK)``: the query head's key/value head (GQA
  without repeating k/v) and key block ``j`` clamped into the query block's range."""
  def index(b, h, i, j, off, cls, lo, hi):
    del off, cls
    return b, jax.lax.div(h, group), _clamp(j, lo[b * num_q + i], hi[b * num_q + i])
  return index


def _visible(config, ins, offset, q_start, k_start, rows, cols):
  load = lambda name: ins[name][...] if name in ins else None
  return _pallas_wrap.visibility(config, offset, q_start, k_start, rows, cols, load("q_seg"), load("kv_seg"),
                                 load("key_ok"))


def _when_class(classes, step):
  """Runs ``step(masked=True)`` on a partial tile, ``step(masked=False)`` on a full one, nothing if empty."""
  pl.when(classes == FULL)(lambda: step(False))
  pl.when(classes == PARTIAL)(lambda: step(True))


def _forward(config: _pallas_wrap.Config, inputs: dict, aux: _pallas_wrap.Aux, residuals: bool) -> dict:
  norm, meta = config.normalizer, aux.meta
  block_q, block_kv, group = config.blocks.q, config.blocks.kv, config.group
  batch, heads = inputs["q"].shape[:2]
  value_dim = inputs["v"].shape[3]
  num_q, num_k = meta.classes.shape[1:]

  def body(scalar_refs, ins, outs, scratch):
    off, cls = scalar_refs[:2]
    b, _, i, j = (pl.program_id(a) for a in range(4))
    m_sc, l_sc, acc_sc = scratch
    state = lambda: _tile.State(m_sc[...], l_sc[...], acc_sc[...])

    def store(st):
      m_sc[...], l_sc[...], acc_sc[...] = st

    pl.when(j == 0)(lambda: store(_tile.init(norm, (block_q,), value_dim)))

    def step(masked):
      vis = _visible(config, ins, off[b], i * block_q, j * block_kv, block_q, block_kv) if masked else None
      store(_tile.forward_step(norm, state(), _tile.mm_nt(ins["q"][...], ins["k"][...]), vis, ins["v"][...]))

    _when_class(cls[(b * num_q + i) * num_k + j], step)
    pl.when(j == num_k - 1)(lambda: _pallas_wrap.epilogue(config, state(), ins["gate"][...] if "gate" in ins
                                                         else None, outs))

  scratch = [pltpu.VMEM((block_q, 1), jnp.float32), pltpu.VMEM((block_q, 1), jnp.float32),
             pltpu.VMEM((block_q, value_dim), jnp.float32)]
  return _call(body, grid=(batch, heads, num_q, num_k),
               scalars=(aux.offset, meta.classes.reshape(-1), meta.kv_lo.reshape(-1), meta.kv_hi.reshape(-1)),
               inputs=_pallas_wrap.with_masks(inputs, aux),
               outputs=_pallas_wrap.forward_outputs(config, inputs, residuals),
               row_index=lambda b, h, i, j, *_: (b, h, i), key_index=_kv_index(group, num_q), block_q=block_q,
               block_kv=block_kv, scratch=scratch,
               semantics=("parallel", "parallel", "parallel", "arbitrary"), name="attention_fwd_tpu")


def _grad_tile(config, ins, vis):
  load = lambda name: ins[name][...] if name in ins else None
  return _pallas_wrap.grad_tile(config, ins["q"][...], ins["k"][...], ins["v"][...], ins["do"][...], load("m"),
                                load("z"), load("delta"), vis)


def _backward_dq(config: _pallas_wrap.Config, inputs: dict, aux: _pallas_wrap.Aux):
  meta, block_q, block_kv, group = aux.meta_bwd, config.blocks.q_bwd, config.blocks.kv_bwd, config.group
  batch, heads, seq_pad, dim = inputs["q"].shape
  num_q, num_k = meta.classes.shape[1:]

  def body(scalar_refs, ins, outs, scratch):
    off, cls = scalar_refs[:2]
    b, _, i, j = (pl.program_id(a) for a in range(4))
    (dq_sc,) = scratch

    @pl.when(j == 0)
    def _():
      dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def step(masked):
      vis = _visible(config, ins, off[b], i * block_q, j * block_kv, block_q, block_kv) if masked else None
      _, ds = _grad_tile(config, ins, vis)
      dq_sc[...] += _tile.mm(ds, ins["k"][...])

    _when_class(cls[(b * num_q + i) * num_k + j], step)

    @pl.when(j == num_k - 1)
    def _():
      outs["dq"][...] = dq_sc[...]

  outputs = {"dq": jax.ShapeDtypeStruct((batch, heads, seq_pad, dim), jnp.float32)}
  return _call(body, grid=(batch, heads, num_q, num_k),
               scalars=(aux.offset, meta.classes.reshape(-1), meta.kv_lo.reshape(-1), meta.kv_hi.reshape(-1)),
               inputs=_pallas_wrap.with_masks(inputs, aux), outputs=outputs,
               row_index=lambda b, h, i, j, *_: (b, h, i), key_index=_kv_index(group, num_q), block_q=block_q,
               block_kv=block_kv,
               scratch=[pltpu.VMEM((block_q, dim), jnp.float32)],
               semantics=("parallel", "parallel", "parallel", "arbitrary"), name="attention_dq_tpu")["dq"]


def _backward_dkv(config: _pallas_wrap.Config, inputs: dict, aux: _pallas_wrap.Aux):
  meta, block_q, block_kv, group = aux.meta_bwd, config.blocks.q_bwd, config.blocks.kv_bwd, config.group
  batch, kv_heads, keys_pad, dim = inputs["k"].shape
  value_dim = inputs["v"].shape[3]
  num_q, num_k = meta.classes.shape[1:]

  def row_index(b, kh, j, g, i, off, cls, lo, hi):
    del off, cls
    return b, kh * group + g, _clamp(i, lo[b * num_k + j], hi[b * num_k + j])

  def body(scalar_refs, ins, outs, scratch):
    off, cls = scalar_refs[:2]
    b, _, j, g, i = (pl.program_id(a) for a in range(5))
    dk_sc, dv_sc = scratch

    @pl.when((g == 0) & (i == 0))
    def _():
      dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
      dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def step(masked):
      vis = _visible(config, ins, off[b], i * block_q, j * block_kv, block_q, block_kv) if masked else None
      p, ds = _grad_tile(config, ins, vis)
      dv_sc[...] += _tile.mm_tn(p, ins["do"][...])
      dk_sc[...] += _tile.mm_tn(ds, ins["q"][...])

    _when_class(cls[(b * num_q + i) * num_k + j], step)

    @pl.when((g == group - 1) & (i == num_q - 1))
    def _():
      outs["dk"][...] = dk_sc[...]
      outs["dv"][...] = dv_sc[...]

  outputs = {"dk": jax.ShapeDtypeStruct((batch, kv_heads, keys_pad, dim), jnp.float32),
             "dv": jax.ShapeDtypeStruct((batch, kv_heads, keys_pad, value_dim), jnp.float32)}
  out = _call(body, grid=(batch, kv_heads, num_k, group, num_q),
              scalars=(aux.offset, meta.classes.reshape(-1), meta.q_lo.reshape(-1), meta.q_hi.reshape(-1)),
              inputs=_pallas_wrap.with_masks(inputs, aux), outputs=outputs, row_index=row_index,
              key_index=lambda b, kh, j, *_: (b, kh, j), block_q=block_q, block_kv=block_kv,
              scratch=[pltpu.VMEM((block_kv, dim), jnp.float32), pltpu.VMEM((block_kv, value_dim), jnp.float32)],
              semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary"), name="attention_dkv_tpu")
  return out["dk"], out["dv"]


_BACKEND = _pallas_wrap.Backend("pallas_tpu", _forward, _backward_dq, _backward_dkv, _default_blocks, _fit,
                                _check_blocks, _pad_dim)


def attention(q, k, v, **kwargs):
  """Canonical ``attention`` implementation (see ``pallas_kernels.attention``)."""
  return _pallas_wrap.attention(_BACKEND, q, k, v, **kwargs)
