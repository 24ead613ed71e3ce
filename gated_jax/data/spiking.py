"""Offline classification data for spiking networks: scikit-learn's bundled digits, rate- or latency-coded
into spike trains, and Randman, a procedurally generated temporal task.

* :func:`digits`: the 1,797 8x8 digit images shipped with scikit-learn (no download), scaled to [0, 1] and
  split train/test with a fixed permutation.
* :func:`rate_code` (Poisson/Bernoulli rate coding: pixel ``x`` spikes with probability ``gain·x`` at every
  step) and :func:`latency_code` (one spike at ``t = round((1 - x)(T - 1))``, none below ``threshold``): the
  encodings of spyx's ``rate_code`` / ``latency_code`` and UltraLIF's ``rate_encode``.
* :func:`randman`: Randman (Zenke & Vogels, Neural Computation 2021, "The remarkable robustness of surrogate
  gradient learning"): each class is a smooth random manifold of dimension ``manifold_dim`` embedded in
  ``units`` dimensions, each embedding coordinate a product over manifold dimensions of random Fourier series
  ``f(x) = Σ_i θ_{0,i} (i+1)^{-α} sin(2π (i x θ_{1,i} + θ_{2,i}))`` with ``θ ~ U(0, 1)``, ``θ_{0,0} = 0`` and
  ``ceil(1000^{1/α})`` terms. A sample is a uniform point on the manifold; unit ``u`` fires once, at the step
  given by its coordinate scaled to [0, 1] (per class and unit, by the extremes over 4,096 reference points
  [derived: the reference code leaves the normalisation to the caller]). Chance is ``1/classes``; only spike
  *times* distinguish the classes (every unit spikes exactly once in every sample).

All generators are numpy, deterministic in their seed, and return float32 arrays.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
  """Train and test arrays of a classification task (inputs first, integer labels second)."""
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray

  @property
  def num_classes(self) -> int:
    return int(max(self.y_train.max(), self.y_test.max())) + 1


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> Split:
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction: got {test_fraction!r}; allowed: a number in (0, 1)")
  order = np.random.default_rng(seed).permutation(len(x))
  num_test = int(round(test_fraction * len(x)))
  test, train = order[:num_test], order[num_test:]
  return Split(x[train], y[train].astype(np.int32), x[test], y[test].astype(np.int32))


def digits(*, test_fraction: float = 0.25, seed: int = 0) -> Split:
  """scikit-learn's digits, pixels scaled to [0, 1], ``x`` ``(n, 64)``."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

  data = load_digits()
  return _split((data.data / 16.0).astype(np.float32), data.target, test_fraction, seed)


def _check_steps(steps: int) -> None:
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps: got {steps!r}; allowed: a positive int")


def rate_code(x_NF: np.ndarray, steps: int, rng: np.random.Generator, *, gain: float = 1.0) -> np.ndarray:
  """``(N, steps, F)`` spikes: feature ``x`` in [0, 1] fires with probability ``gain·x`` at each step."""
  _check_steps(steps)
  if not 0.0 < gain <= 1.0:
    raise ValueError(f"gain: got {gain!r}; allowed: a number in (0, 1]")
  p = np.clip(x_NF, 0.0, 1.0)[:, None, :] * gain
  return (rng.random((x_NF.shape[0], steps, x_NF.shape[1])) < p).astype(np.float32)


def latency_code(x_NF: np.ndarray, steps: int, *, threshold: float = 0.01) -> np.ndarray:
  """``(N, steps, F)`` spikes: one spike at ``round((1 - x)(steps - 1))`` (bright pixels first), none where
  ``x <= threshold``."""
  _check_steps(steps)
  x = np.clip(x_NF, 0.0, 1.0)
  times = np.rint((1.0 - x) * (steps - 1)).astype(np.int64)
  spikes = (np.arange(steps)[None, :, None] == times[:, None, :]) & (x > threshold)[:, None, :]
  return spikes.astype(np.float32)


def _manifold(params, coords_SD, alpha: float) -> np.ndarray:
  """Randman embedding of manifold coordinates ``(S, D)`` -> ``(S, units)`` (module docstring)."""
  amplitude, frequency, phase = params[:, :, 0], params[:, :, 1], params[:, :, 2]  # (units, D, F)
  terms = np.arange(params.shape[-1])
  decay = (terms + 1.0) ** -alpha
  angle = 2.0 * math.pi * (terms * coords_SD[:, None, :, None] * frequency[None] + phase[None])  # (S, U, D, F)
  return np.prod(np.sum(amplitude[None] * decay * np.sin(angle), axis=-1), axis=-1)


def randman(*, classes: int = 10, units: int = 20, steps: int = 50, samples_per_class: int = 200,
            manifold_dim: int = 1, alpha: float = 2.0, test_fraction: float = 0.25, seed: int = 0) -> Split:
  """Randman spike-time classification: ``x`` ``(n, steps, units)`` with one spike per unit (module doc)."""
  _check_steps(steps)
  for name, value in (("classes", classes), ("units", units), ("samples_per_class", samples_per_class),
                      ("manifold_dim", manifold_dim)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}: got {value!r}; allowed: a positive int")
  if not alpha > 0:
    raise ValueError(f"alpha: got {alpha!r}; allowed: a positive number")
  rng = np.random.default_rng(seed)
  num_terms = int(min(math.ceil(1e-3 ** (-1.0 / alpha)), 1000))
  xs, ys = [], []
  for label in range(classes):
    params = rng.uniform(size=(units, manifold_dim, 3, num_terms))
    params[:, :, 0, 0] = 0.0  # no constant offset
    reference = _manifold(params, rng.uniform(size=(4096, manifold_dim)), alpha)
    low, high = reference.min(axis=0), reference.max(axis=0)
    values = _manifold(params, rng.uniform(size=(samples_per_class, manifold_dim)), alpha)
    scaled = np.clip((values - low) / np.maximum(high - low, 1e-12), 0.0, 1.0)
    times = np.rint(scaled * (steps - 1)).astype(np.int64)
    xs.append((np.arange(steps)[None, :, None] == times[:, None, :]).astype(np.float32))
    ys.append(np.full(samples_per_class, label))
  return _split(np.concatenate(xs), np.concatenate(ys), test_fraction, seed)
