"""``python -m pallas_kernels.selftest``: rows, statuses, exit code and JSON, on one real kernel in interpret mode."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import selftest
from pallas_kernels.linear_attention import selftest_cases


def test_relative_error_is_zero_for_equal_and_inf_for_nan():
  x = {"a": jnp.ones(3), "b": jnp.arange(4.0)}
  assert selftest.relative_error(x, x) == 0.0
  assert selftest.relative_error({"a": jnp.ones(3) * 1.1, "b": jnp.arange(4.0)}, x) == pytest.approx(0.1)
  assert selftest.relative_error(jnp.array([np.nan]), jnp.array([1.0])) == float("inf")


def test_a_wrong_kernel_fails_and_an_unavailable_one_is_skipped(monkeypatch):
  case = selftest_cases.CASES[0]
  broken = selftest.Case(case.op, "broken", lambda q, k, v, d, implementation: case.fn(
      q * (1.0 if implementation == "reference" else 1.5), k, v, d, implementation="xla"), case.make_inputs,
      case.grad_argnums, case.tolerance)
  row = selftest.check(broken, "pallas_triton")
  assert row.status == "FAIL" and row.forward_error > 0.1
  def refuse(*args, implementation):
    raise NotImplementedError("not on this machine")
  skipped = selftest.check(selftest.Case(case.op, "refuses", refuse, case.make_inputs), "pallas_tpu")
  assert skipped.status == "SKIP" and "not on this machine" in skipped.message


def test_main_checks_a_kernel_in_interpret_mode_and_writes_json(tmp_path, capsys):
  out = tmp_path / "rows.json"
  code = selftest.main(["--interpret", "--op", "delta_rule", "--implementation", "pallas_triton",
                        "--json", str(out)])
  assert code == 0
  rows = json.loads(out.read_text())["rows"]
  assert [r["status"] for r in rows] == ["PASS"] and rows[0]["gradient_error"] < 1e-4
  assert "1 PASS" in capsys.readouterr().out


def test_unknown_op_is_a_value_error():
  with pytest.raises(ValueError, match="op: got"):
    selftest.cases(["warp_attention"])
