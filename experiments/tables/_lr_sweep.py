"""Trains one model at several learning rates at once: the trainer's step (``gated_jax.train.step``), vmapped
over copies of the model that differ only in their learning rate, on the same batches.

AdamW's update is linear in the learning rate (optax's ``adamw`` ends in ``scale_by_learning_rate``, after the
decoupled weight decay), so the optimiser is ``config.optim`` at a peak learning rate of 1 (same warmup and
schedule shape) followed by ``optax.scale(lr)`` whose factor lives in the optimiser state; a vmapped
state holds one factor per copy. One compilation serves every learning rate, and it is cached across calls
with the same model and shapes (the seeds of a table), so a sweep costs about one run's compile.

Used by tables whose claims are "best over learning rates" (Zoology's MQAR protocol). Data come as numpy
arrays: ``train`` batches drawn in order (fresh examples every step), ``eval`` batches averaged at the end.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gated_jax.train import step as train_step_lib
from gated_jax.train.optim import learning_rate_schedule, make_optimizer


@functools.lru_cache(maxsize=4)
def _compiled(model_json: str, optim_json: str, train_json: str, steps: int, seq_len: int):
  """(model, tx, jitted vmapped init / train / eval) for one model, optimiser shape and sequence length."""
  model_config = json.loads(model_json)
  config = ml_collections.ConfigDict({"model": model_config, "train": json.loads(train_json)})
  model = train_step_lib.make_model(config)
  unit = {**json.loads(optim_json), "lr": 1.0}
  tx = optax.chain(make_optimizer(unit, steps), optax.inject_hyperparams(optax.scale)(step_size=1.0))
  fns = train_step_lib.StepFns(model, tx, learning_rate_schedule(unit, steps))
  init_one = train_step_lib.unboxed(train_step_lib.boxed_state_fn(
      model, tx, jax.ShapeDtypeStruct((1, seq_len), jnp.int32)))

  def init(rng: jax.Array, lrs: jax.Array) -> dict[str, Any]:
    state = init_one(rng)  # one initialisation shared by every learning rate
    copies = jax.tree.map(lambda x: jnp.broadcast_to(x, (lrs.shape[0], *x.shape)), state)
    copies["opt_state"][1].hyperparams["step_size"] = lrs
    return copies

  train = jax.jit(jax.vmap(fns.train_step, in_axes=(0, None)), donate_argnums=0)
  evaluate = jax.jit(jax.vmap(fns.eval_step, in_axes=(0, None)))
  return jax.jit(init), train, evaluate


def _batches(arrays: Mapping[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  for start in range(0, len(arrays["inputs"]) - batch_size + 1, batch_size):
    yield {k: v[start:start + batch_size] for k, v in arrays.items()}


def train_lr_sweep(config: ml_collections.ConfigDict, lrs: Sequence[float], train: Mapping[str, np.ndarray],
                   evaluation: Mapping[str, np.ndarray], *, log_every: int) -> dict[str, Any]:
  """Trains ``config.model`` for ``config.train.steps`` steps at every learning rate of ``lrs``.

  Args:
    config: an LM config (``experiments/configs/lm.py`` groups); ``optim.lr`` is ignored.
    lrs: peak learning rates.
    train: ``inputs`` / ``targets`` / ``weights`` arrays of at least ``steps * data.batch_size`` examples.
    evaluation: the same fields; evaluated in batches of ``data.batch_size`` after the last step.
    log_every: steps between history entries.
  Returns:
    ``{"lrs", "eval": [{"loss", "accuracy"} per lr], "history": [{"step", "loss": [...], "accuracy": [...]}],
    "num_params"}``.
  """
  steps, batch = int(config.train.steps), int(config.data.batch_size)
  if len(train["inputs"]) < steps * batch:
    raise ValueError(f"train: got {len(train['inputs'])} examples; allowed: at least steps * batch_size = "
                     f"{steps * batch}")
  dump = lambda group: json.dumps(group.to_dict(), sort_keys=True, default=list)
  init, train_step, eval_step = _compiled(dump(config.model), dump(config.optim), dump(config.train), steps,
                                          int(config.data.seq_len))
  lrs_array = jnp.asarray(lrs, jnp.float32)
  state = init(jax.random.PRNGKey(config.seed), lrs_array)
  num_params = sum(math.prod(x.shape[1:]) for x in jax.tree.leaves(state["params"]))
  history = []
  for i, batch_arrays in enumerate(_batches(train, batch)):
    if i == steps:
      break
    state, metrics = train_step(state, batch_arrays)
    if (i + 1) % log_every == 0 or i + 1 == steps:
      metrics = jax.device_get(metrics)
      if not np.all(metrics["finite"]):
        raise FloatingPointError(f"non-finite loss at step {i + 1} for learning rates "
                                 f"{[lr for lr, ok in zip(lrs, metrics['finite']) if not ok]}")
      history.append({"step": i + 1, "loss": metrics["loss"].tolist(), "accuracy": metrics["accuracy"].tolist()})
  totals = None
  for batch_arrays in _batches(evaluation, batch):
    sums = jax.device_get(eval_step(state["params"], batch_arrays))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  weight = np.maximum(totals["weight_sum"], 1.0)
  results = [{"loss": float(l), "accuracy": float(a)}
             for l, a in zip(totals["loss_sum"] / weight, totals["correct_sum"] / weight)]
  return {"lrs": list(lrs), "eval": results, "history": history, "num_params": num_params}
