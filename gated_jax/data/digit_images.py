"""scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``: 1,797 grey 8x8 images of the
digits 0-9, intensities 0-16) as image arrays, with one fixed stratified train/test split and class-balanced
subsets of the training split (as ConViT's ``--sampling_ratio``: the same fraction of every class).
No download: the data ship with scikit-learn.
"""

from __future__ import annotations

import functools

import numpy as np

TEST_FRACTION = 0.2
SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """``(train_images, train_labels, test_images, test_labels)``: images ``(N, 8, 8, 1)`` float32 in ``[0, 1]``,
  labels int32; 20% of every class is held out (fixed seed)."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  from sklearn.model_selection import train_test_split  # pylint: disable=import-outside-toplevel

  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  train_x, test_x, train_y, test_y = train_test_split(images, labels, test_size=TEST_FRACTION,
                                                      stratify=labels, random_state=SPLIT_SEED)
  return train_x, train_y, test_x, test_y


def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices of ``round(fraction * n_c)`` (at least one) random examples of every class ``c``."""
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
    raise ValueError(f"fraction: got {fraction!r}; allowed: a number in (0, 1]")
  rng = np.random.default_rng(seed)
  chosen = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    chosen.append(rng.choice(members, size=max(1, round(fraction * len(members))), replace=False))
  return np.sort(np.concatenate(chosen))
