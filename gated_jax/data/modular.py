"""Modular arithmetic, the grokking tasks (Power et al. 2022, arXiv 2201.02177; Prieto et al., arXiv 2501.04697).

Every pair ``(a, b)`` with ``a, b in [0, p)`` is one example labelled ``a ∘ b mod p``; a seeded permutation of
the ``p²`` pairs puts the first ``floor(train_fraction · p²)`` in the training split and the rest in the test
split, as Prieto et al.'s code (``random_split`` of the full table; their default ``p = 113``, fraction 0.3,
0.4 in their Figures 1, 4 and 6). The model sees the two operands (in their MLP as two concatenated one-hot
vectors of size ``p``). Small enough to train full-batch, so this is a numpy split rather than a grain source.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

OPERATIONS = {
    "add": lambda a, b, p: (a + b) % p,
    "subtract": lambda a, b, p: (a - b) % p,
    "multiply": lambda a, b, p: (a * b) % p,
}


@dataclasses.dataclass(frozen=True)
class ModularSplit:
  """Operand pairs ``(N, 2)`` int32 and labels ``(N,)`` int32 of both splits."""
  modulus: int
  train_pairs: np.ndarray
  train_labels: np.ndarray
  test_pairs: np.ndarray
  test_labels: np.ndarray


def modular_arithmetic(operation: str = "add", modulus: int = 113, train_fraction: float = 0.4,
                       seed: int = 0) -> ModularSplit:
  """The ``operation`` table mod ``modulus`` split at random into train and test (module docstring)."""
  if operation not in OPERATIONS:
    raise ValueError(f"operation: got {operation!r}; allowed: {', '.join(OPERATIONS)}")
  if isinstance(modulus, bool) or not isinstance(modulus, int) or modulus < 2:
    raise ValueError(f"modulus: got {modulus!r}; allowed: an int >= 2")
  if isinstance(train_fraction, bool) or not isinstance(train_fraction, (int, float)) or not (
      0 < train_fraction < 1 and math.isfinite(train_fraction)):
    raise ValueError(f"train_fraction: got {train_fraction!r}; allowed: a float in (0, 1)")
  a, b = (x.ravel() for x in np.meshgrid(np.arange(modulus), np.arange(modulus), indexing="ij"))
  pairs = np.stack([a, b], axis=1).astype(np.int32)
  labels = OPERATIONS[operation](a, b, modulus).astype(np.int32)
  order = np.random.default_rng(seed).permutation(modulus * modulus)
  num_train = int(train_fraction * modulus * modulus)
  if not 0 < num_train < modulus * modulus:
    raise ValueError(f"train_fraction: got {train_fraction!r}, which leaves an empty split of the {modulus ** 2} "
                     "pairs; allowed: a fraction that keeps both splits non-empty")
  train, test = order[:num_train], order[num_train:]
  return ModularSplit(modulus, pairs[train], labels[train], pairs[test], labels[test])
