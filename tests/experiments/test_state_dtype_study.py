"""``experiments/benchmarks/linear_attention_state_dtype.py``: rounding the stored chunk states to bfloat16 adds
error that the study sees, and only there (two chunks, so a stored state is read)."""

from __future__ import annotations

from experiments.benchmarks import linear_attention_state_dtype as study


def test_bf16_stored_states_add_error_within_the_bf16_tolerance():
  float32_states, bf16_states = study.measure(seq=128, heads=2, dim=16, cases=("gla_channel",))
  assert (float32_states["states"], bf16_states["states"]) == ("float32 states", "bfloat16 states")
  for name in ("o", "dq", "dlog_decay"):  # read the stored states: forward output, inter-chunk gradients
    assert bf16_states["errors"][name] > 2 * float32_states["errors"][name] + 1e-4, name
    assert bf16_states["errors"][name] < study.TOLERANCES["values"], name
  # the final state comes from the float32 recurrence, and dv from the state cotangents: untouched
  for name in ("final_state", "dv"):
    assert bf16_states["errors"][name] == float32_states["errors"][name], name
  text = study.render({"device": {"platform": "cpu", "cpu_model": "test", "cpu_count": 2, "jax": "0"},
                       "seq": 128, "heads": 2, "dim": 16, "rows": [float32_states, bf16_states]})
  assert "| gla_channel | bfloat16 states |" in text
