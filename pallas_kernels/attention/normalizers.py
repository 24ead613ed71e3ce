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
import functools
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
  mixes_queries: ClassVar[bool] = False  # a query's weights depend on the other queries (non-causal only)
  entropy_temperature: ClassVar[bool] = False  # softmax on beta(H_i) * logits (two passes; AdaptiveTemperature)

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


# Second family (arXiv 2501.13428, 2410.01104, 1909.00015, 2110.11773): see docs/attention_normalizers.md.


def _visible_counts(vis: jax.Array) -> jax.Array:
  """``n_i``, the number of visible keys of each row of a materialised mask, ``(..., T, 1)`` float32."""
  return jnp.sum(vis, -1, keepdims=True, dtype=jnp.float32)


def _softplus(x):
  """softplus(x) = max(x, 0) + log1p(e^{-|x|}) (elementwise ops that lower through Mosaic and Triton)."""
  return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


@_pytree
class LSSA(Normalizer):
  """Length-scaled softplus attention (Gao, Spratling & Gionfrida, arXiv 2501.13428 §3):

      A_ij = softplus(log(d) log(n_i) s_ij) / sum_k softplus(log(d) log(n_i) s_ik)

  over the n_i visible keys, with ``s_ij = q̂_i · k̂_j`` the cosine of l2-normalised queries and keys: pass
  normalised q, k and ``scale=1.0`` (the layer does). The ``log n_i`` factor keeps the entropy roughly invariant
  to the length; ``log d`` uses ``head_dim`` (d = 64 in the paper). Bounded logits: no running max.

  ``reweight=True`` is LSSAR, the paper's re-weighting, ``A'_ij ∝ relu(n_i A_ij - o_i)^p`` renormalised per row,
  with ``o_i = 1`` (weights below uniform become 0, the rest are sharpened; p → ∞ tends to argmax) and ``o_i = 0``
  on rows with ``n_i <= 3`` (the paper's first three causal rows; here defined by the count, so it also holds for
  non-causal and offset calls). It can be switched on at inference on an LSSA model. The power is applied in the
  log domain (``(n A - 1)^15`` overflows float32 past n ≈ 400); a row with no weight above uniform keeps ``A``.
  LSSAR needs the final ``A`` before a second normalisation, so it is reference-only.
  """
  name: ClassVar[str] = "lssa"
  needs_counts: ClassVar[bool] = True
  head_dim: int = dataclasses.field(default=64, metadata=_STATIC)
  reweight: bool = dataclasses.field(default=False, metadata=_STATIC)
  power: float = dataclasses.field(default=15.0, metadata=_STATIC)

  def __post_init__(self):
    if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim < 2:
      raise ValueError(f"LSSA.head_dim: got {self.head_dim!r}; allowed: an int >= 2 (log d > 0)")
    if not isinstance(self.reweight, bool):
      raise ValueError(f"LSSA.reweight: got {self.reweight!r}; allowed: True (LSSAR) or False")
    _check_number("LSSA", "power", self.power, lambda x: x >= 1, "a float >= 1")

  @property
  def blockwise(self) -> bool:  # type: ignore[override]
    return not self.reweight

  @property
  def kernel_supported(self) -> bool:  # type: ignore[override]
    return not self.reweight

  def row_scale(self, counts_BT, heads):
    del heads
    return math.log(self.head_dim) * _log_counts(counts_BT)

  def numerator(self, s, m):
    return _softplus(s)

  def weights(self, s, vis):
    a = super().weights(s, vis)
    if not self.reweight:
      return a
    vis = jnp.broadcast_to(vis, s.shape)
    n = _visible_counts(vis)
    x = n * a - jnp.where(n > 3, 1.0, 0.0)
    keep = vis & (x > 0)
    log_r = jnp.where(keep, self.power * jnp.log(jnp.where(keep, x, 1.0)), -jnp.inf)
    top = jnp.max(log_r, -1, keepdims=True)
    r = jnp.where(keep, jnp.exp(log_r - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    total = r.sum(-1, keepdims=True)
    return jnp.where(total > 0, r / jnp.where(total > 0, total, 1.0), a)


ADAPTIVE_POLYNOMIAL = (-0.037, 0.481, -2.3, 4.917, -1.791)  # arXiv 2410.01104's listing, highest power first


@_pytree
class AdaptiveTemperature(Normalizer):
  """Adaptive temperature (Veličković et al., "softmax is not enough", arXiv 2410.01104, the
  adaptive-temperature section and its JAX listing):
  ``softmax(beta_i s_i)`` with the inverse temperature ``beta_i`` from the entropy ``H_i`` of ``softmax(s_i)``:
  ``beta = max(1, P(H))`` where ``H > threshold`` (0.5), else 1, ``P`` the paper's degree-4 fit of the
  sharpness-restoring inverse temperature against the entropy. ``beta`` is a constant to autodiff (the paper
  applies the rule at inference). Two passes: the ``xla`` path gets ``H = lse - sum_j p_j s_j`` from a first
  softmax pass whose values are the keys (``sum_j p_j s_j = q · sum_j p_j k_j``), then runs softmax on
  ``beta q``; the reference uses the paper's ``-sum p log(p + 1e-9)`` (the two differ by < n·1e-9).
  """
  name: ClassVar[str] = "adaptive_temperature"
  uses_max: ClassVar[bool] = True
  entropy_temperature: ClassVar[bool] = True
  kernel_supported: ClassVar[bool] = False  # beta needs a first pass over the whole row
  threshold: float = dataclasses.field(default=0.5, metadata=_STATIC)
  coefficients: tuple[float, ...] = dataclasses.field(default=ADAPTIVE_POLYNOMIAL, metadata=_STATIC)

  def __post_init__(self):
    _check_number("AdaptiveTemperature", "threshold", self.threshold, lambda x: x >= 0, "a float >= 0")
    if not isinstance(self.coefficients, tuple) or not self.coefficients or not all(
        isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in self.coefficients):
      raise ValueError(f"AdaptiveTemperature.coefficients: got {self.coefficients!r}; allowed: a non-empty tuple "
                       "of finite floats, highest power first")

  def numerator(self, s, m):
    return jnp.exp(s - m)

  def inverse_temperature(self, entropy: jax.Array) -> jax.Array:
    """``beta`` from the row entropy (nats), without gradient."""
    entropy = jax.lax.stop_gradient(entropy.astype(jnp.float32))
    beta = jnp.maximum(1.0, jnp.polyval(jnp.asarray(self.coefficients, jnp.float32), entropy))
    return jnp.where(entropy > self.threshold, beta, 1.0)

  def weights(self, s, vis):
    p = super().weights(s, vis)
    entropy = -jnp.sum(p * jnp.log(p + 1e-9), -1, keepdims=True)
    return super().weights(s * self.inverse_temperature(entropy), vis)


def _per_head_rows(value, s: jax.Array) -> jax.Array:
  """A per-head parameter as ``(H, 1, 1)`` against scores ``(..., H, T, S)`` (a scalar stays a scalar)."""
  value = jnp.asarray(value, jnp.float32)
  return value if value.ndim == 0 else value.reshape(-1, 1, 1)


def _entmax_threshold(z, alpha, iterations: int):
  """``tau`` with ``sum_j [z_j - tau]_+^{1/(alpha-1)} = 1`` by bisection on ``[max z - 1, max z - n^{1-alpha}]``
  (the bracket of the bisection of arXiv 1909.00015 §3), ``z = (alpha - 1) x``."""
  top = jnp.max(z, -1, keepdims=True)
  lo, width = top - 1.0, 1.0 - z.shape[-1] ** (1.0 - alpha)
  power = 1.0 / (alpha - 1.0)

  def halve(_, state):
    lo, width = state
    width = width / 2
    total = jnp.sum(jax.nn.relu(z - (lo + width)) ** power, -1, keepdims=True)
    return jnp.where(total >= 1.0, lo + width, lo), width

  lo, _ = jax.lax.fori_loop(0, iterations, halve, (lo, jnp.broadcast_to(width, lo.shape)))
  return lo


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def entmax_bisect(x, alpha, iterations: int = 50):
  """alpha-entmax over the last axis, ``p_j = [(alpha - 1) x_j - tau]_+^{1/(alpha-1)}`` with ``sum p = 1``
  (Peters, Niculae & Martins arXiv 1905.05702; Correia et al. arXiv 1909.00015 §3), by bisection; ``alpha > 1``
  broadcastable to ``x[..., :1]``. Gradients to ``x`` and ``alpha`` by implicit differentiation (arXiv
  1909.00015 §3, the alpha-gradient of its appendix)."""
  z = (alpha - 1.0) * x
  p = jax.nn.relu(z - _entmax_threshold(z, alpha, iterations)) ** (1.0 / (alpha - 1.0))
  return p / jnp.sum(p, -1, keepdims=True)


def _entmax_fwd(x, alpha, iterations):
  p = entmax_bisect(x, alpha, iterations)
  return p, (p, alpha)


def _entmax_bwd(iterations, residuals, dp):
  """``dx = g dp - g (sum g dp / sum g)`` with ``g = p^{2-alpha}`` on the support; ``d alpha`` from the implicit
  function theorem: ``sum_j dp_j [(p_j - g~_j) / (alpha-1)^2 - (p_j log p_j - g~_j sum_k p_k log p_k) / (alpha-1)]``
  with ``g~ = g / sum g``."""
  del iterations
  p, alpha = residuals
  alpha_b = jnp.broadcast_to(alpha, p.shape[:-1] + (1,))
  on = p > 0
  g = jnp.where(on, jnp.where(on, p, 1.0) ** (2.0 - alpha_b), 0.0)
  g_norm = g / jnp.sum(g, -1, keepdims=True)
  dx = g * dp - g_norm * jnp.sum(g * dp, -1, keepdims=True)
  p_log_p = jnp.where(on, p * jnp.log(jnp.where(on, p, 1.0)), 0.0)
  d_p_d_alpha = ((p - g_norm) / (alpha_b - 1.0) ** 2
                 - (p_log_p - g_norm * jnp.sum(p_log_p, -1, keepdims=True)) / (alpha_b - 1.0))
  d_alpha = jnp.sum(dp * d_p_d_alpha, -1, keepdims=True)
  alpha_shape = jnp.shape(alpha)
  d_alpha = jnp.sum(d_alpha, tuple(range(d_alpha.ndim - len(alpha_shape))))  # undo the broadcast of alpha
  d_alpha = jnp.sum(d_alpha, tuple(i for i, n in enumerate(alpha_shape) if n == 1), keepdims=True)
  return dx, d_alpha.reshape(alpha_shape).astype(jnp.asarray(alpha).dtype)


entmax_bisect.defvjp(_entmax_fwd, _entmax_bwd)

ENTMAX_MIN_ALPHA = 1.01  # the alpha-gradient has (alpha - 1) in its denominators: singular at 1


@_pytree
class Entmax(Normalizer):
  """alpha-entmax attention with a per-head alpha (Correia, Niculae & Martins, "Adaptively Sparse
  Transformers", arXiv 1909.00015 §3): alpha = 1 is softmax, 1.5 the 1.5-entmax, 2 sparsemax; exact zeros for
  alpha > 1. ``alpha``: a float or an ``(H,)`` array, learnable (gradients by the implicit function theorem,
  :func:`entmax_bisect`); values must be >= 1.01. ``iterations`` bisection halvings (50: float32 exact).
  The threshold needs the whole row, so it is reference-only (the kernels and ``xla`` refuse it)."""
  name: ClassVar[str] = "entmax"
  blockwise: ClassVar[bool] = False
  kernel_supported: ClassVar[bool] = False
  alpha: jax.Array | float = 1.5
  iterations: int = dataclasses.field(default=50, metadata=_STATIC)

  def __post_init__(self):
    if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
      raise ValueError(f"Entmax.iterations: got {self.iterations!r}; allowed: an int >= 1")
    if isinstance(self.alpha, (int, float)):  # arrays (and pytree placeholders) are checked by validate()
      _check_number("Entmax", "alpha", self.alpha, lambda x: x >= ENTMAX_MIN_ALPHA, f"a float >= {ENTMAX_MIN_ALPHA}")

  def validate(self, *, batch, seq, heads):
    _check_per_head("Entmax", "alpha", self.alpha, heads)
    if hasattr(self.alpha, "shape") and not isinstance(self.alpha, jax.core.Tracer):
      low = float(jnp.min(self.alpha))
      if not low >= ENTMAX_MIN_ALPHA:
        raise ValueError(f"Entmax.alpha: got a minimum of {low}; allowed: values >= {ENTMAX_MIN_ALPHA}")

  def weights(self, s, vis):
    """Scores ``(..., H, T, S)`` when ``alpha`` is per head."""
    vis = jnp.broadcast_to(vis, s.shape)
    alpha = _per_head_rows(self.alpha, s)
    row_max = jax.lax.stop_gradient(self.shift(jnp.max(jnp.where(vis, s, -jnp.inf), -1, keepdims=True)))
    # Masked keys sit below the bracket's low end, max - 1/(alpha - 1): outside the support.
    x = jnp.where(vis, s, row_max - 1.0 / (jax.lax.stop_gradient(alpha) - 1.0) - 1.0)
    return jnp.where(vis, entmax_bisect(x, alpha, self.iterations), 0.0)


def _masked_logsumexp(x, vis, axis: int):
  """log sum over visible entries along ``axis`` (0 where none is visible), keepdims."""
  top = jnp.max(jnp.where(vis, x, -jnp.inf), axis, keepdims=True)
  top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  total = jnp.sum(jnp.where(vis, jnp.exp(jnp.where(vis, x, top) - top), 0.0), axis, keepdims=True)
  return top + jnp.log(jnp.where(total > 0, total, 1.0))


@_pytree
class Sinkhorn(Normalizer):
  """Sinkformer attention (Sander, Ablin, Blondel & Peyré, arXiv 2110.11773 §3): ``iterations``
  alternating log-domain Sinkhorn half-steps on ``exp(S)``, rows first (so 1 iteration is softmax; an odd
  count ends on rows, whose sums are then exactly 1). Uniform marginals: rows sum to 1, columns (keys) to
  ``rows / columns`` (the non-empty ones; 1 for square self-attention), so the limit is doubly stochastic.
  Default 3 (the paper's ViT and text runs). Columns sum over the call's queries, so the weights of a query
  depend on the others: non-causal self-attention only (the public op refuses ``causal=True``), and
  reference-only (column sums need every query block)."""
  name: ClassVar[str] = "sinkhorn"
  blockwise: ClassVar[bool] = False
  kernel_supported: ClassVar[bool] = False
  mixes_queries: ClassVar[bool] = True
  iterations: int = dataclasses.field(default=3, metadata=_STATIC)

  def __post_init__(self):
    if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
      raise ValueError(f"Sinkhorn.iterations: got {self.iterations!r}; allowed: an int >= 1")

  def weights(self, s, vis):
    """Scores ``(..., T, S)``: the queries on axis -2."""
    vis = jnp.broadcast_to(vis, s.shape)
    rows = jnp.sum(jnp.any(vis, -1), -1, keepdims=True, dtype=jnp.float32)[..., None]
    cols = jnp.sum(jnp.any(vis, -2), -1, keepdims=True, dtype=jnp.float32)[..., None]
    log_col_mass = jnp.log(jnp.maximum(rows, 1.0) / jnp.maximum(cols, 1.0))
    log_p = jnp.where(vis, s, 0.0)
    for i in range(self.iterations):
      if i % 2 == 0:
        log_p = log_p - _masked_logsumexp(log_p, vis, -1)
      else:
        log_p = log_p - _masked_logsumexp(log_p, vis, -2) + log_col_mass
    return jnp.where(vis, jnp.exp(jnp.where(vis, log_p, 0.0)), 0.0)


NORMALIZERS: dict[str, type[Normalizer]] = {
    cls.name: cls for cls in (Softmax, Sigmoid, Softpick, SSMax, Selective, Stablemax, Relu, ClippedSoftmax,
                              SelfAdjust, Sparsemax, Entmax15, LSSA, AdaptiveTemperature, Entmax, Sinkhorn)}


def get(normalizer: str | Normalizer) -> Normalizer:
  """A normalizer instance from a name (with defaults) or an instance (returned as is)."""
  if isinstance(normalizer, Normalizer):
    return normalizer
  if isinstance(normalizer, str) and normalizer in NORMALIZERS:
    return NORMALIZERS[normalizer]()
  raise ValueError(f"normalizer: got {normalizer!r}; allowed: one of {', '.join(map(repr, NORMALIZERS))} or an "
                   "instance from pallas_kernels.attention.normalizers")
