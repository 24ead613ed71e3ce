"""``experiments/benchmarks/linear_attention_passes.py`` on a CPU in interpret mode: the passes, fed the way the
harness feeds them, compute the op's output (so each timed pass does the op's work), and the CLI's results."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from experiments.benchmarks import linear_attention_passes as passes_bench
from experiments.benchmarks.linear_attention_fla import case_inputs


@pytest.mark.parametrize("case", ["linear_attention_channel", "delta_rule"])
def test_the_forward_passes_give_the_op_output(case):
  arrays = case_inputs(case, 1, 64, 2, 16, jnp.float32)
  with pallas_kernels.interpret():
    platform, plan, x = passes_bench.kernel_layout(case, "pallas_triton", arrays, 16)
    calls = passes_bench.pass_calls(passes_bench.CASES[case][0], platform, plan, x)
    o_BHTV = calls["output"]()
  args = [arrays[n] for n in ("q", "k", "v", "beta") if n in arrays]
  want = getattr(pallas_kernels, passes_bench.CASES[case][0])(*args, log_decay=arrays["log_decay"],
                                                              implementation="reference")
  np.testing.assert_allclose(np.swapaxes(np.asarray(o_BHTV), 1, 2), want, rtol=1e-4, atol=1e-4)
  assert set(calls) == set(passes_bench.CALLED[passes_bench.CASES[case][0]])


def test_cli_interpret_run_writes_every_pass(tmp_path):
  passes_bench.main(["--interpret", "--implementation", "pallas_tpu", "--seq-len", "32", "--shape", "1,1,16",
                     "--dtype", "float32", "--chunk", "16", "--repeats", "1", "--out", str(tmp_path)])
  result = json.loads((tmp_path / "linear_attention_passes_cpu_interpret.json").read_text())
  assert set(result["cases"]["delta_rule"]["passes_ms"]) == {"prepare", "states", "output", "state_grads", "grads"}
  text = (tmp_path / "linear_attention_passes_cpu_interpret.md").read_text()
  assert "| states | " in text and "| 2 | " in text and "interpret mode" in text


def test_cli_refuses_compiled_kernels_off_their_platform(tmp_path, capsys):
  with pytest.raises(SystemExit):
    passes_bench.main(["--implementation", "pallas_triton", "--out", str(tmp_path)])
  assert "does not run compiled on cpu" in capsys.readouterr().err
