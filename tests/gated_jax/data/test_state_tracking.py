"""State-tracking task data: BOS, running sums mod m as targets, weights, determinism, bad arguments."""

from __future__ import annotations

import numpy as np
import pytest

from gated_jax.data import state_tracking


@pytest.mark.parametrize("task, modulus", [("parity", 2), ("modular_sum", 5)])
def test_running_sum_targets(task, modulus):
  data = state_tracking.generate(task, 6, 20, seed=3, modulus=modulus)
  inputs, targets, weights = data["inputs"], data["targets"], data["weights"]
  assert inputs.shape == targets.shape == weights.shape == (6, 21) and inputs.dtype == np.int32
  assert np.all(inputs[:, 0] == modulus) and np.all(inputs[:, 1:] < modulus)  # BOS, then tokens of [0, m)
  for row in range(6):
    running = 0
    for t in range(1, 21):
      running = (running + inputs[row, t]) % modulus
      assert targets[row, t] == running
  assert np.all(weights[:, 0] == 0) and np.all(weights[:, 1:] == 1)
  assert state_tracking.vocab_size(task, modulus) == modulus + 1
  np.testing.assert_array_equal(state_tracking.generate(task, 6, 20, seed=3, modulus=modulus)["inputs"], inputs)
  assert not np.array_equal(state_tracking.generate(task, 6, 20, seed=4, modulus=modulus)["inputs"], inputs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(task="majority"), "task: got 'majority'"),
    (dict(task="modular_sum", modulus=1), "modulus: got 1"),
    (dict(length=0), "length: got 0"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    state_tracking.generate(**{"task": "parity", "num_examples": 2, "length": 4, "seed": 0, **kwargs})
