"""Smoke test of experiments/benchmarks/train_step.py: tiny shapes, two measured steps, one process."""

from __future__ import annotations

import pytest

from experiments.benchmarks import train_step

TINY = dict(d_model=32, num_layers=1, num_heads=2, mlp_hidden_dim=64, seq_len=32, batch_size=4,
            compute_dtype="float32")


@pytest.fixture(scope="module")
def record():
  case = train_step.Case("tiny", TINY, "gated_g1", "single", log_every=1, intervals=2, peak_flops=1e10)
  return train_step.run_case(case)


def test_record_has_positive_timings_and_every_key(record):
  assert set(record) == set(train_step.RECORD_KEYS)
  assert record["status"] == "ok"
  assert record["step_ms"] > 0 and record["tokens_per_s"] > 0 and record["mfu"] > 0
  assert len(record["step_ms_intervals"]) == 2  # the compile interval is dropped
  tokens_per_step = TINY["batch_size"] * TINY["seq_len"]
  assert record["step_ms"] == pytest.approx(1e3 * tokens_per_step / record["tokens_per_s"])
  assert record["mfu"] == pytest.approx(record["flops_per_token"] * record["tokens_per_s"] / 1e10)


def test_markdown_names_device_ratio_and_missing_cases(record):
  info = {"platform": "cpu", "device_kind": "cpu", "num_devices": 1, "cpu_model": "X", "cpu_count": 2, "jax": "0"}
  result = {"device": info, "peak": {"flops": 1e10, "per": "host", "source": "measured"}, "shapes": "cpu",
            "log_every": 1, "intervals": 2, "command": "cmd", "records": [{**record, "variant": "softmax"}, record],
            "planned": [["tiny", "softmax", "single"], ["tiny", "gated_g1", "single"], ["tiny", "gla", "pmap8"]]}
  md = train_step.to_markdown(result)
  assert "CPU X, 2 cores" in md and "simulated" in md
  assert "| softmax | single |" in md and "| 1.00 |" in md
  assert "Not run (the sweep was stopped before them): tiny gla pmap8." in md


def test_bad_choice_raises():
  with pytest.raises(ValueError, match="--mixers"):
    train_step.main(["--mixers", "mamba"])
