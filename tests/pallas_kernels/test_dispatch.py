"""The dispatch layer: auto order, explicit names and sequences, fall-through, overrides, interpret mode."""

import os
import subprocess
import sys

import pytest

from pallas_kernels import dispatch


def _op_with(tmp_module_name: str) -> dispatch.Op:
  """An op whose implementations live in this test module: ``ok_*`` return their name, ``nie`` refuses."""
  op = dispatch.Op("toy")
  op.register("reference", f"{tmp_module_name}:ok_reference")
  op.register("xla", f"{tmp_module_name}:ok_xla", auto_priority=100)
  op.register("pallas_tpu", f"{tmp_module_name}:ok_pallas", platforms=("tpu",), auto_priority=0, pallas=True,
              validated_on=("tpu",))
  op.register("pallas_triton", f"{tmp_module_name}:refuses", platforms=("gpu",), auto_priority=1, pallas=True,
              validated_on=("gpu",))
  op.register("triton", f"{tmp_module_name}:ok_xla", platforms=("gpu",), auto_priority=2)
  op.register("parallel", "module_that_does_not_exist_anywhere:fn")
  return op


def ok_reference(x):
  return ("reference", x)


def ok_xla(x):
  return ("xla", x)


def ok_pallas(x):
  return ("pallas_tpu", dispatch.interpret_mode(), x)


def refuses(x):
  raise NotImplementedError("this toy kernel refuses every call")


@pytest.fixture
def op():
  return _op_with(__name__)


def test_auto_on_cpu_ends_in_xla_then_reference(op):
  assert op.auto_order("cpu") == ("xla", "reference")
  assert op.auto_order("tpu") == ("pallas_tpu", "xla", "reference")
  assert op.auto_order("gpu") == ("pallas_triton", "triton", "xla", "reference")
  assert op(1) == ("xla", 1)


def test_unvalidated_pallas_kernel_is_opt_in_only():
  op = dispatch.Op("toy_unvalidated")
  op.register("xla", f"{__name__}:ok_xla", auto_priority=100)
  op.register("pallas_tpu", f"{__name__}:ok_pallas", platforms=("tpu",), auto_priority=0, pallas=True)
  assert op.auto_order("tpu") == ("xla",)
  assert op.validated() == {"pallas_tpu": ()}
  with dispatch.interpret():   # interpret mode makes it runnable by name, never auto-selected
    assert op.auto_order("cpu") == ("xla",)
    assert op(1, implementation="pallas_tpu") == ("pallas_tpu", True, 1)
  with pytest.raises(ValueError, match="only Pallas kernels"):
    op.register("reference", f"{__name__}:ok_reference", validated_on=("cpu",))


def test_the_library_ops_auto_select_no_unvalidated_kernel():
  for op in dispatch.registered_ops():
    for backend in ("cpu", "gpu", "tpu"):
      validated = {name for name, where in op.validated().items() if backend in where}
      assert set(op.auto_order(backend)) - {"xla", "reference"} <= validated, (op.name, backend)


def test_fallback_warns_with_the_reason(op):
  with pytest.warns(dispatch.FallbackWarning, match="refuses every call"):
    with dispatch.interpret():
      assert op(3, implementation=("pallas_triton", "xla")) == ("xla", 3)


def test_explicit_name_and_sequence(op):
  assert op(2, implementation="reference") == ("reference", 2)
  # A sequence falls through NotImplementedError (wrong backend, refusal, failed import) to the next name.
  with pytest.warns(dispatch.FallbackWarning, match="pallas_tpu.*triton.*parallel"):
    assert op(3, implementation=("pallas_tpu", "triton", "parallel", "reference")) == ("reference", 3)


def test_single_explicit_name_propagates_its_error(op):
  with pytest.raises(NotImplementedError, match="interpret"):
    op(1, implementation="pallas_tpu")   # a Pallas kernel on CPU outside interpret mode
  with pytest.raises(NotImplementedError, match="unavailable here"):
    op(1, implementation="parallel")     # import failure becomes NotImplementedError
  with dispatch.interpret():
    with pytest.raises(NotImplementedError, match="refuses every call"):
      op(1, implementation="pallas_triton")


def test_all_candidates_failing_reports_each(op):
  with pytest.raises(NotImplementedError, match="pallas_tpu.*triton"):
    op(1, implementation=("pallas_tpu", "triton"))


def test_interpret_makes_pallas_runnable_everywhere_but_not_auto(op):
  with dispatch.interpret():
    assert op.auto_order("cpu") == ("xla", "reference")
    assert op(4, implementation="pallas_tpu") == ("pallas_tpu", True, 4)
  assert not dispatch.interpret_mode()


@pytest.mark.parametrize("bad", ["nope", (), ("xla", "nope")])
def test_unknown_implementation_is_a_value_error(op, bad):
  with pytest.raises(ValueError, match="implementation for toy"):
    op(1, implementation=bad)


def test_register_rejects_unknown_name(op):
  with pytest.raises(ValueError, match="not one of"):
    op.register("cuda_magic", "x:y")


def test_use_context_overrides_auto_but_not_explicit(op):
  with dispatch.use("reference"):
    assert op(5) == ("reference", 5)
    assert op(5, implementation="xla") == ("xla", 5)
    with dispatch.use(toy="xla"):
      assert op(5) == ("xla", 5)
  assert op(5) == ("xla", 5)


def test_per_op_override_beats_default(op):
  with dispatch.use("reference", toy=("triton", "xla")):   # triton is GPU-only: falls through to xla
    assert op(6) == ("xla", 6)


def test_default_override_skips_names_an_op_lacks():
  op = dispatch.Op("toy_without_parallel")
  op.register("xla", f"{__name__}:ok_xla", auto_priority=100)
  with dispatch.use("parallel"):   # this op has no "parallel": it stays on auto
    assert op(6) == ("xla", 6)


def test_use_validates_names():
  with pytest.raises(ValueError, match="use\\(default\\)"):
    with dispatch.use("fastest"):
      pass


def test_environment_variable(op, monkeypatch):
  monkeypatch.setenv(dispatch.ENV_VAR, "toy=reference")
  assert op(7) == ("reference", 7)
  monkeypatch.setenv(dispatch.ENV_VAR, "pallas_tpu,reference")
  assert op(7) == ("reference", 7)
  with dispatch.use("xla"):          # the context manager beats the environment
    assert op(7) == ("xla", 7)
  monkeypatch.setenv(dispatch.ENV_VAR, "toy=warp")
  with pytest.raises(ValueError, match=dispatch.ENV_VAR):
    op(7)


def test_parse_env_forms():
  assert dispatch.parse_env("") == {}
  assert dispatch.parse_env("xla") == {None: ("xla",)}
  assert dispatch.parse_env("attention=reference; linear_attention=parallel,xla") == {
      "attention": ("reference",), "linear_attention": ("parallel", "xla")}


def test_importing_packages_on_cpu_neither_fails_nor_warns():
  code = ("import warnings; warnings.simplefilter('error');"
          "import pallas_kernels, gated_jax, gated_jax.layers; print('imported')")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop(dispatch.ENV_VAR, None)
  result = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True,
                          env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  assert result.returncode == 0, result.stderr
  assert "imported" in result.stdout
