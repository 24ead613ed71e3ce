"""The training loop on one device: accumulation, mixed precision, packing, metrics files, the NaN guard,
checkpoint errors and config validation (issue #4)."""

import json
import pathlib
import shutil
import sys

import numpy as np
import pytest

from gated_jax.data import pipeline
from gated_jax.train import CheckpointError, train

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _tiny  # noqa: E402  pylint: disable=wrong-import-position


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("baseline")
  return workdir, train(_tiny.tiny_config(train__tensorboard=True), workdir=workdir)


def test_writes_metrics_tensorboard_and_checkpoints(baseline):
  workdir, result = baseline
  entries = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [e["step"] for e in entries if "loss" in e] == [1, 2, 3, 4, 5, 6]
  assert entries[-1]["eval_loss"] == pytest.approx(result.eval["loss"])
  rates = [e["tokens_per_s"] for e in entries if "tokens_per_s" in e]
  assert len(rates) == 5 and min(rates) > 0  # step 1 (compilation) has none
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
  assert result.history[-1]["loss"] < result.history[0]["loss"]
  assert result.num_params == sum(np.size(x) for x in __import__("jax").tree.leaves(result.params))


def test_finished_run_restarts_as_a_no_op(baseline):
  workdir, result = baseline
  again = train(_tiny.tiny_config(train__tensorboard=True), workdir=workdir)
  assert again.resumed_from == 6 and again.history == []
  assert again.eval["loss"] == pytest.approx(result.eval["loss"], rel=1e-6)


def test_gradient_accumulation_matches_the_full_batch(baseline):
  accumulated = train(_tiny.tiny_config(train__grad_accum=4))
  np.testing.assert_allclose(_tiny.losses(accumulated.history), _tiny.losses(baseline[1].history), rtol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32(baseline):
  result = train(_tiny.tiny_config(train__compute_dtype="bfloat16"))
  assert all(x.dtype == np.float32 for x in __import__("jax").tree.leaves(result.params))
  np.testing.assert_allclose(_tiny.losses(result.history), _tiny.losses(baseline[1].history), rtol=2e-2)


def test_packed_documents_carry_segment_ids_and_train():
  config = _tiny.tiny_config(data__name="stdlib_documents", data__packing=True)
  batch = next(pipeline.train_iterator(config.data, seed=0))
  assert set(batch) == {"inputs", "targets", "weights", "segment_ids", "positions"}
  assert np.all(batch["weights"][batch["segment_ids"] == 0] == 0)
  assert np.all(batch["positions"][batch["segment_ids"] > 0][:1] == 0)
  result = train(config)
  assert np.isfinite(result.eval["loss"]) and result.history[-1]["loss"] < result.history[0]["loss"]


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  original = pipeline.train_dataset

  def poisoned(*args, **kwargs):  # batches 5, 6, ... get NaN weights, so the loss of step 5 is NaN
    served = []

    def poison(batch):
      served.append(1)
      return {**batch, "weights": np.full_like(batch["weights"], np.nan)} if len(served) >= 5 else batch
    return original(*args, **kwargs).map(poison)
  monkeypatch.setattr(pipeline, "train_dataset", poisoned)
  with pytest.raises(FloatingPointError, match=r"step 5 .*Last good checkpoint: step 4"):
    train(_tiny.tiny_config(train__steps=8, train__checkpoint_every=2), workdir=tmp_path)
  monkeypatch.setattr(pipeline, "train_dataset", original)
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 4]
  resumed = train(_tiny.tiny_config(train__steps=8, train__checkpoint_every=2), workdir=tmp_path)
  assert resumed.resumed_from == 4 and all(np.isfinite(h["loss"]) for h in resumed.history)


def test_incompatible_checkpoint_is_an_error(baseline, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(baseline[0] / "checkpoints", workdir / "checkpoints")
  with pytest.raises(CheckpointError, match=r"model.d_model: checkpoint 32, config 48"):
    train(_tiny.tiny_config(model__d_model=48), workdir=workdir)


def test_corrupt_checkpoint_is_an_error_not_a_fresh_start(baseline, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(baseline[0] / "checkpoints", workdir / "checkpoints")
  for path in (workdir / "checkpoints" / "6" / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 0:
      path.write_bytes(b"garbage")
  with pytest.raises(CheckpointError, match=r"checkpoints/6: cannot restore"):
    train(_tiny.tiny_config(), workdir=workdir)


@pytest.mark.parametrize("override, message", [
    ({"train__mode": "shard"}, r"train.mode: got 'shard'"),
    ({"train__grad_accum": 3}, r"train.grad_accum: got 3"),
    ({"train__steps": 0}, r"train.steps: got 0"),
    ({"mesh__data": 3}, r"mesh: got .*'data': 3"),
    ({"train__compute_dtype": "float16"}, r"train.compute_dtype: got 'float16'"),
    ({"optim__schedule": "step"}, r"optim.schedule: got 'step'"),
    ({"data__batch_size": 100_000}, r"data.batch_size: got 100000"),
])
def test_bad_config_raises_value_error_naming_the_field(override, message):
  with pytest.raises(ValueError, match=message):
    train(_tiny.tiny_config(**override))
