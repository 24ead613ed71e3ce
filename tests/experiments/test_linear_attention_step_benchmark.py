"""``experiments/benchmarks/linear_attention_step.py``: the timed decoding loop runs the real recurrence (its
last state is the sequence op's final state), and a tiny run writes a row per case, batch and implementation."""

from __future__ import annotations

import numpy as np

import pallas_kernels
from experiments.benchmarks import linear_attention_step as step_bench


def test_decode_loop_ends_in_the_sequence_ops_final_state():
  for case in step_bench.CASES:
    loop, (state, (q, k, v, g, beta)) = step_bench.decode_loop(case, "xla", batch=1, tokens=5)
    last, _ = loop(state, (q, k, v, g, beta))
    seq = lambda x: np.swapaxes(np.asarray(x), 0, 1)  # (T, B, ...) -> (B, T, ...)
    common = dict(log_decay=seq(g), initial_state=state, return_final_state=True, implementation="reference")
    if case == "delta_rule":
      _, want = pallas_kernels.delta_rule(seq(q), seq(k), seq(v), seq(beta), **common)
    else:
      _, want = pallas_kernels.linear_attention(seq(q), seq(k), seq(v), **common)
    np.testing.assert_allclose(last, want, rtol=1e-4, atol=1e-4, err_msg=case)


def test_tiny_run_rows_and_markdown():
  result = step_bench.run(batches=(1,), tokens=2, repeats=1, log=lambda line: None)
  assert len(result["rows"]) == len(step_bench.CASES) * len(step_bench.IMPLEMENTATIONS)
  assert result["copy_gbps"] > 0 and all(r["us_per_token"] > 0 for r in result["rows"])
  text = step_bench.to_markdown(result)
  assert "| delta_rule | 1 | xla |" in text and "| 1.0 |" in text  # 1 MiB least traffic at B=1
