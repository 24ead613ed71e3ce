"""The math of one (query block, key block) tile, shared by ``xla.py`` and the Pallas kernels.

FlashAttention-2 (arXiv 2307.08691, Alg. 1 and 2) generalised to any normalizer of the form of
:mod:`.normalizers`. The functions work on the last two axes and broadcast over leading ones: the ``xla``
path calls them on ``(B, KV, rows, keys)`` tiles, the kernels on ``(rows, keys)`` tiles. Per tile:

* forward (:func:`forward_step`): ``s = q k^T`` (float32; ``q`` already carries the row scale), the running
  shift ``m`` (row max, for exp-based normalizers), ``l = e^{m_old - m} l + sum_j h(s_j)``,
  ``acc = e^{m_old - m} acc + g(s) v``; :func:`finalize` gives ``o = acc / Z``, ``Z = l + offset(m)``, and the
  row statistics the backward needs: a log-sum-exp row where ``g / l`` folds into ``g(s, m + log l)``
  (softmax, self-adjust, clipped softmax), ``m`` and ``1 / Z`` for softpick, ``1 / Z`` for StableMax, nothing
  for the unnormalised ones (sigmoid, ReLA);
* backward (:func:`backward_step`): ``p = g(s) / Z`` (``P = phi(p)``), and with ``dP = dO v^T``

      dS = (g'(s) phi'(p) dP - h'(s) D) / Z,    D_i = sum_j p_ij phi'(p_ij) dP_ij   (normalised)
      dS = g'(s) dP                                                                   (unnormalised)

  where ``D_i = rowsum(dO_i * o_i)`` when ``phi`` is the identity; then ``dV += P^T dO``, ``dQ += dS K``,
  ``dK += dS^T Q``.

A masked key contributes 0 to ``g`` and ``h`` (so a fully masked row outputs 0); ``vis=None`` marks a full
tile, where no mask work is done. Masking uses :func:`.masking.visible`. Only elementwise ops, last-axis
reductions and 2-D (or batched) dots are used, so the same code lowers through XLA, Mosaic and Triton.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.attention.normalizers import Normalizer


def _dot(spec: str, a, b):
  """einsum in the narrower of the two dtypes (bf16 tiles stay bf16), float32 accumulation; float32 operands
  at full precision (TPU and Triton would otherwise round them to bf16 / tf32)."""
  dtype = a.dtype if jnp.finfo(a.dtype).bits <= jnp.finfo(b.dtype).bits else b.dtype
  precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), precision=precision,
                    preferred_element_type=jnp.float32)


def mm_nt(a, b):
  """``a @ b^T`` over the last two axes: scores ``q k^T`` and ``dP = dO v^T``."""
  return _dot("...rd,...jd->...rj", a, b)


def mm(a, b):
  """``a @ b``: ``P V`` and ``dQ = dS K``."""
  return _dot("...rj,...jd->...rd", a, b)


def mm_tn(a, b):
  """``a^T @ b``: ``dV = P^T dO`` and ``dK = dS^T Q``."""
  return _dot("...rj,...rd->...jd", a, b)


class State(NamedTuple):
  """Running forward state of a block of rows: shift ``m`` and total ``l`` ``(..., R, 1)``, ``acc``
  ``(..., R, Dv)``, all float32."""
  m: jax.Array
  l: jax.Array
  acc: jax.Array


def init(norm: Normalizer, rows: tuple[int, ...], value_dim: int) -> State:
  """The state before any key: ``m`` at the normalizer's floor (``-inf`` for softmax), ``l = acc = 0``."""
  m0 = norm.max_floor if norm.uses_max else 0.0
  return State(jnp.full(rows + (1,), m0, jnp.float32), jnp.zeros(rows + (1,), jnp.float32),
               jnp.zeros(rows + (value_dim,), jnp.float32))


def forward_step(norm: Normalizer, state: State, s, vis, v) -> State:
  """Adds one key tile: scores ``s`` ``(..., R, J)`` float32, ``vis`` bool or None (full), ``v`` ``(..., J, Dv)``.
  For a normalizer with a transform only ``m`` and ``l`` advance (``acc`` comes from :func:`transform_step`)."""
  m, l, acc = state
  alpha = None
  if norm.uses_max:
    row_max = jnp.max(s if vis is None else jnp.where(vis, s, -jnp.inf), axis=-1, keepdims=True)
    m_new = jnp.maximum(m, row_max)
    shift = norm.shift(m_new)
    alpha = jnp.exp(jnp.minimum(norm.shift(m) - shift, 0.0))  # 1 while nothing is accumulated
    m = m_new
  else:
    shift = 0.0
  g, h = norm.masked_terms(s, vis, shift)
  rescale = (lambda x: x) if alpha is None else (lambda x: alpha * x)
  if norm.normalized:
    l = rescale(l) + jnp.sum(h, axis=-1, keepdims=True)
  if not norm.has_transform:
    acc = rescale(acc) + mm(g, v)
  return State(m, l, acc)


def finalize(norm: Normalizer, state: State):
  """``(o, m, inv_z)``: the normalised output ``(..., R, Dv)`` float32 (meaningless with a transform) and the
  backward's row statistics ``(..., R, 1)``, each None when the normalizer needs none (module docstring)."""
  m, l, acc = state
  shift = norm.shift(m) if norm.uses_max else m
  if not norm.normalized:
    return acc, None, None
  inv_z = norm.inverse_total(l, shift)
  o = acc * inv_z
  if norm.single_row_residual:
    positive = l > 0
    return o, jnp.where(positive, shift + jnp.log(jnp.where(positive, l, 1.0)), 0.0), None
  return o, (shift if norm.uses_max else None), inv_z


def _normalised_terms(norm: Normalizer, s, vis, m, inv_z):
  """``p = g / Z`` and ``g'``, ``h'`` (each already divided by ``Z``; ``h'`` None if unnormalised)."""
  g, dg, _, dh = norm.masked_terms(s, vis, 0.0 if m is None else m, with_grad=True)
  if inv_z is not None:
    g, dg = g * inv_z, dg * inv_z
    dh = None if dh is None else dh * inv_z
  return g, dg, dh


def _transformed(norm: Normalizer, p, vis):
  """``(phi(p), phi'(p))`` with masked keys 0."""
  big_p, dphi = jax.jvp(norm.transform, (p,), (jnp.ones_like(p),))
  return (big_p if vis is None else jnp.where(vis, big_p, 0.0)), dphi


def transform_step(norm: Normalizer, acc, s, vis, v, m, inv_z):
  """Second forward pass of a normalizer with a transform: ``acc += phi(g / Z) v``."""
  p, _, _ = _normalised_terms(norm, s, vis, m, inv_z)
  return acc + mm(_transformed(norm, p, vis)[0], v)


def transform_delta(norm: Normalizer, s, vis, m, inv_z, dp):
  """``sum_j p phi'(p) dP`` over one tile, ``(..., R, 1)``: the ``D`` of a normalizer with a transform."""
  p, _, _ = _normalised_terms(norm, s, vis, m, inv_z)
  return jnp.sum(p * _transformed(norm, p, vis)[1] * dp, axis=-1, keepdims=True)


def backward_step(norm: Normalizer, s, vis, m, inv_z, dp, delta):
  """``(P, dS)`` of one tile from the saved row statistics ``m``, ``inv_z`` (None: 0 and 1), ``dP = dO v^T``
  and ``D`` (``delta`` ``(..., R, 1)``; unused when unnormalised)."""
  p, dg, dh = _normalised_terms(norm, s, vis, m, inv_z)
  if norm.has_transform:
    p, dphi = _transformed(norm, p, vis)
    dp = dp * dphi
  ds = dg * dp
  if norm.normalized:
    ds = ds - dh * delta
  return p, ds
