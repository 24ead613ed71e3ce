"""The one wrapper around every chunked backend (``xla``, ``parallel``, ``pallas_tpu``, ``pallas_triton``):
layout, padding, decays, dtypes and ``jax.custom_vjp``; a backend supplies one :class:`Op` (forward, backward)
per op.

Both ops run over chunks of ``C`` steps (flash-linear-attention's ``chunk_*`` structure). The Pallas backends
build their ops from passes (:func:`gla_from_passes`, :func:`delta_from_passes`):

* gated linear attention (GLA arXiv 2312.06635 §4) — forward: ``states`` (sequential over chunks, writes the
  state entering every chunk), ``output`` (parallel over chunks); backward: ``state_grads`` (sequential, in
  reverse: the cotangent of the state leaving every chunk), ``grads`` (parallel: dq, dk, dv, dG);
* the gated delta rule (Gated DeltaNet arXiv 2412.06464 §3.3) — forward: ``prepare`` (parallel: the WY/UT
  ``w``, ``u``), ``states`` (sequential: states and the corrected values ``delta``), ``output``; backward:
  ``state_grads`` (sequential, reverse: state cotangents and ``d delta``), ``grads`` (parallel).

``xla`` runs the same chunk math as one loop over groups of chunks per half (:mod:`.xla`).

Arrays given to the ops ("kernel layout"): ``q`` ``(B, H, T, K)``; ``k``, ``v`` ``(B, KV, T, *)`` with ``KV``
dividing ``H`` (GQA: a key/value head serves ``H / KV`` consecutive query heads and is never repeated); ``G``
``(B, H, T, K')`` float32, the within-chunk inclusive cumulative log decay (``K' = K`` per key channel, ``1`` per
head; ``None`` when there is no decay and no segments; the per-step log decays instead when
:attr:`Plan.step_decays`); ``beta`` ``(B, H|KV, T, 1)``; states value-major ``(B, H, V, K)`` float32,
``(B, H, N, V, K)`` per chunk (intermediates that only pass between a backend's own passes, such as the chunk
states, ``w`` or ``delta``, may use the backend's layout instead: the wrapper never reads them). ``T`` is padded
to a multiple of ``C`` (zero inputs and zero log decay: the outputs and the final state are unchanged), and
``K``/``V`` to powers of two when the backend needs it.

Decays: log decays are clamped at :data:`._tiles.MIN_LOG_DECAY` (-30: ``exp(-30) ~ 9e-14``, below float32
resolution, so ``-inf`` empties the state to working precision and no ``-inf - -inf`` arises), and packed
sequences (``segment_ids``) become that log decay at each sequence start, which empties the state the same
way. The cumulative sum and these edits are plain JAX outside the ``custom_vjp``, so the gradient of the
per-step log decays is autodiff's reverse cumsum of the ops' ``dG`` (with :attr:`Plan.step_decays` the op clamps
and sums the decays and returns their per-step cotangent itself).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import _checks
from pallas_kernels.linear_attention._tiles import MIN_LOG_DECAY


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of the Pallas kernels (defaults per device: each Pallas backend's ``default_config``); the other
  implementations take none and ignore it.

  Attributes:
    block_k: K tile of the gated-linear-attention state passes.
    block_v: V tile of the state passes and of the output passes.
    num_warps: Triton warps per program (ignored on TPU).
    num_stages: Triton software-pipelining stages (ignored on TPU).
    states_dtype: dtype of the chunk states stored between passes ("float32" or "bfloat16"; the state passes
      accumulate in float32 either way).
  """
  block_k: int = 64
  block_v: int = 64
  num_warps: int = 4
  num_stages: int = 2
  states_dtype: str = "float32"

  def __post_init__(self):
    for name in ("block_k", "block_v"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"{name}: got {value!r}; allowed: a power of two >= 16")
    for name in ("num_warps", "num_stages"):
      _checks.check_positive_int(name, getattr(self, name), allow_none=False)
    _checks.check_choice("states_dtype", self.states_dtype, ("float32", "bfloat16"))


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static description of one call, given to every pass.

  Attributes:
    chunk: chunk length C.
    scale: query scale.
    decay: "none", "head" or "channel" (the form of ``G``).
    dtype: compute dtype of the dots (see :mod:`._tiles`).
    options: backend-specific settings (tile sizes, warps, stages), hashable.
    step_decays: ``G`` holds the per-step log decays, not yet clamped, which the backend clamps at
      :data:`._tiles.MIN_LOG_DECAY` and sums within chunks itself (and its backward returns their cotangent,
      zero where the clamp holds): set for a per-key-channel decay when the backend
      :attr:`~Backend.sums_channel_decays`.
  """
  chunk: int
  scale: float
  decay: str
  dtype: Any
  options: Any = None
  step_decays: bool = False


@dataclasses.dataclass(frozen=True)
class Op:
  """One op's two halves in kernel layout, as the ``custom_vjp`` calls them.

  Attributes:
    forward: ``(*inputs, h0, plan) -> ((o, h_final), residuals)``; inputs ``(q, k, v, G)`` for gated linear
      attention, ``(q, k, v, beta, G)`` for the delta rule.
    backward: ``(residuals, (do, dh_final), plan) -> (*input cotangents, dh0)`` in float32 (the wrapper casts).
  """
  forward: Callable
  backward: Callable


@dataclasses.dataclass(frozen=True)
class Backend:
  """One backend's ops (see the module docstring).

  Attributes:
    name: implementation name, for error messages.
    gla: gated linear attention.
    delta: the delta rule.
    plan: ``(q, chunk) -> (chunk, dtype, options)``: the chunk, compute dtype and options for these inputs
      (may raise ``NotImplementedError``).
    pad_pow2: pad K and V to powers of two (>= 16), as Triton's dots need.
    sums_channel_decays: for a per-key-channel decay the ops take the per-step log decays in place of ``G``
      and clamp and sum them within chunks themselves (:attr:`Plan.step_decays`).
  """
  name: str
  gla: Op
  delta: Op
  plan: Callable
  pad_pow2: bool = False
  sums_channel_decays: bool = False


def gla_from_passes(states, output, state_grads, grads) -> Op:
  """Gated linear attention from four passes (module docstring), each ``(..., plan) -> ...``: ``states(k, v, G,
  h0) -> (h_all, h_final)``, ``output(q, k, v, G, h_all) -> o``, ``state_grads(q, G, do, dh_final) -> (dS_all,
  dh0)``, ``grads(q, k, v, G, h_all, dS_all, do) -> (dq, dk, dv, dG)``. The backward recomputes the chunk states
  (a kernel's passes are bound by memory traffic, not by the state pass's work)."""
  def forward(q, k, v, G, h0, plan):
    h_all, h_final = states(k, v, G, h0, plan)
    return (output(q, k, v, G, h_all, plan), h_final), (q, k, v, G, h0)

  def backward(residuals, cotangents, plan):
    q, k, v, G, h0 = residuals
    do, dh_final = cotangents
    dS_all, dh0 = state_grads(q, G, do, dh_final, plan)
    return (*grads(q, k, v, G, states(k, v, G, h0, plan)[0], dS_all, do, plan), dh0)

  return Op(forward, backward)


def delta_from_passes(prepare, states, output, state_grads, grads) -> Op:
  """The delta rule from five passes (module docstring): ``prepare(k, v, beta, G) -> (w, u)``, ``states(k, w,
  u, G, h0) -> (h_all, delta, h_final)``, ``output(q, k, G, delta, h_all) -> o``, ``state_grads(q, k, w, G, do,
  dh_final) -> (dS_all, d_delta, dh0)``, ``grads(q, k, v, beta, G, h_all, delta, d_delta, dS_all, do) -> (dq, dk,
  dv, dbeta, dG)``; the backward recomputes ``w``, the states and ``delta``."""
  def forward_states(k, v, beta, G, h0, plan):
    w, u = prepare(k, v, beta, G, plan)
    return (w, *states(k, w, u, G, h0, plan))

  def forward(q, k, v, beta, G, h0, plan):
    _, h_all, delta, h_final = forward_states(k, v, beta, G, h0, plan)
    return (output(q, k, G, delta, h_all, plan), h_final), (q, k, v, beta, G, h0)

  def backward(residuals, cotangents, plan):
    q, k, v, beta, G, h0 = residuals
    do, dh_final = cotangents
    w, h_all, delta, _ = forward_states(k, v, beta, G, h0, plan)
    dS_all, d_delta, dh0 = state_grads(q, k, w, G, do, dh_final, plan)
    return (*grads(q, k, v, beta, G, h_all, delta, d_delta, dS_all, do, plan), dh0)

  return Op(forward, backward)


# ---- custom_vjp ---------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _run(op: Op, plan: Plan, input_dtypes, *inputs_and_h0):
  return op.forward(*inputs_and_h0, plan)[0]


def _run_fwd(op, plan, input_dtypes, *inputs_and_h0):
  return op.forward(*inputs_and_h0, plan)


def _run_bwd(op, plan, input_dtypes, residuals, cotangents):
  do, dh_final = cotangents
  *grads, dh0 = op.backward(residuals, (do, dh_final.astype(jnp.float32)), plan)
  return (*(g if dtype is None else g.astype(dtype) for g, dtype in zip(grads, input_dtypes)), dh0)


_run.defvjp(_run_fwd, _run_bwd)


def _dtypes(*inputs):
  """The cotangent dtypes of ``inputs`` (None: keep float32, as for ``G``)."""
  return tuple(None if x is None or x.dtype == jnp.float32 else jnp.dtype(x.dtype) for x in inputs)


# ---- canonical arguments -> kernel layout --------------------------------------------------------------------


def _pow2(n: int) -> int:
  return max(16, 1 << (n - 1).bit_length())


def _segment_starts(segment_ids):
  """``(B, T)`` bool: a new packed sequence starts here (never at step 0: the initial state applies there)."""
  return jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)


def _log_decays(log_decay, segment_ids, shape_BTH, chunk: int, padded: int, *, cumulative: bool):
  """``(B, H, T_padded, K')`` float32 log decays (module docstring), or ``None``: ``G``, clamped and summed within
  each chunk, when ``cumulative``, else per step, left for the backend to clamp (:attr:`Plan.step_decays`: no
  whole-sequence pass, and no whole-sequence copy of a per-channel decay, on the path that does not need one)."""
  if log_decay is None and segment_ids is None:
    return None
  batch, seq, heads = shape_BTH
  g = jnp.zeros((batch, seq, heads, 1), jnp.float32) if log_decay is None else log_decay.astype(jnp.float32)
  g = g if g.ndim == 4 else g[..., None]
  g = jnp.maximum(g, MIN_LOG_DECAY) if cumulative else g
  if segment_ids is not None:
    g = jnp.where(_segment_starts(segment_ids)[:, :, None, None], MIN_LOG_DECAY, g)
  width = g.shape[-1]
  g = jnp.pad(g, ((0, 0), (0, padded - seq), (0, 0), (0, 0)))
  if cumulative:
    g = within_chunk_cumsum(g.reshape(batch, padded // chunk, chunk, heads * width))
  return jnp.swapaxes(g.reshape(batch, padded, heads, width), 1, 2)


def within_chunk_cumsum(g, *, reverse: bool = False):
  """The inclusive cumulative sum of ``g`` ``(..., C, X)`` over its chunk rows (``reverse``: from the last row,
  the transpose), as one batched matmul with a triangular matrix of ones: XLA CPU's cumsum is slow, and with the
  chunk rows contracted and the rest as columns the result needs no transpose."""
  chunk = g.shape[-2]
  ones = jnp.tril(jnp.ones((chunk, chunk), jnp.float32))
  ones = jnp.broadcast_to(ones.T if reverse else ones, (*g.shape[:-2], chunk, chunk))
  return jnp.einsum("...ij,...jx->...ix", ones, g, precision=jax.lax.Precision.HIGHEST)


class _Layout:
  """Moves canonical ``(B, T, heads, dim)`` arrays to kernel layout and back (module docstring)."""

  def __init__(self, backend: Backend, chunk: int, q, v):
    self.batch, self.seq, self.heads, self.key_dim = q.shape
    self.value_dim = v.shape[-1]
    self.padded = -(-self.seq // chunk) * chunk
    self.kp, self.vp = ((_pow2(self.key_dim), _pow2(self.value_dim)) if backend.pad_pow2
                        else (self.key_dim, self.value_dim))

  def rows(self, x_BTHD, dim=None):
    dim = x_BTHD.shape[-1] if dim is None else dim
    return jnp.pad(jnp.swapaxes(x_BTHD, 1, 2),
                   ((0, 0), (0, 0), (0, self.padded - self.seq), (0, dim - x_BTHD.shape[-1])))

  def state_in(self, initial_state):
    if initial_state is None:
      return jnp.zeros((self.batch, self.heads, self.vp, self.kp), jnp.float32)
    s = jnp.swapaxes(initial_state.astype(jnp.float32), 2, 3)
    return jnp.pad(s, ((0, 0), (0, 0), (0, self.vp - self.value_dim), (0, self.kp - self.key_dim)))

  def outputs(self, o_BHTV, s_BHVK, dtype):
    o = jnp.swapaxes(o_BHTV[:, :, :self.seq, :self.value_dim], 1, 2).astype(dtype)
    return o, jnp.swapaxes(s_BHVK[:, :, :self.value_dim, :self.key_dim], 2, 3)


def _plan(backend: Backend, q, log_decay, scale, chunk_size) -> Plan:
  chunk, dtype, options = backend.plan(q, chunk_size)
  decay = "none" if log_decay is None else ("head" if log_decay.ndim == 3 else "channel")
  return Plan(chunk=chunk, scale=float(scale), decay=decay, dtype=dtype, options=options)


def linear_attention(backend: Backend, q, k, v, log_decay, *, scale, initial_state, return_final_state,
                     segment_ids, chunk_size):
  """Canonical-argument entry point (see ``pallas_kernels.linear_attention``); returns ``(o, final_state)``."""
  del return_final_state  # the final state is always computed
  plan = _plan(backend, q, log_decay, scale, chunk_size)
  if plan.decay == "none" and segment_ids is not None:
    plan = dataclasses.replace(plan, decay="head")
  plan = dataclasses.replace(plan, step_decays=backend.sums_channel_decays and plan.decay == "channel")
  layout = _Layout(backend, plan.chunk, q, v)
  G = _log_decays(log_decay, segment_ids, q.shape[:3], plan.chunk, layout.padded, cumulative=not plan.step_decays)
  if G is not None and plan.decay == "channel" and layout.kp != layout.key_dim:
    G = jnp.pad(G, ((0, 0), (0, 0), (0, 0), (0, layout.kp - layout.key_dim)))
  inputs = (layout.rows(q, layout.kp), layout.rows(k, layout.kp), layout.rows(v, layout.vp), G)
  o, s = _run(backend.gla, plan, _dtypes(*inputs), *inputs, layout.state_in(initial_state))
  return layout.outputs(o, s, q.dtype)


def delta_rule(backend: Backend, q, k, v, beta, log_decay, *, scale, initial_state, return_final_state,
               segment_ids, chunk_size):
  """Canonical-argument entry point (see ``pallas_kernels.delta_rule``); returns ``(o, final_state)``."""
  del return_final_state  # the final state is always computed
  plan = _plan(backend, q, log_decay, scale, chunk_size)
  if segment_ids is not None:
    plan = dataclasses.replace(plan, decay="head")
  layout = _Layout(backend, plan.chunk, q, v)
  G = _log_decays(log_decay, segment_ids, q.shape[:3], plan.chunk, layout.padded, cumulative=True)
  inputs = (layout.rows(q, layout.kp), layout.rows(k, layout.kp), layout.rows(v, layout.vp),
            layout.rows(beta[..., None]), G)
  o, s = _run(backend.delta, plan, _dtypes(*inputs), *inputs, layout.state_in(initial_state))
  return layout.outputs(o, s, q.dtype)
