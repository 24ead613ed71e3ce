"""Every causal gated linear-attention mixer trains as the mixer of ``gated_jax.models.DecoderLM``, and a hybrid
(GLA + sliding-window gated attention) LM builds, runs and decodes consistently with its full forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gated_jax.models import generate, lm_from_config

VOCAB, SEQ, BATCH, STEPS = 16, 16, 8, 25
CAUSAL_MIXERS = ("linear_attention", "retnet", "lightning", "gla", "hgrn2", "mlstm", "deltanet", "gated_deltanet",
                 "gsa")
# A period-4 pattern with a repeated token: after 3 the next token is 5 or 7 depending on the one before.
PATTERN = np.array([3, 5, 3, 7])


pytestmark = pytest.mark.usefixtures("fast_compile")


def pattern_batch() -> jax.Array:
  """``(BATCH, SEQ + 1)`` rows of the repeated pattern, each starting at its own phase."""
  return jnp.asarray(np.stack([np.tile(PATTERN, SEQ)[s:s + SEQ + 1] for s in range(BATCH)]), jnp.int32)


def next_token_loss(model, params, tokens_BT):
  logits = model.apply({"params": params}, tokens_BT[:, :-1])
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BT[:, 1:]))


# Default run: one mixer per recurrence kind (per-channel decay, delta rule, mLSTM's normaliser); -m slow: all.
TRAINED_BY_DEFAULT = ("gla", "gated_deltanet", "mlstm")


@pytest.mark.parametrize("mixer", [m if m in TRAINED_BY_DEFAULT else pytest.param(m, marks=pytest.mark.slow)
                                   for m in CAUSAL_MIXERS])
def test_mixer_trains_in_decoder_lm(mixer):
  """One block, no MLP: only the mixer can map the current (and previous) token to the next one."""
  model = lm_from_config(dict(vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=2, mixer=mixer, mlp="none",
                              max_len=SEQ, mixer_kwargs=dict(chunk_size=4)))
  tokens = pattern_batch()
  params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens[:, :-1])["params"]
  optimizer = optax.adamw(1e-2)

  @jax.jit
  def train(params):
    def step(carry, _):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(next_token_loss, argnums=1)(model, params, tokens)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), None, length=STEPS)
    return losses, next_token_loss(model, params, tokens)

  losses, final = train(params)
  assert np.all(np.isfinite(losses)) and np.isfinite(final)
  assert float(final) < 0.4 * float(losses[0]), (mixer, losses)


def hybrid_lm():
  """GLA (with short conv), GLA, sliding-window gated attention."""
  return lm_from_config(dict(vocab_size=VOCAB, d_model=32, num_layers=3, num_heads=2, max_len=16,
                             mixer=("gla", "gla", "gated_attention"),
                             mixer_kwargs=({"use_short_conv": True}, {}, {"window": 4})))


def test_hybrid_lm_builds_and_runs_causally():
  model = hybrid_lm()
  specs = model.layer_specs()
  assert [name for name, _ in specs] == ["gla", "gla", "gated_attention"] and specs[2][1]["window"] == 4
  tokens = pattern_batch()[:2, :SEQ]
  params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"]
  apply = jax.jit(model.apply)
  logits = apply({"params": params}, tokens)
  assert logits.shape == (2, SEQ, VOCAB) and np.all(np.isfinite(logits))
  changed = apply({"params": params}, tokens.at[:, -1].set((tokens[:, -1] + 1) % VOCAB))
  np.testing.assert_allclose(changed[:, :-1], logits[:, :-1], atol=1e-5, rtol=1e-5)
  assert not np.allclose(changed[:, -1], logits[:, -1], atol=1e-4)


@pytest.mark.slow
def test_hybrid_lm_greedy_generation_matches_full_forward():
  """Greedy generation through the decode caches of both kinds of mixer picks the argmax of the full forward
  at every generated step."""
  model, prompt_len, steps = hybrid_lm(), 5, 4
  tokens = pattern_batch()[:2, :prompt_len]
  params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"]
  out = generate(model, params, tokens, steps=steps)
  assert out.shape == (2, prompt_len + steps)
  logits = model.apply({"params": params}, out)
  np.testing.assert_array_equal(out[:, prompt_len:], jnp.argmax(logits[:, prompt_len - 1:-1], axis=-1))
