"""``experiments/benchmarks/linear_attention_fla.py`` on a CPU: inputs, the agreement metric, the rows and the
table, with fla either missing or stood in for by our ``reference`` (fla itself runs only on a GPU)."""

from __future__ import annotations

from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.benchmarks import linear_attention_fla as fla_bench
from experiments.benchmarks.machine import time_call

SHAPE = dict(batch=1, heads=2, dim=16)


def test_case_inputs_dtypes_and_shapes():
  arrays = fla_bench.case_inputs("delta_rule", 2, 24, 3, 16, jnp.bfloat16)
  assert {n: (x.shape, x.dtype.name) for n, x in arrays.items()} == {
      "q": ((2, 24, 3, 16), "bfloat16"), "k": ((2, 24, 3, 16), "bfloat16"), "v": ((2, 24, 3, 16), "bfloat16"),
      "beta": ((2, 24, 3), "bfloat16"), "log_decay": ((2, 24, 3), "float32"), "do": ((2, 24, 3, 16), "bfloat16")}
  channel = fla_bench.case_inputs("linear_attention_channel", 1, 24, 2, 16, jnp.float32)
  assert channel["log_decay"].shape == (1, 24, 2, 16) and float(channel["log_decay"].max()) <= 0


def test_relative_rms_is_the_worst_tensor():
  base = {"a": np.ones((4, 4), np.float32), "b": np.full((4, 4), 2.0, np.float32)}
  moved = {"a": base["a"] * 1.01, "b": base["b"] * 1.1}
  assert fla_bench.relative_rms(moved, base) == pytest.approx(0.1, rel=1e-5)
  assert fla_bench.relative_rms(base["a"], base["a"]) == 0.0


def test_without_fla_ours_are_timed_and_the_reason_is_shown():
  with mock.patch.object(fla_bench, "load_fla", side_effect=ImportError("no module named fla")):
    rows = fla_bench.bench_case("linear_attention_channel", 40, SHAPE, jnp.float32, ("xla",), repeats=1)
  assert [r["implementation"] for r in rows] == ["fla", "xla"]
  assert rows[0]["status"] == "unavailable: no module named fla"
  assert rows[1]["status"] == "ok" and rows[1]["fwd_bwd_tflops"] > 0 and "rel_rms_vs_fla" not in rows[1]
  text = fla_bench.to_markdown({"device": {"platform": "cpu", "device_kind": "cpu", "jax": "0"}, "repeats": 1,
                                "rows": rows})
  assert "| 40 | fla | unavailable: no module named fla |" in text
  assert "| n/a | n/a | - | - |" in text


@pytest.mark.parametrize("case", list(fla_bench.FLA_OPS))
def test_agreement_and_speed_against_a_stand_in(case):
  """With our ``reference`` standing in for fla, ``xla`` agrees to float32 rounding (forward and every input
  gradient), so the harness compares the same computation on the same inputs."""
  stand_in = lambda case, arrays, device: fla_bench.ours(case, "reference", arrays)
  with mock.patch.object(fla_bench, "fla", stand_in), mock.patch.object(fla_bench, "time_torch", time_call):
    result = {"device": {"platform": "cpu", "device_kind": "cpu", "jax": "0"}, "repeats": 1,
              "rows": fla_bench.bench_case(case, 40, SHAPE, jnp.float32, ("xla",), repeats=1)}
  fla_row, xla_row = result["rows"]
  assert fla_row["status"] == xla_row["status"] == "ok"
  assert max(xla_row["rel_rms_vs_fla"].values()) < 1e-5
  speed = fla_row["fwd_bwd_ms"] / xla_row["fwd_bwd_ms"]
  assert f"| {speed:.2f}x |" in fla_bench.to_markdown(result)


@pytest.mark.parametrize("argv,message", [(["--seq-lens", "0,2048"], "comma-separated positive ints"),
                                          (["--repeats", "x"], "comma-separated positive ints"),
                                          (["--shape", "4,8"], "--shape: expected B,H,D")])
def test_cli_rejects_bad_arguments(argv, message, capsys, tmp_path):
  with pytest.raises(SystemExit):
    fla_bench.main(argv + ["--out", str(tmp_path)])
  assert message in capsys.readouterr().err
  assert not list(tmp_path.iterdir())  # nothing measured, nothing written
