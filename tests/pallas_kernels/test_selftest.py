"""``python -m pallas_kernels.selftest``: rows, statuses, exit code and JSON, on one real kernel in interpret mode."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import grouped_matmul, selftest


def test_relative_error_is_zero_for_equal_and_inf_for_nan():
  x = {"a": jnp.ones(3), "b": jnp.arange(4.0)}
  assert selftest.relative_error(x, x) == 0.0
  assert selftest.relative_error({"a": jnp.ones(3) * 1.1, "b": jnp.arange(4.0)}, x) == pytest.approx(0.1)
  assert selftest.relative_error(jnp.array([np.nan]), jnp.array([1.0])) == float("inf")


def _tiny_gmm_inputs(key):
  kl, kr = jax.random.split(key)
  return jax.random.normal(kl, (16, 8)), jax.random.normal(kr, (3, 8, 4)), jnp.array([5, 0, 11], jnp.int32)


def test_a_wrong_kernel_fails_and_an_unavailable_one_is_skipped():
  def wrong(lhs, rhs, sizes, implementation):  # the "kernel" scales its input: a 50% error
    return grouped_matmul(lhs * (1.0 if implementation == "reference" else 1.5), rhs, sizes, implementation="xla")
  row = selftest.check(selftest.Case("grouped_matmul", "broken", wrong, _tiny_gmm_inputs, (0, 1), 1e-4),
                       "pallas_triton")
  assert row.status == "FAIL" and row.forward_error > 0.1
  def refuse(*args, implementation):
    raise NotImplementedError("not on this machine")
  skipped = selftest.check(selftest.Case("grouped_matmul", "refuses", refuse, _tiny_gmm_inputs), "pallas_tpu")
  assert skipped.status == "SKIP" and "not on this machine" in skipped.message


def test_main_checks_a_kernel_in_interpret_mode_and_writes_json(tmp_path, capsys, monkeypatch):
  """The CLI on a real kernel (the Triton grouped matmul in interpret mode) with one tiny case, so the test costs
  seconds; the full cases run on hardware."""
  def gmm(lhs, rhs, sizes, implementation):
    return grouped_matmul(lhs, rhs, sizes, implementation=implementation)
  tiny = selftest.Case("grouped_matmul", "tiny", gmm, _tiny_gmm_inputs, (0, 1), 1e-4)
  monkeypatch.setattr(selftest, "cases", lambda ops=None: (tiny,) if ops == ["grouped_matmul"] else ())
  out = tmp_path / "rows.json"
  code = selftest.main(["--interpret", "--op", "grouped_matmul", "--implementation", "pallas_triton",
                        "--json", str(out)])
  assert code == 0
  rows = json.loads(out.read_text())["rows"]
  assert [(r["implementation"], r["status"]) for r in rows] == [("pallas_triton", "PASS")]
  assert rows[0]["gradient_error"] < 1e-4
  assert "1 PASS" in capsys.readouterr().out


def test_unknown_op_is_a_value_error():
  with pytest.raises(ValueError, match="op: got"):
    selftest.cases(["warp_attention"])


def test_json_keeps_the_rows_checked_before_a_run_is_cut_short(tmp_path, monkeypatch):
  """The JSON is rewritten after every row, so a run stopped by a time limit (a signal) keeps what it checked."""
  def gmm(lhs, rhs, sizes, implementation):
    return grouped_matmul(lhs, rhs, sizes, implementation=implementation)
  first, second = (selftest.Case("grouped_matmul", name, gmm, _tiny_gmm_inputs, (0, 1), 1e-4)
                   for name in ("tiny", "cut"))
  monkeypatch.setattr(selftest, "cases", lambda ops=None: (first, second))
  real_check = selftest.check

  def check(case, implementation, **kwargs):
    if case.name == "cut":
      raise KeyboardInterrupt  # what a time limit's signal does to the run
    return real_check(case, implementation, **kwargs)

  monkeypatch.setattr(selftest, "check", check)
  out = tmp_path / "rows.json"
  with pytest.raises(KeyboardInterrupt):
    selftest.main(["--interpret", "--implementation", "pallas_triton", "--json", str(out)])
  rows = json.loads(out.read_text())["rows"]
  assert [(r["case"], r["status"]) for r in rows] == [("tiny", "PASS")]
