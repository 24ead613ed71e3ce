"""The optimiser of ``config.optim``: optax AdamW on a warmup + decay schedule, with global-norm clipping.

Fields (``experiments/configs/lm.py``): ``lr`` (peak), ``warmup_steps`` (linear from 0), ``schedule_steps``
(length of the schedule; default ``train.steps``: set it to stop a run early, or extend one, without changing
the learning rate of the steps already taken), ``schedule``
(``warmup_cosine``: cosine to ``min_lr_ratio * lr``; ``warmup_linear``: linear to it; ``constant``: flat
after warmup), ``b1``, ``b2``, ``eps``, ``weight_decay`` (decoupled, Loshchilov & Hutter; applied only to
matrices, i.e. parameters with ``ndim >= 2``, not to norm scales, biases or gate scalars), ``clip_norm``
(global-norm clipping before AdamW; ``0`` or ``None`` disables it).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

SCHEDULES = ("warmup_cosine", "warmup_linear", "constant")


def _field(optim_config: Any, name: str, default: Any) -> Any:
  return optim_config[name] if name in optim_config and optim_config[name] is not None else default


def learning_rate_schedule(optim_config: Any, total_steps: int) -> optax.Schedule:
  """The learning rate as a function of the optimiser step (0-based)."""
  lr = float(optim_config["lr"])
  warmup = int(_field(optim_config, "warmup_steps", 0))
  kind = _field(optim_config, "schedule", "warmup_cosine")
  end = lr * float(_field(optim_config, "min_lr_ratio", 0.0))
  if not lr > 0:
    raise ValueError(f"optim.lr: got {lr!r}; allowed: a positive float")
  if warmup < 0 or warmup > total_steps:
    raise ValueError(f"optim.warmup_steps: got {warmup}; allowed: 0 to the schedule length {total_steps} "
                     "(optim.schedule_steps or train.steps)")
  if kind not in SCHEDULES:
    raise ValueError(f"optim.schedule: got {kind!r}; allowed: {', '.join(SCHEDULES)}")
  if kind == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), end)
  decay_steps = max(total_steps - warmup, 1)
  after = optax.linear_schedule(lr, end, decay_steps) if kind == "warmup_linear" else optax.constant_schedule(lr)
  return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)), after], [warmup])


def _decay_mask(params: Any) -> Any:
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_config: Any, total_steps: int) -> optax.GradientTransformation:
  """``clip_by_global_norm`` then ``adamw`` on ``learning_rate_schedule``."""
  clip = _field(optim_config, "clip_norm", 0.0)
  adamw = optax.adamw(learning_rate_schedule(optim_config, total_steps),
                      b1=float(_field(optim_config, "b1", 0.9)), b2=float(_field(optim_config, "b2", 0.95)),
                      eps=float(_field(optim_config, "eps", 1e-8)),
                      weight_decay=float(_field(optim_config, "weight_decay", 0.0)), mask=_decay_mask)
  if clip:
    return optax.chain(optax.clip_by_global_norm(float(clip)), adamw)
  return adamw
