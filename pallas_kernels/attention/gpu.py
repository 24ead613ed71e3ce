"""Pallas Triton (GPU) kernels for blockwise attention with any one-pass normalizer (``pallas_triton``).

FlashAttention-2 (arXiv 2307.08691 Alg. 1, 2) with the tile math of :mod:`._tile` and the shared wrapper of
:mod:`._pallas_wrap`; block skipping is in the loop bounds. Each program owns one query block (forward,
``dq``) or one key block (``dk``/``dv``) and walks the other side with ``lax.fori_loop`` over the range the
block metadata gives (:mod:`._blocks`); per tile, a ``switch`` on its class runs it unmasked (full), masked
(partial) or not at all (empty, possible inside a range with segment ids).

* forward: grid ``(NQ, B, H)``, state ``m``, ``l``, ``acc`` in registers, epilogue with the fused gate;
* ``dq``: grid ``(NQ, B, H)``;
* ``dk``/``dv``: grid ``(NK, B, KV)``: loops over the query heads of the GQA group and, per head, over its
  query blocks, so ``dk``/``dv`` of the key/value head are reduced in registers (no atomics, no per-query-head
  copies).

Triton needs power-of-two tiles of at least 16 rows (``tl.dot``): head dims are padded to powers of two >= 16
and lengths to whole blocks. Logits, normalizer math and accumulators are float32 (scores are never rounded to
bf16 before the normalizer; float32 inputs use IEEE float32 dots, not tf32). ``triton.CompilerParams`` is
passed explicitly (without it the GPU lowering picks Mosaic GPU); defaults per device and head dim are in
:func:`default_blocks` and :func:`compiler_params`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import dispatch
from pallas_kernels.attention import _blocks, _pallas_wrap, _tile
from pallas_kernels.attention._blocks import BlockSizes

_MIN_BLOCK = 16  # tl.dot needs every dimension >= 16
# (device_kind substring, largest head dim, tiles); the first match wins. Forward 128 x 64 and backward
# 64 x 64 are the tuned Hopper/Ampere settings of the Triton flash-attention kernels; 256-wide heads halve them.
DEFAULT_BLOCKS = (("h100", 128, BlockSizes(128, 64, 64, 64)), ("h200", 128, BlockSizes(128, 64, 64, 64)),
                  ("a100", 128, BlockSizes(128, 64, 64, 64)), ("", 128, BlockSizes(64, 64, 32, 32)),
                  ("", 1 << 30, BlockSizes(64, 32, 32, 32)))


def _device_kind() -> str:
  return jax.devices()[0].device_kind.lower()


def default_blocks(head_dim: int) -> BlockSizes:
  kind = _device_kind()
  return next(blocks for key, largest, blocks in DEFAULT_BLOCKS if key in kind and head_dim <= largest)


def compiler_params(head_dim: int, *, backward: bool) -> pltriton.CompilerParams:
  """4 warps for the backward and for heads up to 64 wide, else 8; 3 pipeline stages on Hopper, else 2."""
  hopper = any(name in _device_kind() for name in ("h100", "h200"))
  warps = 4 if backward or head_dim <= 64 else 8
  return pltriton.CompilerParams(num_warps=warps, num_stages=3 if hopper and not backward else 2)


def _power_of_two(n: int) -> int:
  return max(_MIN_BLOCK, 1 << (n - 1).bit_length())


def _fit(block: int, length: int, field: str) -> int:
  del field
  return min(block, _power_of_two(length))


def _check_blocks(blocks: BlockSizes) -> None:
  _blocks.check_block_sizes(blocks, "pallas_triton", lambda b: b >= _MIN_BLOCK and b & (b - 1) == 0,
                            "powers of two >= 16 (Triton tiles)")


def _call(body, *, grid, inputs: dict, outputs: dict, spec, params, name):
  """``pallas_call`` whose ``body(ins, outs)`` gets the refs by name; ``spec(name, shape)`` cuts each array."""
  in_names, out_names = list(inputs), list(outputs)

  def kernel(*refs):
    body(dict(zip(in_names, refs)), dict(zip(out_names, refs[len(in_names):])))

  results = pl.pallas_call(
      kernel, grid=grid, out_shape=list(outputs.values()), compiler_params=params,
      in_specs=[spec(n, x.shape) for n, x in inputs.items()], out_specs=[spec(n, x.shape) for n, x in outputs.items()],
      interpret=dispatch.interpret_mode(), name=name)(*inputs.values())
  return dict(zip(out_names, results))


def _whole(shape):
  return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))


def _metadata(aux: _pallas_wrap.Aux, meta: _blocks.BlockMeta, side: str) -> dict:
  """Offsets, classes and the loop range of one pass, each a whole-array input (read as scalars)."""
  lo, hi = (meta.kv_lo, meta.kv_hi) if side == "kv" else (meta.q_lo, meta.q_hi)
  return dict(offset=aux.offset, classes=meta.classes, lo=lo, hi=hi)


def _query_major_spec(block_q: int, group: int):
  """Specs for grid ``(NQ, B, H)``: per-row arrays cut to the program's query block, per-key arrays whole
  (the program loops over them), metadata whole."""
  def spec(name, shape):
    if name in _pallas_wrap.ROW_SIDE:
      if len(shape) == 4:
        return pl.BlockSpec((None, None, block_q, shape[3]), lambda i, b, h: (b, h, i, 0))
      return pl.BlockSpec((None, block_q, 1), lambda i, b, h: (b, i, 0))
    if name in _pallas_wrap.KEY_SIDE:
      if len(shape) == 4:
        return pl.BlockSpec((None, None) + tuple(shape[2:]), lambda i, b, h: (b, jax.lax.div(h, group), 0, 0))
      return pl.BlockSpec((None,) + tuple(shape[1:]), lambda i, b, h: (b, 0, 0))
    return _whole(shape)
  return spec


def _key_tile(ins: dict, start, block_kv: int):
  """Key block at ``start`` of the whole-sequence refs: ``k``, ``v``, segment ids and key mask (or None)."""
  cut = pl.ds(start, block_kv)
  load = lambda name: ins[name][:, cut] if name in ins else None
  return ins["k"][cut, :], ins["v"][cut, :], load("kv_seg"), load("key_ok")


def _key_loop(config: _pallas_wrap.Config, ins: dict, block_q: int, block_kv: int, tile, init):
  """The key loop of a query-major program (forward, ``dq``): ``tile(carry, k, v, vis)`` over the key blocks of
  the program's range, by tile class (``vis`` None on a full tile)."""
  i, b = pl.program_id(0), pl.program_id(1)
  offset = ins["offset"][b]
  q_seg = ins["q_seg"][...] if "q_seg" in ins else None

  def key_block(j, carry):
    start = pl.multiple_of(j * block_kv, block_kv)
    k, v, kv_seg, key_ok = _key_tile(ins, start, block_kv)

    def step(c, masked):
      vis = _pallas_wrap.visibility(config, offset, i * block_q, start, block_q, block_kv, q_seg, kv_seg,
                                    key_ok) if masked else None
      return tile(c, k, v, vis)

    return _blocks.by_class(ins["classes"][b, i, j], step, carry)

  return jax.lax.fori_loop(ins["lo"][b, i], ins["hi"][b, i], key_block, init)


def _forward(config: _pallas_wrap.Config, inputs: dict, aux: _pallas_wrap.Aux, residuals: bool) -> dict:
  norm, block_q, block_kv = config.normalizer, config.blocks.q, config.blocks.kv
  batch, heads, _, dim = inputs["q"].shape
  value_dim = inputs["v"].shape[3]
  num_q = aux.meta.classes.shape[1]
  outputs = _pallas_wrap.forward_outputs(config, inputs, residuals)

  def body(ins, outs):
    q = ins["q"][...]
    state = _key_loop(config, ins, block_q, block_kv,
                      lambda st, k, v, vis: _tile.forward_step(norm, st, _tile.mm_nt(q, k), vis, v),
                      _tile.init(norm, (block_q,), value_dim))
    _pallas_wrap.epilogue(config, state, ins["gate"][...] if "gate" in ins else None, outs)

  inputs = {**_pallas_wrap.with_masks(inputs, aux), **_metadata(aux, aux.meta, "kv")}
  return _call(body, grid=(num_q, batch, heads), inputs=inputs, outputs=outputs,
               spec=_query_major_spec(block_q, config.group), params=compiler_params(dim, backward=False),
               name="attention_fwd_triton")


def _statistics(ins: dict, index) -> tuple:
  """``(m, z, delta)`` rows at ``index`` (each None when absent)."""
  return tuple(ins[name][index] if name in ins else None for name in ("m", "z", "delta"))


def _backward_dq(config: _pallas_wrap.Config, inputs: dict, aux: _pallas_wrap.Aux):
  block_q, block_kv = config.blocks.q_bwd, config.blocks.kv_bwd
  batch, heads, seq_pad, dim = inputs["q"].shape
  num_q = aux.meta_bwd.classes.shape[1]

  def body(ins, outs):
    q, do = ins["q"][...], ins["do"][...]
    m, z, delta = _statistics(ins, Ellipsis)

    def tile(dq, k, v, vis):
      _, ds = _pallas_wrap.grad_tile(config, q, k, v, do, m, z, delta, vis)
      return dq + _tile.mm(ds, k)

    outs["dq"][...] = _key_loop(config, ins, block_q, block_kv, tile, jnp.zeros((block_q, dim), jnp.float32))

  inputs = {**_pallas_wrap.with_masks(inputs, aux), **_metadata(aux, aux.meta_bwd, "kv")}
  outputs = {"dq": jax.ShapeDtypeStruct((batch, heads, seq_pad, dim), jnp.float32)}
  return _call(body, grid=(num_q, batch, heads), inputs=inputs, outputs=outputs,
               spec=_query_major_spec(block_q, config.group), params=compiler_params(dim, backward=True),
               name="attention_dq_triton")["dq"]


def _backward_dkv(config: _pallas_wrap.Config, inputs: dict, aux: _pallas_wrap.Aux):
  block_q, block_kv, group = config.blocks.q_bwd, config.blocks.kv_bwd, config.group
  batch, kv_heads, keys_pad, dim = inputs["k"].shape
  value_dim = inputs["v"].shape[3]
  num_k = aux.meta_bwd.classes.shape[2]

  def spec(name, shape):
    """Grid ``(NK, B, KV)``: per-key arrays cut to the program's key block, per-row arrays whole for the
    group's query heads, metadata whole."""
    if name in _pallas_wrap.KEY_SIDE:
      if len(shape) == 4:
        return pl.BlockSpec((None, None, block_kv, shape[3]), lambda j, b, kh: (b, kh, j, 0))
      return pl.BlockSpec((None, 1, block_kv), lambda j, b, kh: (b, 0, j))
    if name in _pallas_wrap.ROW_SIDE:
      if len(shape) == 4:
        return pl.BlockSpec((None, group) + tuple(shape[2:]), lambda j, b, kh: (b, kh, 0, 0))
      return pl.BlockSpec((None,) + tuple(shape[1:]), lambda j, b, kh: (b, 0, 0))
    return _whole(shape)

  def body(ins, outs):
    j, b = pl.program_id(0), pl.program_id(1)
    offset, k, v = ins["offset"][b], ins["k"][...], ins["v"][...]
    kv_seg = ins["kv_seg"][...] if "kv_seg" in ins else None
    key_ok = ins["key_ok"][...] if "key_ok" in ins else None

    def query_head(g, carry):
      def query_block(i, carry):
        rows = (g, pl.ds(pl.multiple_of(i * block_q, block_q), block_q), slice(None))
        q, do = ins["q"][rows], ins["do"][rows]
        m, z, delta = _statistics(ins, rows)
        q_seg = ins["q_seg"][rows[1:]] if "q_seg" in ins else None

        def step(acc, masked):
          vis = _pallas_wrap.visibility(config, offset, i * block_q, j * block_kv, block_q, block_kv, q_seg,
                                        kv_seg, key_ok) if masked else None
          p, ds = _pallas_wrap.grad_tile(config, q, k, v, do, m, z, delta, vis)
          return acc[0] + _tile.mm_tn(ds, q), acc[1] + _tile.mm_tn(p, do)

        return _blocks.by_class(ins["classes"][b, i, j], step, carry)

      return jax.lax.fori_loop(ins["lo"][b, j], ins["hi"][b, j], query_block, carry)

    zeros = (jnp.zeros((block_kv, dim), jnp.float32), jnp.zeros((block_kv, value_dim), jnp.float32))
    outs["dk"][...], outs["dv"][...] = jax.lax.fori_loop(0, group, query_head, zeros)

  inputs = {**_pallas_wrap.with_masks(inputs, aux), **_metadata(aux, aux.meta_bwd, "q")}
  outputs = {"dk": jax.ShapeDtypeStruct((batch, kv_heads, keys_pad, dim), jnp.float32),
             "dv": jax.ShapeDtypeStruct((batch, kv_heads, keys_pad, value_dim), jnp.float32)}
  out = _call(body, grid=(num_k, batch, kv_heads), inputs=inputs, outputs=outputs, spec=spec,
              params=compiler_params(dim, backward=True), name="attention_dkv_triton")
  return out["dk"], out["dv"]


_BACKEND = _pallas_wrap.Backend("pallas_triton", _forward, _backward_dq, _backward_dkv, default_blocks, _fit,
                                _check_blocks, _power_of_two)


def attention(q, k, v, **kwargs):
  """Canonical ``attention`` implementation (see ``pallas_kernels.attention``)."""
  return _pallas_wrap.attention(_BACKEND, q, k, v, **kwargs)
