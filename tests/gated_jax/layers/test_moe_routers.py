"""Each router's own invariants (``gated_jax.layers.ROUTERS``), on routers applied to explicit parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gated_jax.layers import ROUTERS
from gated_jax.layers.collections import NOISE_RNG, PARAM_UPDATES
from gated_jax.layers.moe import routers

N, D, E = 16, 6, 5


def _x(seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (1, N, D))


def _kernel(seed=1, scale=1.0):
  return scale * jax.random.normal(jax.random.PRNGKey(seed), (D, E))


def _route(name, params, x=None, k=2, rng=None, **kwargs):
  return ROUTERS.get(name)(num_experts=E, k=k, **kwargs).apply(
      {"params": params}, _x() if x is None else x, rngs=None if rng is None else {NOISE_RNG: rng})


def test_noisy_topk_without_noise_is_renormalised_topk_and_noise_needs_an_rng():
  params = {"kernel": _kernel(), "noise_kernel": _kernel(2)}
  clean = _route("noisy_topk", params)
  want = _route("topk_softmax", {"kernel": params["kernel"]}, renormalize=True)
  np.testing.assert_array_equal(clean.indices, want.indices)
  np.testing.assert_allclose(clean.weights, want.weights, rtol=1e-6)
  np.testing.assert_allclose(_route("noisy_topk", params).weights, clean.weights)  # deterministic
  a, b = (_route("noisy_topk", params, rng=jax.random.PRNGKey(s)) for s in (0, 1))
  assert not np.allclose(a.weights, b.weights)


def test_noisy_topk_load_estimator_matches_monte_carlo():
  """Σ_x P(x, i) (Shazeer et al. Appendix A) estimates how many tokens expert i gets under fresh noise."""
  clean = jax.random.normal(jax.random.PRNGKey(0), (N, E))
  scale = 0.5 + jax.random.uniform(jax.random.PRNGKey(1), (N, E))

  @jax.jit
  def both(key):
    noise = jax.random.normal(key, (2000, N, E)) * scale
    noisy = clean + noise
    routed = jnp.sum(jax.nn.one_hot(jax.lax.top_k(noisy, 2)[1], E), axis=(1, 2))  # (samples, E)
    estimated = jax.vmap(lambda n: routers.smooth_load(clean, n, scale, jax.lax.top_k(n, 3)[0]))(noisy)
    return jnp.mean(routed, 0), jnp.mean(estimated, 0)

  monte_carlo, estimated = both(jax.random.PRNGKey(2))
  np.testing.assert_allclose(estimated, monte_carlo, rtol=0.05)


@pytest.mark.parametrize("name", ["dts", "activation_dts"])
def test_dense_to_sparse_temperature_limits_and_schedule(name):
  params = {"kernel": _kernel(scale=0.3)}  # tanh/sigmoid far from saturation: no ties
  hot = _route(name, params, k=E, tau_end=1e3)
  cold = _route(name, params, k=E, tau_end=1e-6)
  np.testing.assert_allclose(hot.probs, 1 / E, atol=2e-3)
  np.testing.assert_allclose(jnp.max(cold.probs, -1), 1.0, atol=1e-6)
  active = [float(jnp.mean(jnp.sum(_route(name, params, k=E, tau_end=t).indices < E, -1)))
            for t in (4.0, 1.0, 0.25, 0.05, 1e-6)]
  assert active == sorted(active, reverse=True) and active[0] > active[-1] == 1.0
  router = ROUTERS.get(name)(num_experts=E, tau_start=2.0, tau_end=0.3, tau_steps=100)
  temps = [float(router.bind({"params": params}).temperature(s)) for s in (0, 50, 100, 400, None)]
  np.testing.assert_allclose(temps, [2.0, 1.15, 0.3, 0.3, 0.3], rtol=1e-6)


def test_top_p_keeps_the_smallest_prefix_reaching_p_and_sentinels_weigh_nothing():
  params = {"kernel": _kernel()}
  routing = _route("top_p", params, k=E, p=0.6)
  probs = np.asarray(routing.probs).reshape(-1, E)
  for token, p in enumerate(probs):
    order = np.argsort(-p)
    count = next(c for c in range(1, E + 1) if p[order[:c]].sum() >= 0.6)
    active = np.asarray(routing.indices).reshape(-1, E)[token]
    assert list(active[:count]) == list(order[:count]) and np.all(active[count:] == E)
  assert np.all(np.asarray(routing.weights)[np.asarray(routing.indices) == E] == 0)
  assert float(routing.aux["top_p_entropy"]) > 0


def test_adaptive_uses_a_second_expert_only_when_unsure():
  params = {"kernel": _kernel()}
  routing = _route("adaptive", params, threshold=0.1)
  top2 = jax.lax.top_k(routing.probs, 2)[0]
  unsure = np.asarray(top2[..., 0] - top2[..., 1] < 0.1)
  np.testing.assert_array_equal(np.asarray(routing.indices[..., 1] < E), unsure)
  np.testing.assert_allclose(jnp.sum(routing.weights, -1), 1.0, rtol=1e-6)
  assert 0 < unsure.mean() < 1


def test_laplace_permutes_with_centroids_and_favours_the_nearest():
  centroids = _kernel()
  x = _x()
  routing = _route("laplace", {"centroids": centroids}, x=x)
  perm = np.array([3, 0, 4, 1, 2])
  permuted = _route("laplace", {"centroids": centroids[:, perm]}, x=x)
  np.testing.assert_allclose(permuted.probs, routing.probs[..., perm], rtol=1e-5)
  distances = np.linalg.norm(np.asarray(x)[0, :, None, :] - np.asarray(centroids).T[None], axis=-1)
  np.testing.assert_array_equal(np.asarray(routing.indices[0, :, 0]), np.argmin(distances, -1))


def test_expert_choice_gives_every_expert_exactly_capacity_tokens():
  routing = _route("expert_choice", {"kernel": _kernel()}, x=jnp.concatenate([_x(0), _x(1)]), causal=False)
  capacity = int(np.ceil(N * 2 / E))
  for row in np.asarray(routing.indices):
    np.testing.assert_array_equal(np.bincount(row[row < E], minlength=E), capacity)


def test_sigmoid_bias_only_selects_and_balancing_pushes_load_toward_the_mean():
  kernel = _kernel()
  bias = jnp.array([5.0, 0.0, 0.0, 0.0, 0.0])
  routing = _route("sigmoid", {"kernel": kernel, "selection_bias": bias})
  scores = jax.nn.sigmoid(jnp.einsum("btd,de->bte", _x(), kernel))
  assert np.all(np.asarray(routing.indices[..., 0]) == 0)  # the bias wins every first slot...
  chosen = jnp.take_along_axis(scores, routing.indices, -1)
  np.testing.assert_allclose(routing.weights, chosen / jnp.sum(chosen, -1, keepdims=True), rtol=1e-6)  # ...not weights
  _, sown = ROUTERS.get("sigmoid")(num_experts=E, k=2, balance_rate=0.01).apply(
      {"params": {"kernel": kernel, "selection_bias": bias}}, _x(), mutable=[PARAM_UPDATES])
  update = np.asarray(sown[PARAM_UPDATES]["selection_bias"][0])
  load = np.bincount(np.asarray(routing.indices).ravel(), minlength=E)
  np.testing.assert_allclose(update, 0.01 * np.sign(load.mean() - load))
  assert update[0] == -0.01


def test_hash_router_is_fixed_and_uniformly_weighted():
  a, b = _route("hash", {}, k=2), _route("hash", {}, k=2)
  np.testing.assert_array_equal(a.indices, b.indices)
  np.testing.assert_allclose(a.weights, 0.5)
  assert len(np.unique(np.asarray(a.indices))) > 1


_DEFAULT_DTYPE_CHECK = ("topk_softmax", "sigmoid", "top_p", "expert_choice")  # the rest under slow


@pytest.mark.parametrize("name", [n if n in _DEFAULT_DTYPE_CHECK else pytest.param(n, marks=pytest.mark.slow)
                                  for n in ROUTERS.names()])
def test_every_router_returns_float32_top_slots(name):
  router = ROUTERS.get(name)(num_experts=E, k=2, **({"causal": False} if name == "expert_choice" else {}))
  routing, _ = router.init_with_output(jax.random.PRNGKey(0), _x().astype(jnp.bfloat16))
  for leaf in (routing.weights, routing.probs, routing.logits):
    assert leaf.dtype == jnp.float32
  assert routing.indices.dtype == jnp.int32 and routing.probs.shape == (1, N, E)
  assert np.all((np.asarray(routing.indices) >= 0) & (np.asarray(routing.indices) <= E))
  assert all(v.shape == () and v.dtype == jnp.float32 for v in routing.aux.values())


def test_gumbel_samples_in_training_and_averages_deterministically_at_inference():
  params = {"kernel": _kernel()}
  a, b = (_route("gumbel", params, rng=jax.random.PRNGKey(s)) for s in (0, 1))
  assert not np.allclose(a.probs, b.probs)
  np.testing.assert_allclose(jnp.take_along_axis(a.probs, a.indices, -1), a.weights)
  np.testing.assert_allclose(_route("gumbel", params).probs, _route("gumbel", params).probs)
  noiseless = _route("gumbel", params, eval_samples=0, temperature=2.0)
  np.testing.assert_allclose(noiseless.probs, jax.nn.softmax(noiseless.logits / 2.0), rtol=1e-6)
  averaged = _route("gumbel", params, eval_samples=200)
  np.testing.assert_allclose(jnp.sum(averaged.probs, -1), 1.0, rtol=1e-5)
  assert not np.allclose(averaged.probs, jax.nn.softmax(averaged.logits), atol=1e-3)
