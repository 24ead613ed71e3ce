"""The spiking classifier and its training run, shared by the ``spiking_surrogates`` and ``ultralif`` tables
(``Table(runner=run)``; the leading underscore keeps this module out of the table registry).

Network (UltraLIF's ``SNN`` / ``DeepSNN`` / ``TripleSNN``, arXiv 2602.11206 code ``ultralif/networks/fc.py``):
``layers`` hidden blocks ``Dense -> spiking neuron`` over the time axis, then a linear readout of the hidden
spikes averaged over time. Loss: cross-entropy plus ``rate_penalty`` times the mean hidden spike rate
(UltraLIF's sparsity penalty λ·s̄). Adam; batches drawn with replacement; rate-coded inputs are re-encoded
(fresh Bernoulli spikes) at every step, the test set once with a fixed key. The whole training run is one
jitted ``lax.scan`` over steps, compiled once per configuration and reused across seeds.

Config fields (``base_config()``): ``seed``; ``data.name`` (``digits_rate``, ``digits_latency``,
``randman``), ``data.steps`` (time steps T of the digit codes), ``data.gain`` (rate coding), ``data.randman``
(``gated_jax.data.spiking.randman`` kwargs, its own ``steps`` included); ``model.neuron``
(``gated_jax.layers.spiking.NEURONS``), ``model.neuron_kwargs``, ``model.hidden``, ``model.layers``;
``train.steps``, ``train.batch_size``, ``train.lr``, ``train.rate_penalty``, ``train.log_every``.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gated_jax.data import spiking as spiking_data
from gated_jax.layers.spiking import get_neuron

DATASETS = ("digits_rate", "digits_latency", "randman")


def base_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "seed": 0,
      "data": {"name": "digits_rate", "steps": 16, "gain": 1.0,
               "randman": {"classes": 10, "units": 20, "steps": 25, "samples_per_class": 200, "manifold_dim": 2}},
      "model": {"neuron": "lif", "neuron_kwargs": {}, "hidden": 128, "layers": 1},
      "train": {"steps": 400, "batch_size": 64, "lr": 5e-3, "rate_penalty": 0.0, "log_every": 20},
  })


class Classifier(nn.Module):
  """``layers`` x (Dense -> neuron) over time, then Dense of the time-averaged spikes (module docstring)."""
  neuron: str
  neuron_kwargs: Any
  hidden: int
  layers: int
  classes: int

  @nn.compact
  def __call__(self, spikes_BTF: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Logits ``(B, classes)`` and the mean hidden spike rate."""
    h, rates = spikes_BTF, []
    for i in range(self.layers):
      h = nn.Dense(self.hidden, name=f"dense_{i}")(h)
      h = get_neuron(self.neuron)(**dict(self.neuron_kwargs), name=f"neuron_{i}")(h)
      rates.append(jnp.mean(h))
    return nn.Dense(self.classes, name="readout")(jnp.mean(h, axis=1)), jnp.mean(jnp.stack(rates))


def _dataset(data: ml_collections.ConfigDict) -> tuple[spiking_data.Split, bool]:
  """The split and whether it is analog (rate-coded on the fly) rather than precomputed spikes."""
  if data.name not in DATASETS:
    raise ValueError(f"data.name: got {data.name!r}; allowed: {', '.join(DATASETS)}")
  if data.name == "randman":
    return spiking_data.randman(**data.randman.to_dict()), False
  split = spiking_data.digits()
  if data.name == "digits_rate":
    return split, True
  code = lambda x: spiking_data.latency_code(x, data.steps)
  return spiking_data.Split(code(split.x_train), split.y_train, code(split.x_test), split.y_test), False


@functools.lru_cache(maxsize=None)
def _compiled(key: str):
  """The jitted ``train(rng, x, y) -> (params, losses)`` and ``evaluate(params, rng, x, y)`` of a config
  (everything but the seed, as JSON), shared by every seed of a variant."""
  cfg = json.loads(key)
  model = Classifier(cfg["neuron"], tuple(sorted(cfg["neuron_kwargs"].items())), cfg["hidden"], cfg["layers"],
                     cfg["classes"])
  tx = optax.adam(cfg["lr"])
  analog, steps, gain = cfg["analog"], cfg["time_steps"], cfg["gain"]

  def encode(x, rng):
    if not analog:
      return x
    return jax.random.bernoulli(rng, gain * x[:, None, :], (x.shape[0], steps, x.shape[1])).astype(jnp.float32)

  def loss_fn(params, x, y):
    logits, rate = model.apply({"params": params}, x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + cfg["rate_penalty"] * rate, ce

  @jax.jit
  def train(rng, x_train, y_train):
    init_rng, rng = jax.random.split(rng)
    params = model.init(init_rng, encode(x_train[:2], init_rng))["params"]

    def step(carry, step_rng):
      params, opt_state = carry
      pick_rng, code_rng = jax.random.split(step_rng)
      idx = jax.random.randint(pick_rng, (cfg["batch_size"],), 0, x_train.shape[0])
      (_, ce), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, encode(x_train[idx], code_rng),
                                                                 y_train[idx])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), ce

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(rng, cfg["steps"]))
    return params, losses

  @jax.jit
  def evaluate(params, rng, x, y):
    logits, rate = model.apply({"params": params}, encode(x, rng))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return jnp.mean(jnp.argmax(logits, -1) == y), rate, ce

  return train, evaluate


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
  """Trains one classifier; final test ``accuracy``, ``spike_rate`` (hidden, mean), ``loss`` (test CE)."""
  del workdir  # nothing is written per run
  split, analog = _dataset(config.data)
  key = json.dumps({"neuron": config.model.neuron, "neuron_kwargs": config.model.neuron_kwargs.to_dict()
                    if hasattr(config.model.neuron_kwargs, "to_dict") else dict(config.model.neuron_kwargs),
                    "hidden": config.model.hidden, "layers": config.model.layers, "classes": split.num_classes,
                    "lr": config.train.lr, "steps": config.train.steps, "batch_size": config.train.batch_size,
                    "rate_penalty": config.train.rate_penalty, "analog": analog, "time_steps": config.data.steps,
                    "gain": config.data.gain}, sort_keys=True)
  train, evaluate = _compiled(key)
  rng = jax.random.PRNGKey(config.seed)
  params, losses = train(rng, jnp.asarray(split.x_train), jnp.asarray(split.y_train))
  accuracy, rate, loss = evaluate(params, jax.random.PRNGKey(12345), jnp.asarray(split.x_test),
                                  jnp.asarray(split.y_test))
  losses = np.asarray(losses)
  every = max(1, int(config.train.log_every))
  history = [{"step": int(s + 1), "loss": float(losses[max(0, s + 1 - every):s + 1].mean())}
             for s in range(every - 1, len(losses), every)]
  return {"metrics": {"accuracy": float(accuracy), "spike_rate": float(rate), "loss": float(loss)},
          "history": history}
