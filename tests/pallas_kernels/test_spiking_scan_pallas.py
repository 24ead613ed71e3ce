"""Pallas ``spiking_scan`` kernels (TPU and Triton) in interpret mode against the reference oracle, and the
real kernels cross-lowered for their platforms from this CPU host."""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from tests.pallas_kernels._spiking_helpers import inputs, outputs_and_grads, rel_err

pytestmark = pytest.mark.usefixtures("fast_compile")


CASES = (  # dtype, options
    (jnp.float32, dict(reset="subtract", detach_reset=False, surrogate="atan")),
    (jnp.bfloat16, dict(reset="zero", reset_delay=False, detach_reset=False, surrogate="sigmoid", mpr=True)),
)


@functools.cache
def _case(index):
  """Inputs (21 steps, 37 neurons) and the reference's outputs and gradients, shared by both kernels."""
  dtype, options = CASES[index]
  args = inputs(11, seq=21, neurons=37, dtype=dtype)
  return args, outputs_and_grads("reference", *args, **options)


@pytest.mark.parametrize("implementation,index", [
    ("pallas_tpu", 0), ("pallas_triton", 1),  # each kernel once in the default run, the other pairs under slow
    pytest.param("pallas_tpu", 1, marks=pytest.mark.slow), pytest.param("pallas_triton", 0, marks=pytest.mark.slow),
])
def test_kernel_matches_reference(monkeypatch, implementation, index):
  # Time blocks of 8 steps: 21 steps make three TPU chunks, the last one ragged.
  monkeypatch.setattr(importlib.import_module("pallas_kernels.spiking_scan.tpu"), "TIME_BLOCK", 8)
  dtype, options = CASES[index]
  args, ((s_ref, m_ref, f_ref), grads_ref) = _case(index)
  with pallas_kernels.interpret():
    (s, m, f), grads = outputs_and_grads(implementation, *args, **options)
  assert s.dtype == dtype and m.dtype == f.dtype == jnp.float32
  np.testing.assert_array_equal(s, s_ref)
  np.testing.assert_allclose(m, m_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(f, f_ref, rtol=1e-6, atol=1e-6)
  tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
  for name, g, g_ref in zip(("current", "beta", "threshold", "initial_membrane"), grads, grads_ref):
    assert g.dtype == g_ref.dtype and rel_err(g, g_ref) < tolerance, (name, rel_err(g, g_ref))


@pytest.mark.parametrize("module,platform,marker", [("tpu", "tpu", "tpu_custom_call"),
                                                    ("gpu", "cuda", "__gpu$xla.gpu.triton")])
def test_cross_lowers_forward_and_backward(module, platform, marker):
  """The real kernels lower for their platform: bf16 currents, a ragged last time block, padded neurons."""
  impl = importlib.import_module(f"pallas_kernels.spiking_scan.{module}").spiking_scan
  step = importlib.import_module("pallas_kernels.spiking_scan._step")
  surrogates = importlib.import_module("pallas_kernels.spiking_scan.surrogates")
  config = step.ScanConfig("subtract", True, False, surrogates.get("atan", None, True))

  def f(current, beta, threshold, membrane):
    spikes, trace, final = impl(current, beta, threshold, membrane, config=config, return_membrane=True)
    return jnp.sum(spikes.astype(jnp.float32)) + jnp.sum(trace) + jnp.sum(final)

  sds = jax.ShapeDtypeStruct
  args = (sds((4, 300, 200), jnp.bfloat16), sds((200,), jnp.float32), sds((200,), jnp.float32),
          sds((4, 200), jnp.float32))
  text = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3))).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  assert text.count(marker) >= 2
  assert "spiking_scan_fwd" in text and "spiking_scan_bwd" in text
