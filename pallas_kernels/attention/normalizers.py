"""Attention-score normalizers: one small frozen dataclass each, resolved from a name with defaults.

Every blockwise-capable normalizer has the generic form (the online normaliser of arXiv 1805.02867 and
FlashAttention-2, arXiv 2307.08691 §3.1, with other maps in place of exp)

    P_ij = phi(g(s_ij) / Z_i),    Z_i = sum_{j visible} h(s_ij) + offset_i      (Z_i = 1 if not normalized)

with ``phi`` the identity except for clipped softmax. Exp-based ``g``/``h`` are written shifted by a row
shift ``m`` (``g(s, m) = e^{-m} g(s)``), so an online loop can rescale by ``e^{m_old - m_new}``; the others
ignore ``m``. Masked keys contribute to neither ``g`` nor ``h``. Blockwise kernels need only ``numerator``,
``denominator``, ``offset`` and ``transform``; derivatives come from ``jax.jvp`` of these elementwise maps
(the per-tile algorithm built from them is :mod:`._tile`). ``kernel_supported`` says whether the Pallas
kernels take a normalizer (one pass, identity ``phi``).

Row-local logit scalings (SSMax, selective temperature) are folded into a per-row query scale by the public
op (:meth:`Normalizer.row_scale`), so every implementation shares them and gradients to their arrays flow by
autodiff; :meth:`Normalizer.resolve` then gives the static (hashable) normalizer the kernels see.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from pallas_kernels import _checks

_STATIC = dict(static=True)


class Normalizer:
  """Base class; subclasses are frozen dataclasses registered as pytrees."""
  name: ClassVar[str]
  blockwise: ClassVar[bool] = True  # has the online form above (False: sort-based, reference only)
  uses_max: ClassVar[bool] = False  # exp-based: g, h are shifted by the running row max
  max_floor: ClassVar[float] = -math.inf  # the shift is max(row max, max_floor)
  normalized: ClassVar[bool] = True
  has_transform: ClassVar[bool] = False  # phi is not the identity (needs two passes)
  needs_counts: ClassVar[bool] = False  # row_scale uses n_i, the number of visible keys per row
  has_offset: ClassVar[bool] = False  # offset() is not 0
  kernel_supported: ClassVar[bool] = True  # the Pallas kernels take it (one pass, phi the identity)

  def validate(self, *, batch: int, seq: int, heads: int) -> None:
    """Checks array parameters against the call's shapes (ValueError naming the field)."""

  def resolve(self, num_keys: int) -> Normalizer:
    """The static normalizer kernels see (row scalings removed, defaults that depend on ``S`` filled)."""
    del num_keys
    return self

  def row_scale(self, counts_BT: jax.Array | None, heads: int) -> jax.Array | None:
    """``(B, T, H)`` float32 factor on the logits of each query row, or None."""
    del counts_BT, heads
    return None

  def numerator(self, s: jax.Array, m: jax.Array) -> jax.Array:
    raise NotImplementedError

  def denominator(self, s: jax.Array, m: jax.Array) -> jax.Array:
    return self.numerator(s, m)

  def offset(self, m: jax.Array) -> jax.Array | float:
    del m
    return 0.0

  def transform(self, p: jax.Array) -> jax.Array:
    return p

  # Shared machinery (used by the reference and by the blockwise implementations).

  @property
  def single_row_residual(self) -> bool:
    """Whether the row statistics fold into one log-sum-exp row: for exp-based numerators and denominators
    without offset, ``g(s, m) / l = g(s, m + log l)``, so the backward needs only ``m + log l``."""
    return self.uses_max and self.normalized and not self.has_offset

  def shift(self, row_max: jax.Array) -> jax.Array:
    """Finite row shift from a (possibly -inf) running max."""
    m = jnp.maximum(row_max, self.max_floor)
    return jnp.where(m > -jnp.inf, m, 0.0)

  def masked_terms(self, s, vis, m, *, with_grad: bool = False):
    """``g``, ``h`` (None if not normalized) zeroed on masked keys; with ``with_grad`` also ``g'``, ``h'``.
    ``vis=None``: every key is visible (a full block: no mask work)."""
    hide = (lambda x: x) if vis is None else (lambda x: jnp.where(vis, x, 0.0))
    s_safe = s if vis is None else jnp.where(vis, s, m)  # masked logits never reach exp/division
    fns = [lambda x: self.numerator(x, m)] + ([lambda x: self.denominator(x, m)] if self.normalized else [])
    out = []
    for fn in fns:
      if with_grad:
        value, grad = jax.jvp(fn, (s_safe,), (jnp.ones_like(s_safe),))
        out += [hide(value), hide(grad)]
      else:
        out.append(hide(fn(s_safe)))
    if not self.normalized:
      out += [None, None] if with_grad else [None]
    return tuple(out)

  def inverse_total(self, l: jax.Array, m: jax.Array) -> jax.Array:
    """``1 / Z`` from the sum of ``h`` terms (1 if not normalized; 0 for rows with ``Z == 0``)."""
    if not self.normalized:
      return jnp.ones_like(l)
    z = l + self.offset(m)
    return jnp.where(z > 0, 1.0 / jnp.where(z > 0, z, 1.0), 0.0)

  def weights(self, s: jax.Array, vis: jax.Array) -> jax.Array:
    """Materialised ``P`` over the last axis (keys) of ``s``; masked keys and empty rows give 0."""
    vis = jnp.broadcast_to(vis, s.shape)
    row_max = jnp.max(jnp.where(vis, s, -jnp.inf), -1, keepdims=True)
    m = jax.lax.stop_gradient(self.shift(row_max) if self.uses_max else jnp.zeros_like(row_max))
    g, h = self.masked_terms(s, vis, m)
    p = g * self.inverse_total(h.sum(-1, keepdims=True), m) if self.normalized else g
    return jnp.where(vis, self.transform(p), 0.0) if self.has_transform else p


def _pytree(cls):
  return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


def _check_number(owner: str, field: str, value, ok, allowed: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
    raise ValueError(f"{owner}.{field}: got {value!r}; allowed: {allowed}")


def _check_per_head(owner: str, field: str, value, heads: int) -> None:
  """A float, or a floating array of shape () or (H,)."""
  if hasattr(value, "shape"):
    if tuple(value.shape) not in ((), (heads,)) or not jnp.issubdtype(value.dtype, jnp.floating):
      raise ValueError(f"{owner}.{field}: got {value.dtype}{tuple(value.shape)}; allowed: a float or a floating "
                       f"array of shape () or ({heads},) (one per query head)")
  else:
    _check_number(owner, field, value, lambda x: True, "a float or an array of shape () or (heads,)")


def _log_counts(counts_BT: jax.Array) -> jax.Array:
  """``log n_i`` (0 for empty rows, which are masked anyway), ``(B, T, 1)`` float32."""
  return jnp.log(jnp.maximum(counts_BT, 1).astype(jnp.float32))[..., None]


def _per_head(value, heads: int) -> jax.Array:
  return jnp.broadcast_to(jnp.asarray(value, jnp.float32), (heads,))


@_pytree
class Softmax(Normalizer):
  """softmax(s)_j = e^{s_j} / sum_k e^{s_k}; online with a running max (arXiv 1805.02867, FA-2 §9.2)."""
  name: ClassVar[str] = "softmax"
  uses_max: ClassVar[bool] = True

  def numerator(self, s, m):
    return jnp.exp(s - m)


@_pytree
class Sigmoid(Normalizer):
  """Sigmoid attention P = sigma(s + b), no normalisation (arXiv 2409.04431 §3). ``bias=None`` gives
  b = -log n with n the number of keys ``S``."""
  name: ClassVar[str] = "sigmoid"
  normalized: ClassVar[bool] = False
  bias: float | None = dataclasses.field(default=None, metadata=_STATIC)

  def __post_init__(self):
    if self.bias is not None:
      _check_number("Sigmoid", "bias", self.bias, lambda x: True, "a finite float or None (-log S)")

  def resolve(self, num_keys):
    return self if self.bias is not None else Sigmoid(bias=-math.log(num_keys))

  def numerator(self, s, m):
    return jax.nn.sigmoid(s + self.bias)


@_pytree
class Softpick(Normalizer):
  """Softpick(s)_j = relu(e^{s_j} - 1) / (sum_k |e^{s_k} - 1| + eps) over visible keys (arXiv 2504.20966
  eq. 2). Shifted by m = max(row max, 0) for overflow safety; ``eps`` is added to the unshifted sum (the
  paper's kernel adds it after the shift; the two agree when the row max is <= 0)."""
  name: ClassVar[str] = "softpick"
  uses_max: ClassVar[bool] = True
  max_floor: ClassVar[float] = 0.0
  has_offset: ClassVar[bool] = True
  eps: float = dataclasses.field(default=1e-6, metadata=_STATIC)

  def __post_init__(self):
    _check_number("Softpick", "eps", self.eps, lambda x: x >= 0, "a float >= 0")

  def numerator(self, s, m):
    return jax.nn.relu(_shifted_expm1(s, m))

  def denominator(self, s, m):
    x = _shifted_expm1(s, m)
    return jnp.where(x < 0, -x, x)  # |x| whose derivative is a select (Mosaic lowers sign() only on a TPU)

  def offset(self, m):
    return self.eps * jnp.exp(-m)


def _shifted_expm1(s, m):
  """e^{-m} (e^s - 1) for s <= m: e^s - 1 = 2t / (1 - t) with t = tanh(s / 2) near 0 (no cancellation where
  softpick logits start; Mosaic has no expm1), else e^{s-m} - e^{-m}."""
  t = jnp.tanh(0.5 * jnp.clip(s, -1, 1))
  return jnp.where(jnp.abs(s) < 1, jnp.exp(-m) * (2 * t / (1 - t)), jnp.exp(s - m) - jnp.exp(-m))


@_pytree
class SSMax(Normalizer):
  """Scalable-Softmax: softmax((s_h log n_i) * logits) with n_i the number of keys row i sees
  (arXiv 2501.19399 eq. 2). ``s``: a float or an ``(H,)`` array (learnable; gradients flow)."""
  name: ClassVar[str] = "ssmax"
  needs_counts: ClassVar[bool] = True
  s: jax.Array | float = 1.0

  def validate(self, *, batch, seq, heads):
    _check_per_head("SSMax", "s", self.s, heads)

  def resolve(self, num_keys):
    return Softmax()

  def row_scale(self, counts_BT, heads):
    return _log_counts(counts_BT) * _per_head(self.s, heads)


@_pytree
class Selective(Normalizer):
  """Selective attention: softmax(tau_i * logits), tau = temperature * (1 + c log n_i) (Zhang et al.,
  NeurIPS 2024, arXiv 2411.12892). ``temperature``: ``(B, T, H)`` array or None (1);
  ``position_scale`` c: float, ``(H,)`` array or None (no position term); default e^{-e^{1.5}}, the
  official GPT-2 initialisation of the position-aware term."""
  name: ClassVar[str] = "selective"
  temperature: jax.Array | None = None
  position_scale: jax.Array | float | None = math.exp(-math.exp(1.5))

  def validate(self, *, batch, seq, heads):
    if self.temperature is not None:
      _checks.check_array("Selective.temperature", self.temperature, rank=3, layout="(batch, seq, heads)")
      _checks.check_shape("Selective.temperature", self.temperature, (batch, seq, heads), "(batch, seq, heads)")
    if self.position_scale is not None:
      _check_per_head("Selective", "position_scale", self.position_scale, heads)

  @property
  def needs_counts(self) -> bool:  # type: ignore[override]
    return self.position_scale is not None

  def resolve(self, num_keys):
    return Softmax()

  def row_scale(self, counts_BT, heads):
    tau = None if self.temperature is None else self.temperature.astype(jnp.float32)
    if self.position_scale is not None:
      position = 1.0 + _log_counts(counts_BT) * _per_head(self.position_scale, heads)
      tau = position if tau is None else tau * position
    return tau


@_pytree
class Stablemax(Normalizer):
  """StableMax: S(x)_j = s(x_j) / sum_k s(x_k), s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0)
  (arXiv 2501.04697 eq. 6). No exp, so no running max."""
  name: ClassVar[str] = "stablemax"

  def numerator(self, s, m):
    return jnp.where(s >= 0, s + 1.0, 1.0 / (1.0 - jnp.minimum(s, 0.0)))


@_pytree
class Relu(Normalizer):
  """ReLA: P = relu(logits), no normalisation; masked keys give 0 (Zhang et al., EMNLP 2021, arXiv 2104.07012)."""
  name: ClassVar[str] = "relu"
  normalized: ClassVar[bool] = False

  def numerator(self, s, m):
    return jax.nn.relu(s)


@_pytree
class ClippedSoftmax(Normalizer):
  """clip((zeta - gamma) softmax(s) + gamma, 0, 1) (Bondarenko et al., NeurIPS 2023, arXiv 2306.12929 eq. 4).
  Defaults: the BERT setting "clipped(-.025:1)" (gamma = -alpha/T with alpha = 3.2, T = 128)."""
  name: ClassVar[str] = "clipped_softmax"
  uses_max: ClassVar[bool] = True
  has_transform: ClassVar[bool] = True
  kernel_supported: ClassVar[bool] = False  # phi needs the final Z: two passes
  gamma: float = dataclasses.field(default=-0.025, metadata=_STATIC)
  zeta: float = dataclasses.field(default=1.0, metadata=_STATIC)

  def __post_init__(self):
    _check_number("ClippedSoftmax", "gamma", self.gamma, lambda x: x <= 0, "a float <= 0")
    _check_number("ClippedSoftmax", "zeta", self.zeta, lambda x: x >= 1, "a float >= 1")

  def numerator(self, s, m):
    return jnp.exp(s - m)

  def transform(self, p):
    return jnp.clip((self.zeta - self.gamma) * p + self.gamma, 0.0, 1.0)


@_pytree
class SelfAdjust(Normalizer):
  """Self-Adjust Softmax: s * softmax(s) (arXiv 2502.18277 eq. 3)."""
  name: ClassVar[str] = "self_adjust"
  uses_max: ClassVar[bool] = True

  def numerator(self, s, m):
    return s * jnp.exp(s - m)

  def denominator(self, s, m):
    return jnp.exp(s - m)


class _SortBased(Normalizer):
  """Exact sort-based projections (Martins & Astudillo 2016, arXiv 1602.02068;
  Peters et al. 2019, arXiv 1905.05702): reference only."""
  blockwise: ClassVar[bool] = False
  kernel_supported: ClassVar[bool] = False

  def project(self, x: jax.Array) -> jax.Array:
    raise NotImplementedError

  def weights(self, s, vis):
    vis = jnp.broadcast_to(vis, s.shape)
    row_max = self.shift(jnp.max(jnp.where(vis, s, -jnp.inf), -1, keepdims=True))
    # Masked keys sit 3 below the row max: outside the support of both projections (tau >= max - 1).
    x = jnp.where(vis, s, jax.lax.stop_gradient(row_max) - 3.0)
    return jnp.where(vis, self.project(x), 0.0)


@jax.custom_jvp
def _sparsemax(x):
  z = jnp.flip(jnp.sort(x, -1), -1)
  k = jnp.arange(1, x.shape[-1] + 1, dtype=x.dtype)
  cumsum = jnp.cumsum(z, -1)
  support = jnp.sum(1 + k * z > cumsum, -1, keepdims=True)
  tau = (jnp.take_along_axis(cumsum, support - 1, -1) - 1) / support.astype(x.dtype)
  return jax.nn.relu(x - tau)


@_sparsemax.defjvp
def _sparsemax_jvp(primals, tangents):
  p = _sparsemax(*primals)
  (dx,) = tangents
  on = (p > 0).astype(p.dtype)
  mean = jnp.sum(dx * on, -1, keepdims=True) / jnp.sum(on, -1, keepdims=True)
  return p, on * (dx - mean)


@jax.custom_jvp
def _entmax15(x):
  z = jnp.flip(jnp.sort(x / 2, -1), -1)
  k = jnp.arange(1, x.shape[-1] + 1, dtype=x.dtype)
  mean = jnp.cumsum(z, -1) / k
  var = jnp.cumsum(z * z, -1) / k - mean * mean
  tau = mean - jnp.sqrt(jnp.maximum(0.0, (1 - k * var) / k))
  support = jnp.sum(tau <= z, -1, keepdims=True)
  tau_star = jnp.take_along_axis(tau, support - 1, -1)
  return jax.nn.relu(x / 2 - tau_star) ** 2


@_entmax15.defjvp
def _entmax15_jvp(primals, tangents):
  p = _entmax15(*primals)
  (dx,) = tangents
  g = jnp.sqrt(p)
  gdx = g * dx
  return p, gdx - g * jnp.sum(gdx, -1, keepdims=True) / jnp.sum(g, -1, keepdims=True)


@_pytree
class Sparsemax(_SortBased):
  """Sparsemax: Euclidean projection onto the simplex, p = [x - tau]_+ (arXiv 1602.02068 eq. 2)."""
  name: ClassVar[str] = "sparsemax"

  def project(self, x):
    return _sparsemax(x)


@_pytree
class Entmax15(_SortBased):
  """1.5-entmax: p = [x/2 - tau]_+^2, exact sort-based (arXiv 1905.05702 eq. 10, Alg. 2)."""
  name: ClassVar[str] = "entmax15"

  def project(self, x):
    return _entmax15(x)


NORMALIZERS: dict[str, type[Normalizer]] = {
    cls.name: cls for cls in (Softmax, Sigmoid, Softpick, SSMax, Selective, Stablemax, Relu, ClippedSoftmax,
                              SelfAdjust, Sparsemax, Entmax15)}


def get(normalizer: str | Normalizer) -> Normalizer:
  """A normalizer instance from a name (with defaults) or an instance (returned as is)."""
  if isinstance(normalizer, Normalizer):
    return normalizer
  if isinstance(normalizer, str) and normalizer in NORMALIZERS:
    return NORMALIZERS[normalizer]()
  raise ValueError(f"normalizer: got {normalizer!r}; allowed: one of {', '.join(map(repr, NORMALIZERS))} or an "
                   "instance from pallas_kernels.attention.normalizers")
