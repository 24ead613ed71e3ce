"""``experiments/benchmarks/linear_attention_cpu_limits.py``: each forced per-channel form computes the same
forward+backward as the shipped choice on GLA-like gates (so the timed programs do the same work), and the
markdown has every row."""

from __future__ import annotations

from unittest import mock

import jax
import numpy as np

from experiments.benchmarks import linear_attention_cpu_limits as limits
from experiments.benchmarks.linear_attention import loss_fn, make_inputs
from pallas_kernels.linear_attention import xla as linear_xla


def test_forced_forms_match_the_shipped_choice():
  inputs = make_inputs("linear_attention_channel", 1, 96, 2, 16)
  value_and_grad = lambda: jax.jit(jax.value_and_grad(loss_fn("linear_attention", "xla")))(inputs)
  shipped = value_and_grad()
  for form in ("mild", "exact"):
    with mock.patch.object(linear_xla, "_with_form", limits._only(form)):  # pylint: disable=protected-access
      forced = value_and_grad()
    for got, want in zip(jax.tree.leaves(forced), jax.tree.leaves(shipped)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(want))), err_msg=form)


def test_markdown_rows():
  result = {"device": {"platform": "cpu", "cpu_model": "test", "cpu_count": 2, "jax": "0"}, "repeats": 3,
            "notes": ["idle"], "dot_shapes": [(512, 64, 128, 128)], "dots": [dict(gflops=29.5, fresh_mib=32.0)],
            "forms": {"H2_D32": {"mild form alone": [6.8, 6.4]}},
            "chunks": {"H2_D32": {"delta_rule": {"32": [14.1, 14.4], "64": [17.6, 18.0]}}},
            "groups": {"H8_D128": {"delta_rule": {"one group": [
                dict(ms=520.0, fresh_mib=480.0, sys_s=0.29, user_s=0.45),
                dict(ms=530.0, fresh_mib=470.0, sys_s=0.3, user_s=0.44)]}}}}
  text = limits.render(result)
  assert "| 512 | 64 x 128 x 128 | 29.5 | 32 |" in text and "| H2_D32 | mild form alone | 6.8 / 6.4 |" in text
  assert "| H2_D32 | delta_rule | 32 | 14.1 / 14.4 |" in text
  row = "| H8_D128 | delta_rule | one group | 520.0 / 530.0 | 480 / 470 | 0.290 / 0.300 | 0.450 / 0.440 |"
  assert row in text
  assert "- Note: idle" in text
