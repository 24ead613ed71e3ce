"""Each estimator of gated_jax.layers.discrete_gates against its closed form (REINFORCE: unbiased by Monte
Carlo against the exact gradient by enumeration), the deterministic rules, the modules, and bad arguments."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.scipy.stats import norm

from gated_jax.layers import discrete_gates as dg

pytestmark = pytest.mark.usefixtures("fast_compile")

N = 20_000  # Monte Carlo samples: standard errors of ~0.5/sqrt(N) = 0.0035 on a probability
A = jnp.array([-1.5, -0.3, 0.0, 0.8, 2.0], jnp.float32)
KEY = jax.random.PRNGKey(0)


def _samples(fn, logits=A, n=N):
  """``fn(logits, key)`` over ``n`` keys: (n, *logits.shape)."""
  return jax.jit(jax.vmap(lambda k: fn(logits, k)))(jax.random.split(KEY, n))


def _mean_grad(fn, logits=A, n=N):
  """Mean over keys of d sum(fn(logits, key)) / d logits."""
  grad = jax.grad(lambda a, k: jnp.sum(fn(a, k)))
  return jnp.mean(jax.jit(jax.vmap(grad, in_axes=(None, 0)))(logits, jax.random.split(KEY, n)), axis=0)


@pytest.mark.parametrize("backward", ["sigmoid", "identity"])
def test_straight_through_samples_bernoulli_and_copies_the_gradient(backward):
  h = _samples(lambda a, k: dg.straight_through(a, k, backward=backward).value)
  assert set(np.unique(h)) <= {0.0, 1.0}
  np.testing.assert_allclose(h.mean(0), jax.nn.sigmoid(A), atol=0.015)
  w = jnp.arange(1.0, 6.0)
  grad = jax.grad(lambda a: jnp.sum(w * dg.straight_through(a, KEY, backward=backward).value))(A)
  expected = w * jax.nn.sigmoid(A) * jax.nn.sigmoid(-A) if backward == "sigmoid" else w
  np.testing.assert_allclose(grad, expected, rtol=1e-6)
  np.testing.assert_array_equal(dg.straight_through(A, None).value, (A > 0).astype(jnp.float32))


def _loss(h_N3):
  """A non-linear loss of three binary units."""
  return jnp.square(h_N3 @ jnp.array([1.0, -2.0, 0.5]) - 0.7) + h_N3[..., 0] * h_N3[..., 2]


def test_reinforce_is_unbiased_for_any_baseline_and_the_learned_baseline_lowers_variance():
  a3 = jnp.array([0.4, -1.0, 1.2])
  p3 = jax.nn.sigmoid(a3)

  def expected_loss(a):  # exact E[L] by enumerating the 8 configurations
    total = 0.0
    for bits in itertools.product((0.0, 1.0), repeat=3):
      h = jnp.array(bits)
      total = total + jnp.exp(jnp.sum(dg.bernoulli_log_prob(h, a))) * _loss(h)
    return total
  exact = jax.jit(jax.grad(expected_loss))(a3)

  def one(key, baseline):
    sample = dg.reinforce(a3, key)
    grad = jax.grad(lambda a: jnp.sum(dg.reinforce_surrogate(dg.reinforce(a, key).log_prob,
                                                             _loss(sample.value), baseline)))(a3)
    return sample.value, grad
  run = jax.jit(jax.vmap(one, in_axes=(0, None)))
  keys = jax.random.split(KEY, N)
  h, g_zero = run(keys, jnp.zeros(3))
  _, g_shifted = run(keys, jnp.full(3, 1.3))
  for g in (g_zero, g_shifted):
    stderr = g.std(0) / math.sqrt(N)
    assert np.all(np.abs(g.mean(0) - exact) < 4 * stderr + 1e-4), (g.mean(0), exact)
  # Bengio et al.'s optimal per-unit baseline E[(h-p)^2 L] / E[(h-p)^2] (what LearnedBaseline regresses to).
  weight = jnp.square(h - p3)
  optimal = jnp.sum(weight * _loss(h)[:, None], 0) / jnp.sum(weight, 0)
  assert np.all(run(keys, optimal)[1].var(0) < g_zero.var(0))

  model = dg.LearnedBaseline(3)
  batch_h = h[:512]
  batch = (dg.GateSample(batch_h, dg.bernoulli_log_prob(batch_h, a3)), jnp.broadcast_to(a3, (512, 3)),
           _loss(batch_h))
  fit_weight = jnp.square(batch_h - p3)
  target = jnp.sum(fit_weight * batch[2][:, None], 0) / jnp.sum(fit_weight, 0)
  tx = optax.adam(0.05)

  @jax.jit
  def fit(params):
    def step(carry, _):
      params, state = carry
      grads = jax.grad(lambda p: model.apply(p, *batch))(params)
      updates, state = tx.update(grads, state)
      return (optax.apply_updates(params, updates), state), None
    return jax.lax.scan(step, (params, tx.init(params)), None, length=200)[0][0]
  params = fit(model.init(KEY, *batch))
  np.testing.assert_allclose(params["params"]["baseline"], target, atol=0.02)


def test_stochastic_times_smooth_mean_and_gradient():
  h = _samples(lambda a, k: dg.stochastic_times_smooth(a, k).value)
  np.testing.assert_allclose(h.mean(0), jax.nn.sigmoid(A), atol=0.015)
  # E[beta * d sqrt(p)/da] = sqrt(p) * sigma'(a) / (2 sqrt(p)) = sigma'(a) / 2.
  np.testing.assert_allclose(_mean_grad(lambda a, k: dg.stochastic_times_smooth(a, k).value),
                             jax.nn.sigmoid(A) * jax.nn.sigmoid(-A) / 2, atol=0.01)


def test_noisy_rectifier_mean_zeros_and_gradient():
  s = 0.7
  h = _samples(lambda a, k: dg.noisy_rectifier(a, k, stddev=s).value)
  np.testing.assert_allclose(h.mean(0), A * norm.cdf(A / s) + s * norm.pdf(A / s), atol=0.02)
  np.testing.assert_allclose((h == 0).mean(0), norm.cdf(-A / s), atol=0.015)
  np.testing.assert_allclose(_mean_grad(lambda a, k: dg.noisy_rectifier(a, k, stddev=s).value), norm.cdf(A / s),
                             atol=0.015)
  np.testing.assert_array_equal(dg.noisy_rectifier(A, None).value, jnp.maximum(A, 0))


@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_softmax_argmax_is_a_sample_of_softmax(hard):
  logits = jnp.array([[1.0, 0.0, -1.0, 0.5]])
  y = _samples(lambda a, k: dg.gumbel_softmax(a, k, 0.5, hard=hard), logits)[:, 0]
  np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-5)
  frequencies = jax.nn.one_hot(jnp.argmax(y, -1), 4).mean(0)
  np.testing.assert_allclose(frequencies, jax.nn.softmax(logits[0]), atol=0.015)
  if hard:
    assert set(np.unique(y)) <= {0.0, 1.0}
    # Straight-through: the hard sample's vector-Jacobian product is the soft sample's.
    cotangent = jnp.array([[0.3, -1.0, 2.0, 0.1]])
    soft_vjp = jax.vjp(lambda a: dg.gumbel_softmax(a, KEY, 0.5), logits)[1](cotangent)[0]
    hard_vjp = jax.vjp(lambda a: dg.gumbel_softmax(a, KEY, 0.5, hard=True), logits)[1](cotangent)[0]
    np.testing.assert_allclose(hard_vjp, soft_vjp, rtol=1e-6)
  np.testing.assert_allclose(dg.gumbel_softmax(logits, None, 2.0), jax.nn.softmax(logits / 2.0), rtol=1e-6)


def test_gumbel_sigmoid_is_a_relaxed_bernoulli():
  y = _samples(lambda a, k: dg.gumbel_sigmoid(a, k, 0.3))
  np.testing.assert_allclose((y > 0.5).mean(0), jax.nn.sigmoid(A), atol=0.015)  # P(y > 1/2) = sigma(a)
  hard = dg.binary_gate(A, KEY, "gumbel_sigmoid_st", temperature=0.3).value
  np.testing.assert_array_equal(hard, (dg.gumbel_sigmoid(A, KEY, 0.3) > 0.5).astype(jnp.float32))
  np.testing.assert_allclose(dg.gumbel_sigmoid(A, None, 2.0), jax.nn.sigmoid(A / 2.0), rtol=1e-6)


def test_hard_concrete_probabilities_l0_and_pathwise_gradient():
  beta, (gamma, zeta) = dg.HARD_CONCRETE_TEMPERATURE, dg.HARD_CONCRETE_STRETCH
  z = _samples(lambda a, k: dg.hard_concrete(a, k))
  np.testing.assert_allclose((z > 0).mean(0), dg.hard_concrete_l0(A), atol=0.015)
  p_one = jax.nn.sigmoid(A - beta * math.log((1 - gamma) / (zeta - 1)))
  np.testing.assert_allclose((z == 1).mean(0), p_one, atol=0.015)
  # E[z] = int_0^1 P(z > t) dt, P(z > t) = sigma(log a - beta logit((t - gamma) / (zeta - gamma))).
  t = (jnp.arange(4000) + 0.5) / 4000
  logit_t = jnp.log((t - gamma) / (zeta - t))
  expected_grad = jnp.mean(jax.vmap(lambda a: jax.nn.sigmoid(a - beta * logit_t) * jax.nn.sigmoid(
      beta * logit_t - a))(A), axis=-1)
  np.testing.assert_allclose(_mean_grad(dg.hard_concrete), expected_grad, atol=0.01)
  np.testing.assert_allclose(dg.hard_concrete(A, None), jnp.clip(jax.nn.sigmoid(A) * 1.2 - 0.1, 0, 1), rtol=1e-6)


def test_hard_concrete_gate_module_sows_l0_and_is_deterministic_in_eval():
  gate = dg.HardConcreteGate((4,), keep_probability=0.8, l0_loss="l0")
  variables = gate.init(KEY)
  log_alpha = variables["params"]["log_alpha"]
  np.testing.assert_allclose(jax.nn.sigmoid(log_alpha), 0.8, atol=0.01)
  z, sown = gate.apply(variables, mutable=["aux_loss"])
  np.testing.assert_allclose(z, dg.hard_concrete(log_alpha, None))
  np.testing.assert_allclose(sown["aux_loss"]["l0"][0], jnp.mean(dg.hard_concrete_l0(log_alpha)))
  noisy = gate.apply(variables, rngs={"gating": KEY})
  assert not np.allclose(noisy, z)


def test_anneal_temperature_schedule():
  steps = jnp.array([0, 499, 500, 5_000, 10**7])
  np.testing.assert_allclose(dg.anneal_temperature(steps, rate=1e-4, every=500),
                             [1.0, 1.0, math.exp(-0.05), math.exp(-0.5), 0.5], rtol=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda: dg.binary_gate(A, KEY, "bernoulli"), "estimator: got 'bernoulli'"),
    (lambda: dg.straight_through(A, KEY, backward="tanh"), "backward: got 'tanh'"),
    (lambda: dg.gumbel_softmax(A, KEY, 0.0), "temperature: got 0.0"),
    (lambda: dg.noisy_rectifier(A, KEY, stddev=-1.0), "stddev: got -1.0"),
    (lambda: dg.hard_concrete(A, KEY, stretch=(0.1, 1.1)), r"stretch: got \(0.1, 1.1\)"),
    (lambda: dg.straight_through(jnp.arange(3), KEY), "logits: got int32"),
    (lambda: dg.anneal_temperature(3, rate=1e-4, every=0), "every: got 0"),
    (lambda: dg.HardConcreteGate((2,), keep_probability=1.0).init(KEY), "keep_probability: got 1.0"),
])
def test_bad_arguments_raise_named_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()
