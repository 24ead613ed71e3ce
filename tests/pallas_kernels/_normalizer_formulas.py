"""NumPy (float64) building blocks of the normalizer formulas the attention tests compare against."""

import numpy as np


def softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def bisect(total, lo, hi):
  """tau with total(tau) == 1 for a decreasing total (an algorithm independent of the sort-based one)."""
  for _ in range(200):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if total(mid) > 1 else (lo, mid)
  return (lo + hi) / 2
