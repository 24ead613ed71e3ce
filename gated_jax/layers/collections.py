"""What a layer hands the trainer besides its output: auxiliary losses, per-layer metrics, a noise RNG stream and
the training step. The names below are the whole contract between ``gated_jax.layers`` and ``gated_jax.train``.

* **Auxiliary losses** (MoE load balance and z-loss, a spike-rate penalty, a gate-sparsity regulariser):
  ``sow_aux_loss(self, "load_balance", value)`` with a dimensionless scalar (a mean over this call's tokens).
  The trainer adds ``weight[name] * value`` summed over every layer that sowed ``name`` to the token
  cross-entropy, with the weights of ``config.train.aux_loss_weights``; a name sown without a configured weight
  is an error, so no loss is ever added (or dropped) silently. It logs the (unweighted) sum as ``aux/name`` and
  each layer as ``aux/path/name`` (e.g. ``aux/layer_1/mlp/load_balance``). Outside training the sow is a no-op.
* **Per-layer metrics** (load per expert, dropped fraction, router entropy, spike rate):
  ``sow_metric(self, "spike_rate", value)``; the trainer logs the mean over layers as ``name`` and each layer as
  ``path/name`` (e.g. ``layer_1/mlp/dropped_fraction``) in ``metrics.jsonl`` and TensorBoard.
* **Noise**: ``noise_key(self)`` is a fresh key of the ``NOISE_RNG`` stream during training and ``None`` when
  the caller passed no such stream (evaluation, decoding): stochastic gates must then be deterministic.
* **Parameter updates outside the optimizer** (DeepSeek-V3's auxiliary-loss-free expert bias):
  ``sow_param_update(self, "selection_bias", delta)`` with ``delta`` shaped like this module's parameter of that
  name; after the optimizer step the trainer adds ``delta`` (averaged over microbatches and devices, weighted by
  tokens) to the parameter. The layer must keep that parameter out of the gradient (``stop_gradient``), so the
  optimizer leaves it alone; outside training the sow is a no-op.
* **Training step**: a mixer or MLP class that sets ``uses_train_step: ClassVar[bool] = True`` receives
  ``train_step`` (an int32 scalar, or ``None`` outside training) as a keyword of ``__call__``, e.g. for a
  temperature schedule.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

AUX_LOSS = "aux_loss"
LAYER_METRICS = "layer_metrics"
NOISE_RNG = "gating"
PARAM_UPDATES = "param_updates"


def sow_aux_loss(module: nn.Module, name: str, value: jax.Array) -> None:
  """Records a scalar auxiliary loss of this call (float32) for the trainer (module docstring)."""
  module.sow(AUX_LOSS, name, jnp.asarray(value, jnp.float32).reshape(()))


def sow_metric(module: nn.Module, name: str, value: jax.Array) -> None:
  """Records a scalar metric of this call (float32) for the metrics stream (module docstring)."""
  module.sow(LAYER_METRICS, name, jnp.asarray(value, jnp.float32).reshape(()))


def sow_param_update(module: nn.Module, name: str, delta: jax.Array) -> None:
  """Records a change to ``module``'s parameter ``name`` that the trainer applies after the step (float32)."""
  module.sow(PARAM_UPDATES, name, jnp.asarray(delta, jnp.float32))


def noise_key(module: nn.Module) -> jax.Array | None:
  """A fresh key of the ``NOISE_RNG`` stream, or None when the caller gave none (deterministic mode)."""
  return module.make_rng(NOISE_RNG) if module.has_rng(NOISE_RNG) else None


__all__ = ["AUX_LOSS", "LAYER_METRICS", "NOISE_RNG", "PARAM_UPDATES", "noise_key", "sow_aux_loss", "sow_metric",
           "sow_param_update"]
