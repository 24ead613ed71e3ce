"""Tests for the Zoology MQAR generator (gated_jax/data/mqar.py)."""

import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from gated_jax.data import mqar


def _check_example(config, inputs, targets, weights):
  """Asserts Zoology's structure on one example; returns the query gaps."""
  kv, half, ctx = config.num_kv_pairs, config.vocab_size // 2, config.context_len
  keys, values = inputs[0:2 * kv:2], inputs[1:2 * kv:2]
  assert len(set(keys.tolist())) == kv and len(set(values.tolist())) == kv
  assert np.all((keys >= 1) & (keys < half)) and np.all((values >= half) & (values < config.vocab_size))
  np.testing.assert_array_equal(inputs[:ctx], np.tile(inputs[:2 * kv], config.num_passes))
  query_pos = np.flatnonzero(weights)
  assert set(np.unique(weights).tolist()) <= {0.0, 1.0}
  assert len(query_pos) == kv and np.all(query_pos >= ctx) and np.all((query_pos - ctx) % 2 == 0)
  # Every key is queried exactly once and the target there is its paired value.
  np.testing.assert_array_equal(np.sort(inputs[query_pos]), np.sort(keys))
  pair = dict(zip(keys.tolist(), values.tolist()))
  np.testing.assert_array_equal(targets[query_pos], [pair[k] for k in inputs[query_pos].tolist()])
  # Unscored targets are the next input token (plain next-token prediction).
  unscored = np.flatnonzero(weights[:-1] == 0)
  np.testing.assert_array_equal(targets[unscored], inputs[unscored + 1])
  if not config.random_non_queries:
    filler = np.setdiff1d(np.arange(ctx, config.seq_len), query_pos)
    assert np.all(inputs[filler] == 0)
  return (query_pos - ctx) // 2


@settings(max_examples=8, deadline=None)
@given(kv=st.integers(1, 8), extra_slots=st.integers(0, 20), passes=st.integers(1, 2),
       vocab_extra=st.integers(1, 300), random_fill=st.booleans(), seed=st.integers(0, 2**31))
def test_structure(kv, extra_slots, passes, vocab_extra, random_fill, seed):
  seq_len = 2 * kv * passes + 2 * kv + 2 * extra_slots
  config = mqar.MQARConfig(seq_len=seq_len, num_kv_pairs=kv, vocab_size=seq_len + vocab_extra,
                           random_non_queries=random_fill, num_passes=passes)
  data = mqar.generate(config, 16, seed)
  assert data["inputs"].dtype == np.int32 and data["targets"].dtype == np.int32
  assert data["weights"].dtype == np.float32 and data["inputs"].shape == (16, seq_len)
  for row in range(16):
    _check_example(config, data["inputs"][row], data["targets"][row], data["weights"][row])


def test_large_vocab_uniform_path():
  config = mqar.MQARConfig(seq_len=256, num_kv_pairs=16)  # vocab 8192: the draw-and-dedupe sampler
  data = mqar.generate(config, 64, 3)
  for row in range(64):
    _check_example(config, data["inputs"][row], data["targets"][row], data["weights"][row])
  # Keys spread over the whole key range (not stuck in a corner).
  keys = data["inputs"][:, 0:32:2]
  assert keys.min() < 1000 and keys.max() > 3000


def test_deterministic_by_seed():
  config = mqar.MQARConfig(seq_len=64, num_kv_pairs=4)
  a, b, c = (mqar.generate(config, 50, s) for s in (7, 7, 8))
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])
  assert not np.array_equal(a["inputs"], c["inputs"])


def test_power_law_gaps_are_skewed_small():
  config = mqar.MQARConfig(seq_len=256, num_kv_pairs=4)  # 124 gap slots
  data = mqar.generate(config, 2000, 0)
  gaps = (np.nonzero(data["weights"])[1] - config.context_len) // 2
  slots = (config.seq_len - config.context_len) // 2
  assert np.mean(gaps < slots // 4) > 0.5  # uniform would give 0.25
  assert np.median(gaps) < slots / 4
  # Zoology's p_i ∝ i^(a-1): the first slot is drawn most often.
  counts = np.bincount(gaps, minlength=slots)
  assert counts[0] == counts.max()


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_len=63), "seq_len"),
    (dict(seq_len=64, vocab_size=64), "vocab_size"),
    (dict(seq_len=64, num_kv_pairs=17), "num_kv_pairs"),
    (dict(seq_len=64, num_kv_pairs=8, num_passes=4), "num_kv_pairs"),
    (dict(num_kv_pairs=0), "num_kv_pairs"),
    (dict(power_a=0.0), "power_a"),
])
def test_constraints_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mqar.MQARConfig(**kwargs)


def test_make_source_splits():
  data_config = ml_collections.ConfigDict(dict(name="mqar", seq_len=32, num_kv_pairs=2, vocab_size=64,
                                               num_train_examples=20, num_eval_examples=6, seed=1))
  train, valid = mqar.make_source(data_config, "train"), mqar.make_source(data_config, "validation")
  assert len(train) == 20 and len(valid) == 6
  example = train[3]
  assert set(example) == {"inputs", "targets", "weights"}
  assert example["inputs"].shape == (32,) and example["weights"].dtype == np.float32
  assert not np.array_equal(train[0]["inputs"], valid[0]["inputs"])
  np.testing.assert_array_equal(mqar.make_source(data_config, "train")[3]["inputs"], example["inputs"])
  with pytest.raises(ValueError, match="split"):
    mqar.make_source(data_config, "bogus")


def test_registered_in_sources():
  from gated_jax.data import SOURCES
  assert SOURCES.get("mqar") is mqar.make_source
