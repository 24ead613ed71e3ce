"""Stochastic and relaxed discrete gates and their gradient estimators: one toolkit for every layer that
decides *whether* to compute (GateSkip-style skipping, head gates, MoE routers, early exits).

Binary stochastic unit on logits ``a`` with ``p = σ(a)`` and ``h ~ Bernoulli(p)`` (Bengio, Léonard &
Courville 2013, "Estimating or Propagating Gradients Through Stochastic Neurons for Conditional
Computation", arXiv 1308.3432). The estimators of ``∂E[L]/∂a``:

* ``"straight_through"``: forward the hard sample, backward ``∂h/∂a := σ'(a)`` (the sigmoid-adjusted
  straight-through estimator); ``"straight_through_identity"``: backward ``∂h/∂a := 1`` (the plain copy).
  Biased, low variance.
* ``"reinforce"``: no gradient through ``h``; the caller adds :func:`reinforce_surrogate`
  ``sg(L − b)·log P(h|a)``, whose gradient ``(h − p)(L − b)`` is unbiased for any baseline ``b`` that does
  not depend on ``h``. :class:`LearnedBaseline` learns the per-unit variance-minimising baseline
  ``b* = E[(h − p)² L] / E[(h − p)²]`` (the paper's optimal baseline) by minimising ``(h − p)²(L − b)²``.
* ``"stochastic_times_smooth"``: ``h = β·s`` with ``s = √σ(a)`` and ``β ~ Bernoulli(s)``, so ``E[h] = σ(a)``;
  backward through ``s`` only (``β`` a constant).
* ``"noisy_rectifier"``: noise injection, ``h = max(0, a + z)``, ``z ~ N(0, stddev²)``; ordinary backprop,
  exact zeros whenever ``a + z ≤ 0``.

Relaxations:

* Gumbel-softmax / Concrete (Jang, Gu & Poole 2017, arXiv 1611.01144 eq. 1; Maddison, Mnih & Teh 2017,
  arXiv 1611.00712): ``y = softmax((log π + g)/τ)`` with ``g = −log(−log u)``; ``hard=True`` is the
  straight-through Gumbel estimator (forward ``one_hot(argmax y)``, backward through ``y``). The binary case
  (:func:`gumbel_sigmoid`, a relaxed Bernoulli) is ``σ((a + log u − log(1 − u))/τ)``.
* Hard-Concrete (Louizos, Welling & Kingma 2018, "Learning Sparse Neural Networks through L0
  Regularization", arXiv 1712.01312 §4): ``s = σ((log u − log(1 − u) + log α)/β)``,
  ``z = clip(s(ζ − γ) + γ, 0, 1)`` with ``β = 2/3``, ``(γ, ζ) = (−0.1, 1.1)``; the expected L0 norm is
  ``σ(log α − β log(−γ/ζ))`` per gate (:func:`hard_concrete_l0`) and the test-time gate is
  ``clip(σ(log α)(ζ − γ) + γ, 0, 1)``.

Every sampler takes ``key=None`` for the deterministic (evaluation) rule: the threshold ``1[a > 0]`` for the
Bernoulli units, ``max(0, a)`` for the noisy rectifier, the noiseless softmax / sigmoid for the relaxations
(argmax / threshold when ``hard``) and the test gate for Hard-Concrete. Inside a Flax module the key comes
from ``gated_jax.layers.collections.noise_key(self)``, which is None outside training. Samples are computed
in float32. :func:`binary_gate` selects a binary estimator by name (:data:`BINARY_ESTIMATORS`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gated_jax.layers.collections import noise_key, sow_aux_loss

BINARY_ESTIMATORS = ("straight_through", "straight_through_identity", "reinforce", "stochastic_times_smooth",
                     "noisy_rectifier", "gumbel_sigmoid", "gumbel_sigmoid_st", "hard_concrete")
HARD_CONCRETE_TEMPERATURE = 2.0 / 3.0  # β of arXiv 1712.01312 §4
HARD_CONCRETE_STRETCH = (-0.1, 1.1)  # (γ, ζ)
_UNIFORM_EPS = 1e-6  # u ~ U(ε, 1 − ε) keeps log u and log(1 − u) finite in float32


class GateSample(NamedTuple):
  """A gate value and, for the Bernoulli-sampled estimators, ``log P(h | a)`` (None otherwise)."""
  value: jax.Array
  log_prob: jax.Array | None


@jax.custom_jvp
def _forward_hard(hard: jax.Array, soft: jax.Array) -> jax.Array:
  """``hard`` in the forward pass, the derivative of ``soft`` in the backward pass (exact forward values,
  unlike ``soft + sg(hard − soft)``, which rounds)."""
  del soft
  return hard


@_forward_hard.defjvp
def _forward_hard_jvp(primals, tangents):
  hard, _ = primals
  _, soft_dot = tangents
  return hard, soft_dot


def _float(name: str, x: Any) -> jax.Array:
  if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name}: got {getattr(x, 'dtype', type(x))}; allowed: a floating-point array")
  return x.astype(jnp.float32)


def _positive(name: str, value: Any) -> None:
  """Checks a concrete number (a traced value, e.g. an annealed temperature, is left to the caller)."""
  if isinstance(value, bool) or (isinstance(value, numbers.Real) and not value > 0):
    raise ValueError(f"{name}: got {value!r}; allowed: a positive number")


def _uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return jax.random.uniform(key, shape, jnp.float32, _UNIFORM_EPS, 1.0 - _UNIFORM_EPS)


def _logistic(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """``log u − log(1 − u)``: a standard logistic sample (the difference of two Gumbels)."""
  u = _uniform(key, shape)
  return jnp.log(u) - jnp.log1p(-u)


def bernoulli_log_prob(h: jax.Array, logits: jax.Array) -> jax.Array:
  """``log P(h | a) = h log σ(a) + (1 − h) log σ(−a)``, elementwise, float32."""
  logits = logits.astype(jnp.float32)
  return h * jax.nn.log_sigmoid(logits) + (1.0 - h) * jax.nn.log_sigmoid(-logits)


def _bernoulli(logits: jax.Array, key: jax.Array | None) -> jax.Array:
  """A float32 0/1 sample of ``Bernoulli(σ(a))`` (``1[a > 0]`` without a key), no gradient."""
  if key is None:
    return (logits > 0).astype(jnp.float32)
  return (_uniform(key, logits.shape) < jax.nn.sigmoid(logits)).astype(jnp.float32)


def straight_through(logits: jax.Array, key: jax.Array | None, *, backward: str = "sigmoid") -> GateSample:
  """Hard Bernoulli gate with the straight-through gradient (Bengio et al. 2013, arXiv 1308.3432).

  Args:
    logits: pre-activation ``a``.
    key: PRNG key, or None for the threshold ``1[a > 0]``.
    backward: ``"sigmoid"`` (``∂h/∂a := σ'(a)``) or ``"identity"`` (``∂h/∂a := 1``).
  """
  if backward not in ("sigmoid", "identity"):
    raise ValueError(f"backward: got {backward!r}; allowed: 'sigmoid' or 'identity'")
  logits = _float("logits", logits)
  h = _bernoulli(jax.lax.stop_gradient(logits), key)
  soft = jax.nn.sigmoid(logits) if backward == "sigmoid" else logits
  return GateSample(_forward_hard(h, soft), bernoulli_log_prob(h, logits))


def reinforce(logits: jax.Array, key: jax.Array | None) -> GateSample:
  """Bernoulli sample without a pathwise gradient, and ``log P(h | a)`` for :func:`reinforce_surrogate`."""
  logits = _float("logits", logits)
  h = _bernoulli(jax.lax.stop_gradient(logits), key)
  return GateSample(h, bernoulli_log_prob(h, logits))


def reinforce_surrogate(log_prob: jax.Array, loss: jax.Array, baseline: jax.Array | float = 0.0) -> jax.Array:
  """``sg(L − b)·log P(h|a)``: its gradient w.r.t. the logits is ``(h − p)(L − b)``, an unbiased estimate of
  ``∂E[L]/∂a`` (arXiv 1308.3432) for any ``b`` independent of ``h``. ``loss`` broadcasts against
  ``log_prob`` (e.g. ``(B, 1)`` per-example losses against ``(B, units)``)."""
  return jax.lax.stop_gradient(loss - baseline) * log_prob


def stochastic_times_smooth(logits: jax.Array, key: jax.Array | None) -> GateSample:
  """``h = β·√σ(a)`` with ``β ~ Bernoulli(√σ(a))`` (so ``E[h] = σ(a)``), backward through the smooth factor
  only (arXiv 1308.3432); without a key ``β = 1[√σ(a) > 1/2]``."""
  logits = _float("logits", logits)
  smooth = jnp.sqrt(jax.nn.sigmoid(logits))
  probability = jax.lax.stop_gradient(smooth)
  if key is None:
    beta = (probability > 0.5).astype(jnp.float32)
  else:
    beta = (_uniform(key, logits.shape) < probability).astype(jnp.float32)
  log_prob = beta * jnp.log(probability) + (1.0 - beta) * jnp.log1p(-probability)
  return GateSample(beta * smooth, log_prob)


def noisy_rectifier(pre: jax.Array, key: jax.Array | None, *, stddev: float = 1.0) -> GateSample:
  """Noise injection, ``max(0, a + z)``, ``z ~ N(0, stddev²)`` (arXiv 1308.3432); ``max(0, a)`` without a
  key."""
  _positive("stddev", stddev)
  pre = _float("pre", pre)
  if key is not None:
    pre = pre + stddev * jax.random.normal(key, pre.shape, jnp.float32)
  return GateSample(jax.nn.relu(pre), None)


def gumbel_softmax(logits: jax.Array, key: jax.Array | None, temperature: float | jax.Array = 1.0, *,
                   hard: bool = False, axis: int = -1) -> jax.Array:
  """Gumbel-softmax sample ``softmax((logits + g)/τ)`` over ``axis`` (arXiv 1611.01144 eq. 1).

  Args:
    logits: unnormalised log-probabilities (any shift along ``axis`` gives the same distribution).
    key: PRNG key, or None for the noiseless ``softmax(logits/τ)``.
    temperature: ``τ > 0`` (may be a traced scalar, e.g. :func:`anneal_temperature`).
    hard: straight-through: forward ``one_hot(argmax)``, backward through the soft sample.
    axis: the category axis.
  Returns:
    float32 array of ``logits.shape``, rows on the simplex (one-hot when ``hard``).
  """
  _positive("temperature", temperature)
  logits = _float("logits", logits)
  if key is not None:
    logits = logits - jnp.log(-jnp.log(_uniform(key, logits.shape)))
  soft = jax.nn.softmax(logits / temperature, axis=axis)
  if not hard:
    return soft
  index = jnp.argmax(jax.lax.stop_gradient(soft), axis=axis)
  one_hot = jax.nn.one_hot(index, soft.shape[axis], dtype=soft.dtype, axis=axis)
  return _forward_hard(one_hot, soft)


def gumbel_sigmoid(logits: jax.Array, key: jax.Array | None, temperature: float | jax.Array = 1.0, *,
                   hard: bool = False) -> jax.Array:
  """Binary Concrete / relaxed Bernoulli ``σ((a + log u − log(1 − u))/τ)`` (arXiv 1611.00712,
  arXiv 1611.01144 with two classes); ``hard``: forward ``1[y > 1/2]``, backward through ``y``."""
  _positive("temperature", temperature)
  logits = _float("logits", logits)
  if key is not None:
    logits = logits + _logistic(key, logits.shape)
  soft = jax.nn.sigmoid(logits / temperature)
  if not hard:
    return soft
  return _forward_hard((jax.lax.stop_gradient(soft) > 0.5).astype(soft.dtype), soft)


def _check_stretch(temperature: float, stretch: tuple[float, float]) -> tuple[float, float]:
  _positive("temperature", temperature)
  if not (isinstance(stretch, (tuple, list)) and len(stretch) == 2 and stretch[0] < 0 and stretch[1] > 1):
    raise ValueError(f"stretch: got {stretch!r}; allowed: (gamma, zeta) with gamma < 0 and zeta > 1")
  return float(stretch[0]), float(stretch[1])


def hard_concrete(log_alpha: jax.Array, key: jax.Array | None, *,
                  temperature: float = HARD_CONCRETE_TEMPERATURE,
                  stretch: tuple[float, float] = HARD_CONCRETE_STRETCH) -> jax.Array:
  """Hard-Concrete gate ``z ∈ [0, 1]`` with exact zeros and ones (arXiv 1712.01312 §4); the
  reparameterised (pathwise) gradient flows to ``log_alpha``. Without a key: the test gate
  ``clip(σ(log α)(ζ − γ) + γ, 0, 1)``."""
  gamma, zeta = _check_stretch(temperature, stretch)
  log_alpha = _float("log_alpha", log_alpha)
  if key is None:
    s = jax.nn.sigmoid(log_alpha)
  else:
    s = jax.nn.sigmoid((_logistic(key, log_alpha.shape) + log_alpha) / temperature)
  return jnp.clip(s * (zeta - gamma) + gamma, 0.0, 1.0)


def hard_concrete_l0(log_alpha: jax.Array, *, temperature: float = HARD_CONCRETE_TEMPERATURE,
                     stretch: tuple[float, float] = HARD_CONCRETE_STRETCH) -> jax.Array:
  """``P(z ≠ 0) = σ(log α − β log(−γ/ζ))`` per gate: the expected L0 norm (arXiv 1712.01312 §4)."""
  gamma, zeta = _check_stretch(temperature, stretch)
  return jax.nn.sigmoid(_float("log_alpha", log_alpha) - temperature * math.log(-gamma / zeta))


def anneal_temperature(step: jax.Array | int, *, rate: float, minimum: float = 0.5, every: int = 1,
                       initial: float = 1.0) -> jax.Array:
  """``τ = max(minimum, initial·exp(−rate·t))`` with ``t`` the step rounded down to a multiple of ``every``
  (the Gumbel-softmax schedule of arXiv 1611.01144 §4.1: ``τ = max(0.5, exp(−rt))`` updated every N
  steps)."""
  for name, value in (("rate", rate), ("minimum", minimum), ("initial", initial)):
    _positive(name, value)
  if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
    raise ValueError(f"every: got {every!r}; allowed: a positive int")
  t = (jnp.asarray(step, jnp.int32) // every * every).astype(jnp.float32)
  return jnp.maximum(jnp.float32(minimum), initial * jnp.exp(-rate * t))


def binary_gate(logits: jax.Array, key: jax.Array | None, estimator: str, *, temperature: float = 1.0,
                stddev: float = 1.0) -> GateSample:
  """A binary gate by estimator name (:data:`BINARY_ESTIMATORS`; the module docstring describes each).

  ``temperature`` is used by the Gumbel and Hard-Concrete gates (``"hard_concrete"`` reads ``logits`` as
  ``log α`` and uses ``β = temperature``), ``stddev`` by ``"noisy_rectifier"``.
  """
  if estimator == "straight_through":
    return straight_through(logits, key)
  if estimator == "straight_through_identity":
    return straight_through(logits, key, backward="identity")
  if estimator == "reinforce":
    return reinforce(logits, key)
  if estimator == "stochastic_times_smooth":
    return stochastic_times_smooth(logits, key)
  if estimator == "noisy_rectifier":
    return noisy_rectifier(logits, key, stddev=stddev)
  if estimator in ("gumbel_sigmoid", "gumbel_sigmoid_st"):
    return GateSample(gumbel_sigmoid(logits, key, temperature, hard=estimator == "gumbel_sigmoid_st"), None)
  if estimator == "hard_concrete":
    return GateSample(hard_concrete(logits, key, temperature=temperature), None)
  raise ValueError(f"estimator: got {estimator!r}; allowed: {', '.join(map(repr, BINARY_ESTIMATORS))}")


class LearnedBaseline(nn.Module):
  """REINFORCE with a learned per-unit baseline (arXiv 1308.3432).

  ``__call__(sample, logits, loss)`` returns the scalar to add to the training objective:
  ``mean_batch Σ_units [sg(L − sg(b))·log P(h|a) + (h − p)²(sg(L) − b)²]``. The first term gives the logits
  the unbiased gradient ``(h − p)(L − b)``; the second trains ``b`` (parameter ``baseline``, shape
  ``(units,)``, zero-initialised) towards the variance-minimising ``E[(h − p)² L] / E[(h − p)²]``.

  Attributes:
    num_units: number of gates (the last axis of ``logits``).
  """
  num_units: int

  @nn.compact
  def __call__(self, sample: GateSample, logits: jax.Array, loss: jax.Array) -> jax.Array:
    """``sample`` from :func:`reinforce` on ``logits`` ``(B, units)``; ``loss`` ``(B,)`` per-example losses."""
    if sample.log_prob is None:
      raise ValueError("sample: got a GateSample without log_prob; allowed: a Bernoulli sample (reinforce)")
    if logits.ndim != 2 or logits.shape[-1] != self.num_units or loss.shape != logits.shape[:1]:
      raise ValueError(f"logits/loss: got shapes {logits.shape}/{loss.shape}; allowed: (batch, "
                       f"{self.num_units}) and (batch,)")
    baseline = self.param("baseline", nn.initializers.zeros, (self.num_units,), jnp.float32)
    loss_B1 = loss.astype(jnp.float32)[:, None]
    surrogate = reinforce_surrogate(sample.log_prob, loss_B1, jax.lax.stop_gradient(baseline))
    weight = jnp.square(sample.value - jax.nn.sigmoid(jax.lax.stop_gradient(logits).astype(jnp.float32)))
    regression = weight * jnp.square(jax.lax.stop_gradient(loss_B1) - baseline)
    return jnp.mean(jnp.sum(surrogate + regression, axis=-1))


class HardConcreteGate(nn.Module):
  """Input-independent Hard-Concrete gates with a learned ``log α`` (arXiv 1712.01312 §4), e.g. over heads,
  experts or channels.

  Returns ``z`` of ``shape``: a sample during training (a key of the noise stream), the test gate otherwise.
  With ``l0_loss`` set, sows the mean expected L0 norm (:func:`hard_concrete_l0`) as that auxiliary loss.

  Attributes:
    shape: gate shape.
    keep_probability: initial ``σ(log α)`` (the reference code initialises ``log α ~ N(log(1 − p₀) − log p₀,
      0.01²)``, i.e. ``keep_probability = 1 − p₀``).
    temperature: ``β``.
    l0_loss: auxiliary-loss name for the expected L0 norm (None: not sown).
  """
  shape: tuple[int, ...]
  keep_probability: float = 0.5
  temperature: float = HARD_CONCRETE_TEMPERATURE
  l0_loss: str | None = None

  @nn.compact
  def __call__(self) -> jax.Array:
    if not 0.0 < self.keep_probability < 1.0:
      raise ValueError(f"keep_probability: got {self.keep_probability!r}; allowed: a number in (0, 1)")
    mean = math.log(self.keep_probability) - math.log1p(-self.keep_probability)
    init = lambda key, shape, dtype=jnp.float32: mean + 0.01 * jax.random.normal(key, shape, dtype)
    log_alpha = self.param("log_alpha", init, tuple(self.shape), jnp.float32)
    if self.l0_loss is not None:
      sow_aux_loss(self, self.l0_loss, jnp.mean(hard_concrete_l0(log_alpha, temperature=self.temperature)))
    return hard_concrete(log_alpha, noise_key(self), temperature=self.temperature)


__all__ = ["BINARY_ESTIMATORS", "GateSample", "HardConcreteGate", "LearnedBaseline", "anneal_temperature",
           "bernoulli_log_prob", "binary_gate", "gumbel_sigmoid", "gumbel_softmax", "hard_concrete",
           "hard_concrete_l0", "noisy_rectifier", "reinforce", "reinforce_surrogate", "stochastic_times_smooth",
           "straight_through"]
