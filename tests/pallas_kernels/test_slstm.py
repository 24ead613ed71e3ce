"""``pallas_kernels.slstm``: the ``reference`` scan against a float64 numpy transcription of the unstabilised
sLSTM equations (xLSTM arXiv 2405.04517 eq. 8-14), and the ``xla`` custom-VJP scan against ``reference``
(outputs, final state, gradients of every input), float32 and bfloat16, both forget gates, packed segments,
lengths that are not a multiple of the unroll, a single token, large gate pre-activations, bad arguments."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import SLSTMState

pytestmark = pytest.mark.usefixtures("fast_compile")


def _inputs(seed, *, batch=2, seq=11, heads=2, dim=3, scale=1.0, dtype=jnp.float32, input_gate_offset=0.0):
  """Gate pre-activations (the input gate's shifted by ``input_gate_offset``), R, and an initial state."""
  keys = jax.random.split(jax.random.key(seed), 6)
  gates = [(scale * jax.random.normal(k, (batch, seq, heads, dim))).astype(dtype) for k in keys[:4]]
  gates[1] = (gates[1].astype(jnp.float32) + input_gate_offset).astype(dtype)
  kernel = 0.5 * jax.random.normal(keys[4], (heads, dim, 4, dim))
  s = jax.random.normal(keys[5], (3, batch, heads, dim))
  state = SLSTMState(jnp.tanh(s[0]), s[1], 1.0 + jnp.abs(s[2]), 0.3 * s[0])
  return gates, kernel, state


def _numpy_slstm(gates, kernel, forget_gate, segment_ids=None):
  """Unstabilised sLSTM from the empty state in float64: ``c = f c + exp(i~) z``, ``n = f n + exp(i~)``."""
  z_pre, i_pre, f_pre, o_pre = (np.asarray(g, np.float64) for g in gates)
  kernel = np.asarray(kernel, np.float64)
  batch, seq, heads, dim = z_pre.shape
  h, c, n = (np.zeros((batch, heads, dim)) for _ in range(3))
  out = np.zeros((batch, seq, heads, dim))
  for t in range(seq):
    if segment_ids is not None and t > 0:
      restart = (segment_ids[:, t] != segment_ids[:, t - 1])[:, None, None]
      h, c, n = (np.where(restart, 0.0, x) for x in (h, c, n))
    rec = np.einsum("bhd,hdge->bhge", h, kernel)
    zt, it, ft, ot = (g[:, t] + rec[:, :, k] for k, g in enumerate((z_pre, i_pre, f_pre, o_pre)))
    forget = 1 / (1 + np.exp(-ft)) if forget_gate == "sigmoid" else np.exp(ft)
    c = forget * c + np.exp(it) * np.tanh(zt)
    n = forget * n + np.exp(it)
    h = 1 / (1 + np.exp(-ot)) * c / n
    out[:, t] = h
  return out, c / n


@pytest.mark.parametrize("forget_gate", ("sigmoid", "exp"))
def test_reference_matches_numpy_equations(forget_gate):
  gates, kernel, _ = _inputs(0, scale=0.7)
  segment_ids = jnp.array([[0] * 4 + [1] * 7, [0] * 11], jnp.int32)
  h, final = pallas_kernels.slstm(*gates, kernel, forget_gate=forget_gate, segment_ids=segment_ids,
                                  return_final_state=True, implementation="reference")
  want_h, want_ratio = _numpy_slstm(gates, kernel, forget_gate, np.asarray(segment_ids))
  np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(final.c / final.n, want_ratio, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(final.h, want_h[:, -1], rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(final.n) >= 1.0 - 1e-6)  # one of i', f' is 1 at every step


def _outputs_and_grads(implementation, gates, kernel, state, **kwargs):
  def loss(gates, kernel, state):
    h, final = pallas_kernels.slstm(*gates, kernel, initial_state=state, return_final_state=True,
                                    implementation=implementation, **kwargs)
    h32 = h.astype(jnp.float32)
    return jnp.sum(h32 * jnp.cos(3 * h32)) + jnp.sum(jnp.sin(final.c) + final.n + final.h ** 2), (h, final)

  (_, (h, final)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(gates, kernel, state)
  return h, final, grads


CASES = [
    # forget gate, dtype, seq, segments, input-gate offset (100: exp(i~) overflows float32 unstabilised)
    ("sigmoid", jnp.float32, 13, True, 100.0),
    ("exp", jnp.float32, 1, False, 0.0),
    ("sigmoid", jnp.bfloat16, 10, True, 0.0),
]


@pytest.mark.parametrize("forget_gate,dtype,seq,segments,offset", CASES)
def test_xla_matches_reference(forget_gate, dtype, seq, segments, offset):
  gates, kernel, state = _inputs(1, seq=seq, dtype=dtype, input_gate_offset=offset)
  segment_ids = (jnp.arange(seq)[None] >= jnp.array([[4], [9]])).astype(jnp.int32) if segments else None
  kwargs = dict(forget_gate=forget_gate, segment_ids=segment_ids)
  want = _outputs_and_grads("reference", gates, kernel, state, **kwargs)
  got = _outputs_and_grads("xla", gates, kernel, state, **kwargs)
  tol = dict(rtol=2e-5, atol=2e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert g.dtype == w.dtype and np.all(np.isfinite(np.asarray(g, np.float32)))
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), **tol)
  assert got[0].dtype == dtype and got[2][0][0].dtype == dtype  # output and input gradients keep the dtype


@pytest.mark.slow
def test_packed_segments_equal_separate_runs():
  gates, kernel, state = _inputs(2, batch=1, seq=12)
  segment_ids = jnp.array([[0] * 6 + [1] * 6], jnp.int32)
  run = jax.jit(functools.partial(pallas_kernels.slstm, return_final_state=True, implementation="xla"))
  packed, final = run(*gates, kernel, initial_state=state, segment_ids=segment_ids)
  first, _ = run(*(g[:, :6] for g in gates), kernel, initial_state=state)
  second, second_final = run(*(g[:, 6:] for g in gates), kernel, initial_state=SLSTMState.empty(1, 2, 3))
  np.testing.assert_allclose(packed, jnp.concatenate([first, second], axis=1), rtol=1e-6, atol=1e-6)
  for a, b in zip(final, second_final):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_large_gate_preactivations_stay_finite():
  """``exp(i~)`` overflows float32 at ``i~ > 88``; the stabiliser keeps h, state and gradients finite."""
  gates, kernel, _ = _inputs(3, seq=9, scale=1.0)
  gates[1] = gates[1] * 60.0 + 60.0  # input-gate pre-activations up to ~200
  h, final, grads = _outputs_and_grads("xla", gates, kernel, None)
  for leaf in jax.tree.leaves((h, final.h, final.c, final.n, grads)):
    assert np.all(np.isfinite(np.asarray(leaf)))
  np.testing.assert_array_less(np.abs(np.asarray(h)), 1.0 + 1e-6)  # |h| = o |c / n| <= 1


def test_bad_arguments():
  gates, kernel, state = _inputs(4, seq=3)
  with pytest.raises(ValueError, match="forget_gate: got 'relu'"):
    pallas_kernels.slstm(*gates, kernel, forget_gate="relu")
  with pytest.raises(ValueError, match="recurrent_kernel"):
    pallas_kernels.slstm(*gates, kernel[:, :, :3])
  with pytest.raises(ValueError, match="^o: expected shape"):
    pallas_kernels.slstm(*gates[:3], gates[3][:, :2], kernel)
  with pytest.raises(ValueError, match="initial_state.n"):
    pallas_kernels.slstm(*gates, kernel, initial_state=state._replace(n=state.n[:1]))
  with pytest.raises(ValueError, match="segment_ids: expected an integer dtype"):
    pallas_kernels.slstm(*gates, kernel, segment_ids=jnp.zeros((2, 3)))
