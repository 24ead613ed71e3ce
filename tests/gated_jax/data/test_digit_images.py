"""The digits split and its class-balanced subsets."""

from __future__ import annotations

import numpy as np
import pytest

from gated_jax.data import digit_images


def test_split_and_balanced_subsets():
  train_x, train_y, test_x, test_y = digit_images.split()
  assert train_x.shape == (1437, 8, 8, 1) and test_x.shape == (360, 8, 8, 1)
  assert 0.0 <= train_x.min() and train_x.max() <= 1.0 and train_x.dtype == np.float32
  assert np.all(np.abs(np.bincount(test_y) - 36) <= 1)  # stratified: 20% of every class
  subset = digit_images.balanced_subset(train_y, 0.1, seed=0)
  counts = np.bincount(train_y[subset], minlength=10)
  np.testing.assert_array_equal(counts, np.round(0.1 * np.bincount(train_y)).astype(int))
  assert len(np.unique(subset)) == len(subset)
  assert not np.array_equal(digit_images.balanced_subset(train_y, 0.1, seed=1), subset)
  np.testing.assert_array_equal(digit_images.balanced_subset(train_y, 1.0, seed=5), np.arange(len(train_y)))


@pytest.mark.parametrize("fraction", (0.0, 1.5, True))
def test_bad_fraction(fraction):
  with pytest.raises(ValueError, match="fraction: got"):
    digit_images.balanced_subset(np.zeros(10, np.int32), fraction, seed=0)
