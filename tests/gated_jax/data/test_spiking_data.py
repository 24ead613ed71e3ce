"""Offline spiking data: digits and their rate / latency codes, and the Randman generator."""

from __future__ import annotations

import numpy as np
import pytest

from gated_jax.data import spiking


def test_digits_are_scaled_and_split_deterministically():
  split = spiking.digits()
  assert split.x_train.shape == (1348, 64) and split.x_test.shape == (449, 64) and split.num_classes == 10
  assert split.x_train.min() == 0.0 and split.x_train.max() == 1.0 and split.x_train.dtype == np.float32
  np.testing.assert_array_equal(spiking.digits().y_test, split.y_test)
  assert not np.array_equal(spiking.digits(seed=1).y_test, split.y_test)


def test_rate_code_fires_with_probability_gain_times_intensity():
  x = np.array([[0.0, 0.25, 1.0]], np.float32)
  spikes = spiking.rate_code(x, 4000, np.random.default_rng(0), gain=0.5)
  assert spikes.shape == (1, 4000, 3) and set(np.unique(spikes)) <= {0.0, 1.0}
  np.testing.assert_allclose(spikes.mean(axis=1)[0], [0.0, 0.125, 0.5], atol=0.02)


def test_latency_code_puts_one_spike_at_the_intensity_time():
  x = np.array([[1.0, 0.5, 0.0, 0.005]], np.float32)
  spikes = spiking.latency_code(x, 9)
  np.testing.assert_array_equal(spikes[0].sum(axis=0), [1, 1, 0, 0])  # nothing at or below the threshold
  np.testing.assert_array_equal(np.argmax(spikes[0], axis=0)[:2], [0, 4])  # round((1 - x) * 8)


def test_randman_codes_classes_in_spike_times_only():
  split = spiking.randman(classes=4, units=12, steps=30, samples_per_class=60, seed=3)
  assert split.x_train.shape == (180, 30, 12) and split.num_classes == 4
  np.testing.assert_array_equal(split.x_train.sum(axis=1), 1.0)  # every unit fires exactly once
  times = lambda x: np.argmax(x, axis=1).astype(np.float64)
  means = np.stack([times(split.x_train)[split.y_train == c].mean(0) for c in range(4)])
  nearest = np.argmin(((times(split.x_test)[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert np.mean(nearest == split.y_test) > 0.6  # chance is 0.25
  again = spiking.randman(classes=4, units=12, steps=30, samples_per_class=60, seed=3)
  np.testing.assert_array_equal(again.x_test, split.x_test)


@pytest.mark.parametrize("call,match", [
    (lambda: spiking.rate_code(np.ones((1, 2)), 0, np.random.default_rng(0)), "steps: got 0"),
    (lambda: spiking.rate_code(np.ones((1, 2)), 3, np.random.default_rng(0), gain=1.5), "gain: got 1.5"),
    (lambda: spiking.randman(classes=0), "classes: got 0"),
    (lambda: spiking.randman(alpha=0.0), "alpha: got 0.0"),
    (lambda: spiking.digits(test_fraction=1.0), "test_fraction: got 1.0"),
])
def test_bad_arguments_raise_value_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()
