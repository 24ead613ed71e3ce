"""Shared helpers of the linear-attention / delta-rule tests: inputs, the reference comparison, fla's metric."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels

# Log decays every implementation must handle exactly like the reference: the state emptied (-inf), a decay
# far below float32's range (-1e4), a strong one (-20), none at all (0), and ordinary ones.
SPECIAL_LOG_DECAYS = (-jnp.inf, -1e4, -20.0, 0.0)


def rel_rms(got, want) -> float:
  """flash-linear-attention's test metric: ``rms(want - got) / rms(want)`` (0 when both are ~0)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  err = np.sqrt(np.mean((want - got) ** 2))
  return float(err / max(np.sqrt(np.mean(want ** 2)), 1e-30)) if err > 1e-6 else 0.0


def log_decays(key, shape, dtype=jnp.float32):
  """Ordinary log decays in (-0.3, 0) with about 3% of each of :data:`SPECIAL_LOG_DECAYS` mixed in."""
  k_value, k_pick = jax.random.split(key)
  ordinary = -0.3 * jax.random.uniform(k_value, shape)
  pick = jax.random.randint(k_pick, shape, 0, 33)  # 0..3: a special value, else ordinary
  special = jnp.asarray(SPECIAL_LOG_DECAYS, jnp.float32)[jnp.minimum(pick, len(SPECIAL_LOG_DECAYS) - 1)]
  return jnp.where(pick < len(SPECIAL_LOG_DECAYS), special, ordinary).astype(dtype)


def inputs(seed, *, batch=1, seq=20, heads=2, kv_heads=None, key_dim=8, value_dim=8, dtype=jnp.float32,
           decay="channel", delta=False, beta_heads=None):
  """Random q/k/v/log_decay/initial_state (and beta for the delta rule); ``decay`` "none", "head" or "channel"
  (from :func:`log_decays`) or "mild" (per channel, GLA-like gates only)."""
  kv_heads = kv_heads or heads
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = jax.random.normal(ks[0], (batch, seq, heads, key_dim), dtype)
  k = jax.random.normal(ks[1], (batch, seq, kv_heads, key_dim), jnp.float32)
  if delta:  # the delta rule is stable for unit keys (layers L2-normalise them)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  k = k.astype(dtype)
  v = jax.random.normal(ks[2], (batch, seq, kv_heads, value_dim), dtype)
  shape = {"none": None, "head": (batch, seq, heads), "channel": (batch, seq, heads, key_dim),
           "mild": (batch, seq, heads, key_dim)}[decay]
  if decay == "mild":  # GLA's gates: logsigmoid(x) / 16, per key channel
    log_decay = (jax.nn.log_sigmoid(jax.random.normal(ks[3], shape)) / 16).astype(dtype)
  else:
    log_decay = None if shape is None else log_decays(ks[3], shape, dtype)
  state = jax.random.normal(ks[4], (batch, heads, key_dim, value_dim), jnp.float32)
  args = dict(q=q, k=k, v=v, log_decay=log_decay, initial_state=state)
  if delta:
    args["beta"] = jax.random.uniform(ks[5], (batch, seq, beta_heads or heads), dtype, 0.05, 1.95)
  return args


def outputs_and_grads(implementation, args, op=None, **kwargs):
  """``{"o", "final_state", "d<arg>"...}`` of ``linear_attention`` (or ``delta_rule`` when ``args`` has beta)
  through the public op (or ``op``, with its signature); gradients for fixed random cotangents of both outputs
  (independent of the outputs, so a 16-bit output rounded differently does not change them)."""
  names = [n for n, x in args.items() if x is not None]
  q, v = args["q"], args["v"]
  keys = jax.random.split(jax.random.PRNGKey(123), 2)
  d_o = jax.random.normal(keys[0], q.shape[:3] + v.shape[-1:])
  d_final = jax.random.normal(keys[1], args["initial_state"].shape)

  def loss(*xs):
    call = dict(args, **dict(zip(names, xs)))
    public = op or (pallas_kernels.delta_rule if "beta" in call else pallas_kernels.linear_attention)
    positional = [call.pop(n) for n in ("q", "k", "v", "beta") if n in call]
    o, final = public(*positional, **call, return_final_state=True, implementation=implementation, **kwargs)
    return jnp.sum(o.astype(jnp.float32) * d_o) + jnp.sum(final * d_final), (o, final)

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
