"""What the TPU and Triton attention kernels share: layout, padding, block metadata, the custom VJP, and the
in-kernel pieces (tile visibility, the epilogue with the fused gate, the backward tile).

The kernels work in ``(B, heads, T, D)`` layout with ``T`` and ``S`` padded to whole blocks (forward and
backward blocks both divide the padded lengths) and head dims padded as the backend needs. The row scale is
multiplied into ``q`` here (autodiff gives its gradient). Per call, :func:`._blocks.block_meta` gives each
backend the tile classes and loop ranges, per batch row.

Forward: one kernel; its epilogue computes ``o_pre = acc / Z`` and writes ``o = o_pre * gate``, plus, when
differentiating, the row statistics of :func:`._tile.finalize` and (with a gate) ``o_pre``. Backward: in XLA,
``dO_pre = dO * gate``, ``dgate = dO * o_pre`` (summed over channels for a headwise gate: the saved un-gated
output, never a division by the gate) and ``D = rowsum(dO_pre * o_pre)`` for normalised normalizers; then a
``dq`` kernel (query blocks outer, key blocks inner) and a ``dk``/``dv`` kernel (key blocks outer, the query
heads of the GQA group and their query blocks inner, so ``dk``/``dv`` are reduced over the group in the
kernel); two kernels, no atomics.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.attention import _blocks, _tile, masking
from pallas_kernels.attention._blocks import BlockMeta, BlockSizes
from pallas_kernels.attention.normalizers import NORMALIZERS, Normalizer

# Per-row arrays (tiled with the query block) and per-key arrays (tiled with the key block) of each pass.
ROW_SIDE = ("q", "do", "gate", "m", "z", "delta", "q_seg", "o", "o_pre", "dq")
KEY_SIDE = ("k", "v", "kv_seg", "key_ok", "dk", "dv")


@dataclasses.dataclass(frozen=True)
class Backend:
  """One kernel family.

  Attributes:
    name: implementation name (error messages).
    forward: ``(config, inputs: dict, aux, residuals) -> dict`` of outputs (``o``; with ``residuals`` also
      ``o_pre`` when gated and the row statistics ``m`` / ``z`` the normalizer needs).
    backward_dq: ``(config, inputs: dict, aux) -> dq`` ``(B, H, T', D')`` float32.
    backward_dkv: ``(config, inputs: dict, aux) -> (dk, dv)`` float32.
    default_blocks: ``head_dim -> BlockSizes`` for the current device (every field set).
    fit: ``(block, length, field) -> block`` used when the sequence is shorter than the block.
    check_blocks: raises ValueError naming a field of the resolved block sizes the backend cannot take.
    pad_dim: head dim -> the padded head dim the kernels see.
  """
  name: str
  forward: Callable
  backward_dq: Callable
  backward_dkv: Callable
  default_blocks: Callable[[int], BlockSizes]
  fit: Callable[[int, int, str], int]
  check_blocks: Callable[[BlockSizes], None]
  pad_dim: Callable[[int], int]


@dataclasses.dataclass(frozen=True)
class Config:
  """Static description of one call (hashable: the ``nondiff_argnums`` of the custom VJP)."""
  backend: Backend
  normalizer: Normalizer
  causal: bool
  window: int | None
  num_keys: int
  group: int
  blocks: BlockSizes


class Aux(NamedTuple):
  """Non-differentiable per-call arrays: query offsets ``(B,)``, segment ids ``(B, T', 1)`` / ``(B, 1, S')``
  and key mask ``(B, 1, S')`` as int32 (or None), block metadata of the forward and backward tiles."""
  offset: jax.Array
  q_seg: jax.Array | None
  kv_seg: jax.Array | None
  key_ok: jax.Array | None
  meta: BlockMeta
  meta_bwd: BlockMeta


def row_statistics(norm: Normalizer) -> tuple[str, ...]:
  """Names of the row statistics :func:`._tile.finalize` returns for ``norm`` (``m``: shift or log-sum-exp,
  ``z``: ``1 / Z``)."""
  if not norm.normalized:
    return ()
  if norm.single_row_residual:
    return ("m",)
  return ("m", "z") if norm.uses_max else ("z",)


def attention(backend: Backend, q, k, v, *, normalizer: Normalizer, mask: masking.Mask, q_scale, gate,
              block_sizes):
  """Canonical-argument entry point of a Pallas backend (see ``pallas_kernels.attention``)."""
  if not normalizer.kernel_supported:
    supported = ", ".join(name for name, cls in NORMALIZERS.items() if cls.kernel_supported)
    raise NotImplementedError(
        f"{backend.name}: normalizer {normalizer.name!r} needs more than one pass over the keys (a sort or "
        f"bisection, a row statistic such as the entropy or the final Z, or column sums) and runs on \"xla\" / "
        f"\"reference\"; the kernels take {supported}")
  batch, seq, heads, dim = q.shape
  num_keys, kv_heads, value_dim = k.shape[1], k.shape[2], v.shape[3]
  blocks = (block_sizes or BlockSizes()).resolve(backend.default_blocks(dim), seq, num_keys, fit=backend.fit)
  backend.check_blocks(blocks)
  seq_pad = _blocks.round_up(seq, math.lcm(blocks.q, blocks.q_bwd))
  keys_pad = _blocks.round_up(num_keys, math.lcm(blocks.kv, blocks.kv_bwd))
  dim_pad, value_pad = backend.pad_dim(dim), backend.pad_dim(value_dim)

  def to_kernel(x_BTHF, length, feat):
    x = jnp.swapaxes(x_BTHF, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, feat - x.shape[3])))

  q_scaled = (q.astype(jnp.float32) * q_scale[..., None]).astype(q.dtype)
  inputs = dict(q=to_kernel(q_scaled, seq_pad, dim_pad), k=to_kernel(k, keys_pad, dim_pad),
                v=to_kernel(v, keys_pad, value_pad))
  if gate is not None:
    inputs["gate"] = to_kernel(gate, seq_pad, value_pad if gate.shape[-1] > 1 else 1)
  config = Config(backend, normalizer, mask.causal, mask.window, num_keys, heads // kv_heads, blocks)
  o = _attend(config, inputs, _aux(mask, seq, seq_pad, num_keys, keys_pad, blocks))
  return jnp.swapaxes(o[:, :, :seq, :value_dim], 1, 2).astype(q.dtype)


def _aux(mask: masking.Mask, seq: int, seq_pad: int, num_keys: int, keys_pad: int, blocks: BlockSizes) -> Aux:
  """Padded query rows count as rows (the last row's segment, later positions), so every one is finite and
  each query block has metadata; padded keys are masked (``key < S``)."""
  q_seg = mask.q_segment_ids
  if q_seg is not None:
    q_seg = jnp.pad(q_seg, ((0, 0), (0, seq_pad - seq)), mode="edge")
  padded = dataclasses.replace(mask, q_segment_ids=q_seg)
  per_key = lambda x: None if x is None else jnp.pad(x.astype(jnp.int32), ((0, 0), (0, keys_pad - num_keys)))[
      :, None, :]
  meta = lambda bq, bk: _blocks.block_meta(padded, seq_pad, num_keys, bq, bk)
  return Aux(mask.query_offset, None if q_seg is None else q_seg[:, :, None], per_key(mask.kv_segment_ids),
             per_key(mask.key_mask), meta(blocks.q, blocks.kv), meta(blocks.q_bwd, blocks.kv_bwd))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(config: Config, inputs: dict, aux: Aux):
  return config.backend.forward(config, inputs, aux, residuals=False)["o"]


def _attend_fwd(config, inputs, aux):
  outs = config.backend.forward(config, inputs, aux, residuals=True)
  return outs["o"], (inputs, aux, outs)


def _attend_bwd(config, residuals, do):
  inputs, aux, outs = residuals
  q, gate = inputs["q"], inputs.get("gate")
  o_pre = (outs["o"] if gate is None else outs["o_pre"]).astype(jnp.float32)
  do32 = do.astype(jnp.float32)
  grads = {}
  if gate is not None:
    gate32 = gate.astype(jnp.float32)
    dgate = do32 * o_pre
    grads["gate"] = (dgate if gate.shape[-1] > 1 else dgate.sum(-1, keepdims=True)).astype(gate.dtype)
    do32 = do32 * gate32
  bwd = dict(q=q, k=inputs["k"], v=inputs["v"], do=do32.astype(q.dtype),
             **{name: outs[name] for name in row_statistics(config.normalizer)})
  if config.normalizer.normalized:
    bwd["delta"] = jnp.sum(do32 * o_pre, axis=-1, keepdims=True)
  grads["q"] = config.backend.backward_dq(config, bwd, aux).astype(q.dtype)
  dk, dv = config.backend.backward_dkv(config, bwd, aux)
  grads["k"], grads["v"] = dk.astype(inputs["k"].dtype), dv.astype(inputs["v"].dtype)
  return {name: grads[name] for name in inputs}, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def forward_outputs(config: Config, inputs: dict, residuals: bool) -> dict:
  """Output shapes of a forward kernel: ``o``; with ``residuals`` also ``o_pre`` (gated calls) and the row
  statistics of the normalizer, ``(B, H, T', 1)`` float32."""
  batch, heads, seq_pad, _ = inputs["q"].shape
  outputs = {"o": jax.ShapeDtypeStruct((batch, heads, seq_pad, inputs["v"].shape[3]), inputs["q"].dtype)}
  if residuals:
    if "gate" in inputs:
      outputs["o_pre"] = jax.ShapeDtypeStruct(outputs["o"].shape, jnp.float32)
    outputs.update({name: jax.ShapeDtypeStruct((batch, heads, seq_pad, 1), jnp.float32)
                    for name in row_statistics(config.normalizer)})
  return outputs


def with_masks(inputs: dict, aux: Aux) -> dict:
  """``inputs`` plus the segment ids and key mask that are present."""
  masks = dict(q_seg=aux.q_seg, kv_seg=aux.kv_seg, key_ok=aux.key_ok)
  return {**inputs, **{name: x for name, x in masks.items() if x is not None}}


# In-kernel pieces (shared by tpu.py and gpu.py).

def visibility(config: Config, offset, q_start, k_start, rows: int, cols: int, q_seg, kv_seg, key_ok):
  """``(rows, cols)`` bool visibility of a partial tile whose first query row is ``q_start`` and first key
  ``k_start``; ``q_seg`` ``(rows, 1)``, ``kv_seg`` / ``key_ok`` ``(1, cols)`` int32 or None."""
  pos = offset + q_start + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
  key = k_start + jax.lax.broadcasted_iota(jnp.int32, (1, cols), 1)
  return masking.visible(pos, key, q_seg, kv_seg, None if key_ok is None else key_ok != 0,
                         causal=config.causal, window=config.window, num_keys=config.num_keys)


def epilogue(config: Config, state: _tile.State, gate, outs: dict) -> None:
  """Writes ``o = o_pre * gate`` and, when the refs exist, ``o_pre`` and the row statistics."""
  o, m, z = _tile.finalize(config.normalizer, state)
  for name, value in (("o_pre", o), ("m", m), ("z", z)):
    if name in outs:
      outs[name][...] = value.astype(outs[name].dtype)
  if gate is not None:
    o = o * gate.astype(jnp.float32)
  outs["o"][...] = o.astype(outs["o"].dtype)


def grad_tile(config: Config, q, k, v, do, m, z, delta, vis):
  """``(P, dS)`` of one tile (:func:`._tile.backward_step`), recomputing ``s = q k^T`` and ``dP = dO v^T``."""
  return _tile.backward_step(config.normalizer, _tile.mm_nt(q, k), vis, m, z, _tile.mm_nt(do, v), delta)
