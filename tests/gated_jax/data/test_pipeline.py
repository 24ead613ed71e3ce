"""grain pipelines: process sharding independent of the process count, deterministic shuffling, exact
resume from the iterator state, packing fields, and errors."""

import ml_collections
import numpy as np
import pytest

from gated_jax.data import pipeline


def _config(**fields):
  return ml_collections.ConfigDict({"name": "stdlib_bytes", "seq_len": 16, "batch_size": 4,
                                    "corpus_bytes": 20_000, **fields})


def _take(iterator, n):
  return [next(iterator)["inputs"] for _ in range(n)]


def test_processes_read_their_rows_of_the_same_global_batches():
  whole = _take(pipeline.train_iterator(_config(), seed=3), 4)
  halves = [_take(pipeline.train_iterator(_config(), seed=3, process_index=p, process_count=2), 4)
            for p in range(2)]
  for step, batch in enumerate(whole):
    np.testing.assert_array_equal(batch, np.concatenate([halves[0][step], halves[1][step]]))
  evals = [pipeline.eval_batches(_config(), num_batches=2, process_index=p, process_count=2) for p in range(2)]
  for step, batch in enumerate(pipeline.eval_batches(_config(), num_batches=2)):
    np.testing.assert_array_equal(batch["inputs"], np.concatenate([evals[0][step]["inputs"],
                                                                   evals[1][step]["inputs"]]))


def test_shuffle_is_deterministic_per_seed_and_new_every_epoch():
  config = _config(corpus_bytes=2_000)  # a few batches per epoch
  epoch = (2_000 - 1) // 16 // 4
  a = _take(pipeline.train_iterator(config, seed=0), 2 * epoch)
  assert all(np.array_equal(x, y) for x, y in zip(a, _take(pipeline.train_iterator(config, seed=0), 2 * epoch)))
  assert not all(np.array_equal(x, y) for x, y in zip(a, _take(pipeline.train_iterator(config, seed=1), epoch)))
  first, second = np.concatenate(a[:epoch]), np.concatenate(a[epoch:])
  assert not np.array_equal(first, second)
  assert sorted(map(bytes, first)) == sorted(map(bytes, second))  # the same windows, in a new order


@pytest.mark.parametrize("fields", [{}, {"name": "stdlib_documents", "packing": True}])
def test_iterator_state_resumes_exactly(fields):
  iterator = pipeline.train_iterator(_config(**fields), seed=0)
  _take(iterator, 3)
  state = iterator.get_state()
  expected = _take(iterator, 3)
  fresh = pipeline.train_iterator(_config(**fields), seed=0)
  fresh.set_state(state)
  for x, y in zip(_take(fresh, 3), expected):
    np.testing.assert_array_equal(x, y)


def test_packed_rows_restart_positions_at_each_segment():
  batch = next(pipeline.train_iterator(_config(name="stdlib_documents", packing=True, seq_len=64), seed=0))
  seg, pos = batch["segment_ids"], batch["positions"]
  starts = np.concatenate([np.ones((seg.shape[0], 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1) & (seg > 0)
  assert np.all(pos[starts] == 0) and np.all(batch["weights"][seg == 0] == 0)


@pytest.mark.parametrize("fields, process_count, message", [
    ({"batch_size": 5}, 2, r"data.batch_size: got 5; allowed: a positive multiple of the 2 processes"),
    ({"batch_size": 0}, 1, r"data.batch_size: got 0"),
    ({"name": "nope"}, 1, r"nope"),
    ({"batch_size": 4_000}, 1, r"data.batch_size: got 4000; 'stdlib_bytes' has only"),
])
def test_bad_config_raises_value_error(fields, process_count, message):
  with pytest.raises(ValueError, match=message):
    pipeline.train_iterator(_config(**fields), seed=0, process_count=process_count)
