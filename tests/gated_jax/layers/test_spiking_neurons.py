"""Spiking neurons: LIF equals the op and clamps a learnable β like snnTorch; PLIF's decay; UltraLIF's limit
ε -> 0 is the hard max-plus LIF; decode equals the full sequence; spike-rate metric and auxiliary loss; bad
arguments."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gated_jax.layers.collections import AUX_LOSS, LAYER_METRICS
from gated_jax.layers.spiking import LIF, PLIF, ParallelLIF, UltraDLIF, UltraLIF, get_neuron
from pallas_kernels import spiking_scan

pytestmark = pytest.mark.usefixtures("fast_compile")


def _current(seed=0, shape=(2, 12, 6), scale=1.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(scale * rng.standard_normal(shape) + 0.4, jnp.float32)


def test_lif_is_the_op_and_clamps_a_learned_beta_like_snntorch():
  current = _current()
  lif = LIF(beta=0.8, threshold=0.9, reset="zero", surrogate="sigmoid")
  spikes = lif.apply({}, current)
  np.testing.assert_array_equal(spikes, spiking_scan(current, beta=0.8, threshold=0.9, reset="zero"))
  learned = LIF(learn_beta=True)
  params = nn.unbox(learned.init(jax.random.PRNGKey(0), current))["params"]
  assert params["beta"].shape == (6,)
  over = {"params": {"beta": jnp.full((6,), 1.2)}}  # snnTorch: beta.clamp(0, 1)
  np.testing.assert_array_equal(learned.apply(over, current), LIF(beta=1.0).apply({}, current))


def test_plif_learns_a_sigmoid_decay():
  current = _current()
  plif = PLIF(beta=0.7)
  params = nn.unbox(plif.init(jax.random.PRNGKey(0), current))["params"]
  np.testing.assert_allclose(jax.nn.sigmoid(params["beta_logit"]), 0.7, rtol=1e-6)
  np.testing.assert_array_equal(plif.apply({"params": params}, current), LIF(beta=0.7).apply({}, current))
  grad = jax.jit(jax.grad(lambda p: jnp.sum(plif.apply({"params": p}, current) * current)))(params)
  assert float(jnp.abs(grad["beta_logit"])) > 0


def _hard_maxplus(current, tau, threshold):
  """The ε -> 0 limit of UltraLIF: V = max(V + log τ, I); s = H(V - θ); V <- V (1 - s)."""
  v = np.zeros(current.shape[::2], np.float64)
  out = []
  for t in range(current.shape[1]):
    v = np.maximum(v + np.log(tau), np.asarray(current[:, t], np.float64))
    s = (v > threshold).astype(np.float64)
    v = v * (1 - s)
    out.append(s)
  return np.stack(out, 1)


def test_ultralif_tends_to_the_hard_maxplus_lif_as_eps_shrinks():
  current = _current(1, scale=1.5)
  hard = _hard_maxplus(current, 0.9, 1.0)
  errors = [float(np.max(np.abs(UltraLIF(eps=eps, learn_eps=False).apply({}, current) - hard)))
            for eps in (0.3, 0.03, 1e-3)]
  assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3, errors
  assert 0.1 < hard.mean() < 0.9


def test_ultradlif_diffuses_over_neighbours_and_learns_eps():
  current = _current(2)
  one_step = UltraDLIF(eps=1e-3, learn_eps=False).apply({}, current[:, :1])
  np.testing.assert_allclose(one_step[:, 0], np.asarray(current[:, 0] > 1.0, np.float32), atol=1e-3)  # V0 = 0
  neuron = UltraDLIF()
  params = nn.unbox(neuron.init(jax.random.PRNGKey(0), current))["params"]
  grads = jax.jit(jax.grad(lambda p: jnp.sum(neuron.apply({"params": p}, current))))(params)
  assert np.isfinite(float(grads["log_eps"])) and float(jnp.abs(grads["log_eps"])) > 0  # exact derivative, no surrogate


@pytest.mark.parametrize("name", ["lif", "ultraplif"])
def test_decode_equals_full_sequence(name):
  current = _current(3)
  neuron = get_neuron(name)()
  variables = neuron.init(jax.random.PRNGKey(0), current, decode=True)
  full = neuron.apply({"params": variables.get("params", {})}, current)
  step = jax.jit(lambda v, c: neuron.apply(v, c, decode=True, mutable=["cache"]))
  cache, outs = variables["cache"], []
  for chunk in (slice(0, 5), slice(5, 6), slice(6, 12)):  # a prefill, one token, the rest
    out, mutated = step({"params": variables.get("params", {}), "cache": cache}, current[:, chunk])
    cache = mutated["cache"]
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-6)


def test_spike_rate_metric_and_auxiliary_loss():
  current = _current(4)
  spikes, sown = LIF(rate_loss=True).apply({}, current, mutable=[LAYER_METRICS, AUX_LOSS])
  rate = float(jnp.mean(spikes))
  assert 0 < rate < 1
  assert sown[LAYER_METRICS]["spike_rate"][0] == pytest.approx(rate)
  assert sown[AUX_LOSS]["spike_rate"][0] == pytest.approx(rate)
  _, sown = LIF().apply({}, current, mutable=[LAYER_METRICS, AUX_LOSS])
  assert "spike_rate" not in sown.get(AUX_LOSS, {})  # the loss is opt-in


@pytest.mark.parametrize("make,match", [
    (functools.partial(LIF, beta=1.5), r"beta: got 1.5; allowed: a number in \[0, 1\]"),
    (functools.partial(LIF, threshold=0.0), "threshold: got 0.0"),
    (functools.partial(LIF, surrogate="gauss"), "surrogate: got 'gauss'"),
    (functools.partial(LIF, reset="soft"), "reset: got 'soft'"),
    (functools.partial(ParallelLIF, reset="subtract"), "reset: got 'subtract'; allowed: 'none'"),
    (functools.partial(UltraLIF, tau=1.0), r"tau: got 1.0; allowed: a number in \(0, 1\)"),
    (functools.partial(UltraLIF, eps=-1.0), "eps: got -1.0"),
    (functools.partial(get_neuron, "izhikevich"), "neuron: got 'izhikevich'"),
])
def test_bad_arguments_raise_value_errors(make, match):
  with pytest.raises(ValueError, match=match):
    make()
