"""Tests for gated_jax.data.modular: the grokking tasks' tables and their random splits."""

import numpy as np
import pytest

from gated_jax.data.modular import modular_arithmetic


@pytest.mark.parametrize("operation, formula", [("add", lambda a, b: (a + b) % 7),
                                                ("multiply", lambda a, b: (a * b) % 7),
                                                ("subtract", lambda a, b: (a - b) % 7)])
def test_labels_and_split_cover_every_pair_once(operation, formula):
  split = modular_arithmetic(operation, 7, 0.4, seed=1)
  assert len(split.train_pairs) == int(0.4 * 49) and len(split.test_pairs) == 49 - int(0.4 * 49)
  pairs = np.concatenate([split.train_pairs, split.test_pairs])
  assert sorted(map(tuple, pairs.tolist())) == [(a, b) for a in range(7) for b in range(7)]
  np.testing.assert_array_equal(split.train_labels, formula(split.train_pairs[:, 0], split.train_pairs[:, 1]))
  np.testing.assert_array_equal(split.test_labels, formula(split.test_pairs[:, 0], split.test_pairs[:, 1]))


def test_split_is_seeded():
  a, b, c = (modular_arithmetic("add", 11, 0.5, seed=s) for s in (3, 3, 4))
  np.testing.assert_array_equal(a.train_pairs, b.train_pairs)
  assert not np.array_equal(a.train_pairs, c.train_pairs)


@pytest.mark.parametrize("kwargs, match", [(dict(operation="divide"), "operation: got 'divide'"),
                                           (dict(modulus=1), "modulus: got 1"),
                                           (dict(train_fraction=1.0), "train_fraction: got 1.0"),
                                           (dict(modulus=3, train_fraction=0.05), "empty split")])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    modular_arithmetic(**kwargs)
