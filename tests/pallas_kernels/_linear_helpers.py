"""Shared helpers of the linear-attention / delta-rule tests: inputs, the reference comparison, fla's metric."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels


def rel_rms(got, want) -> float:
  """flash-linear-attention's test metric: ``rms(want - got) / rms(want)`` (0 when both are ~0)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  err = np.sqrt(np.mean((want - got) ** 2))
  return float(err / max(np.sqrt(np.mean(want ** 2)), 1e-30)) if err > 1e-6 else 0.0


def inputs(seed, *, batch=1, seq=20, heads=2, kv_heads=None, key_dim=8, value_dim=8, dtype=jnp.float32,
           decay="channel", delta=False):
  """Random q/k/v/log_decay/initial_state (and beta for the delta rule) with a mix of zero decay factors
  (log decay -inf), strong (-20 per step), moderate and near-zero log decays."""
  kv_heads = kv_heads or heads
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = jax.random.normal(ks[0], (batch, seq, heads, key_dim), dtype)
  k = jax.random.normal(ks[1], (batch, seq, kv_heads, key_dim), jnp.float32)
  if delta:  # the delta rule is stable for unit keys (layers L2-normalise them)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  k = k.astype(dtype)
  v = jax.random.normal(ks[2], (batch, seq, kv_heads, value_dim), dtype)
  shape = {"none": None, "head": (batch, seq, heads), "channel": (batch, seq, heads, key_dim)}[decay]
  log_decay = None
  if shape is not None:
    u = jax.random.uniform(ks[3], shape)
    log_decay = jnp.where(u < 0.15, -20.0, jnp.where(u < 0.5, -1e-4 * u, -0.3 * u))
    log_decay = jnp.where(u < 0.03, -jnp.inf, log_decay).astype(dtype)
  state = jax.random.normal(ks[4], (batch, heads, key_dim, value_dim), jnp.float32)
  args = dict(q=q, k=k, v=v, log_decay=log_decay, initial_state=state)
  if delta:
    args["beta"] = jax.random.uniform(ks[5], (batch, seq, heads), dtype, 0.05, 1.95)
  return args


def outputs_and_grads(implementation, args, **kwargs):
  """``{"o", "final_state", "d<arg>"...}`` of ``linear_attention`` (or ``delta_rule`` when ``args`` has beta)
  through the public op, gradients of a fixed nonlinear loss of both outputs."""
  names = [n for n, x in args.items() if x is not None]

  def loss(*xs):
    call = dict(args, **dict(zip(names, xs)))
    op = pallas_kernels.delta_rule if "beta" in call else pallas_kernels.linear_attention
    positional = [call.pop(n) for n in ("q", "k", "v", "beta") if n in call]
    o, final = op(*positional, **call, return_final_state=True, implementation=implementation, **kwargs)
    o32 = o.astype(jnp.float32)
    return jnp.sum(o32 * jnp.cos(o32)) + jnp.sum(final * jnp.sin(final)), (o, final)

  (_, (o, final)), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(names))), has_aux=True))(
      *[args[n] for n in names])
  return {"o": o, "final_state": final, **{f"d{n}": g for n, g in zip(names, grads)}}


def assert_matches(got, want, *, rtol=None, atol=None, rms=None, gate_rms=None):
  """Checks every entry: same shape/dtype, finite, and either ``assert_allclose(rtol, atol * max|want|)``
  (float32) or relative RMS ``<= rms`` (``<= gate_rms`` for the gate gradients dlog_decay/dbeta)."""
  assert set(got) == set(want)
  for name in want:
    g, w = got[name], want[name]
    assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
    g32, w32 = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.all(np.isfinite(g32)), name
    if rms is None:
      np.testing.assert_allclose(g32, w32, rtol=rtol, atol=atol * max(1.0, float(np.max(np.abs(w32)))),
                                 err_msg=name)
    else:
      limit = gate_rms if name in ("dlog_decay", "dbeta") else rms
      assert rel_rms(g32, w32) <= limit, (name, rel_rms(g32, w32))
