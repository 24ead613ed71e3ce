"""Residual-branch gates that let tokens skip computation, used by ``gated_jax.models.lm.Block``.

**GateSkip** (Laitenberger, Kopiczko, Snoek & Asano 2025, "What Layers When: Learning to Skip Compute in LLMs
with Residual Gates", arXiv 2510.13876). Every gated branch (mixer or MLP) of a pre-norm block becomes

    u = norm(x),   g = σ(W_g sg(u) + b_g),   x ← x + keep ⊙ g ⊙ f(u),   importance s_t = mean_j g_tj

with a vector gate (``W_g`` d×d; ``"scalar"``: d×1) initialised near identity (``b_g = 5``,
``W_g ~ N(0, 0.01²)``, as the authors' code) whose input is stop-gradient (the gate learns only through the
product), and the sparsity regulariser ``mean_modules mean_tokens mean_j g²`` sown as the auxiliary loss
``"gateskip_sparsity"`` (weight ``λ_s``; 1.0 in the released runs). ``keep`` drops the branch of the tokens
that skip it (:data:`SKIP_RULES`):

* training (``train_step`` given): the quantile rule at a budget ``ρ(step)`` that rises linearly from 0 to
  ``train_budget`` over ``budget_steps`` steps from ``budget_start`` (the authors' code: 0 → 20 %);
* ``"quantile"``: skip the tokens whose importance is at or below the ``budget`` quantile of this call's
  tokens (the authors' rule; it looks at the whole batch, so it is for full-sequence evaluation and for
  calibrating thresholds, not for decoding);
* ``"threshold"``: skip ``s_t ≤ thresholds[module]``, one number per gated module (from
  :func:`gated_jax.models.gateskip.calibrate_thresholds`): each token is decided from its own gate, so the
  rule is causal and decoding agrees with the full forward;
* ``"random"``: skip each token with probability ``budget`` (a fixed key per module): the equal-budget
  control;
* ``"none"``: never skip.

Position 0 of every sequence (and of every packed segment) is never skipped (the paper's gates treat BOS as
an anchor) and padding (``segment_ids == 0``) does not count. Skipping is a mask: the branch still runs on
every token, so the mixer's KV cache / recurrent state keeps every token (as the query-side compaction the
paper measures, which still writes keys and values); only the skipped tokens' branch outputs are dropped. The
counted skipped fraction is an estimate of the compute a compacting implementation would save, not a
measured saving.

**Skip the middle** (Lawson & Aitchison 2025, "Learning to Skip the Middle Layers of Transformers",
arXiv 2506.21103): a per-token scalar gate on both branches of layer ``i`` from cumulative ReLU routers on the
first half of the stack, ``r_i = ReLU(w_i·x + b_i)``, ``m_i = Σ_{j≤i} r_j``, ``g_i = 1 − clip(m_i, 0, 1)``;
layer ``i ≥ L/2`` reuses ``g_{L−1−i}``, so a token whose ``m`` reaches 1 at layer ``k`` skips the symmetric
middle span ``k … L−1−k``. Its attention mixers add ``log g_j`` to the scores of key ``j`` (``key_weights``),
so later tokens do not attend to positions that skipped the layer. The paper steers each router with a
proportional controller towards mean-gate targets ``μ*`` falling linearly from 1 (outer) to 0.5 (inner),
with variance targets ``μ*(1 − μ*)``; without a controller hook in the trainer we penalise the squared
deviations from those targets instead (auxiliary loss ``"skip_middle_sparsity"``) [derived].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gated_jax.layers.collections import sow_aux_loss, sow_metric

SKIP_RULES = ("none", "quantile", "threshold", "random")
GRANULARITIES = ("vector", "scalar")
DECODE_RULES = ("none", "threshold")


def _number(name: str, value: Any, low: float, high: float | None = None) -> None:
  ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value >= low
  if not ok or (high is not None and value > high):
    allowed = f"a number in [{low}, {high}]" if high is not None else f"a number >= {low}"
    raise ValueError(f"{name}: got {value!r}; allowed: {allowed}")


def _int(name: str, value: Any, low: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"{name}: got {value!r}; allowed: an int >= {low}")


def _from_mapping(cls: type, name: str, mapping: Any, **fixed: Any) -> Any:
  """``cls(**mapping, **fixed)``, validated; ValueError naming unknown fields or bad values."""
  if not isinstance(mapping, Mapping):
    raise ValueError(f"{name}: got {mapping!r}; allowed: None or a mapping of {cls.__name__} fields")
  allowed = [f.name for f in dataclasses.fields(cls) if f.name not in fixed]
  unknown = sorted(set(mapping) - set(allowed))
  if unknown:
    raise ValueError(f"{name}: got unknown fields {unknown}; allowed: {', '.join(allowed)}")
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in mapping.items()}
  spec = cls(**values, **fixed)
  spec.validate()
  return spec


@dataclasses.dataclass(frozen=True)
class GateSkipSpec:
  """GateSkip settings (module docstring). ``DecoderLM(gateskip={...})`` takes these fields as a mapping.

  Attributes:
    granularity: ``"vector"`` (one gate per channel) or ``"scalar"`` (one per token).
    bias_init: initial gate bias ``b_g``.
    kernel_stddev: standard deviation of the initial ``W_g``.
    stop_gradient_input: feed the gate ``sg(norm(x))``.
    train_budget: skip fraction reached by the training schedule (0: no training-time skipping).
    budget_start: step at which the training budget starts rising.
    budget_steps: steps over which it rises to ``train_budget``.
    rule: evaluation / decoding rule (:data:`SKIP_RULES`).
    budget: skipped fraction of the ``"quantile"`` and ``"random"`` rules.
    thresholds: per-module importance thresholds of the ``"threshold"`` rule, in module order: layer by
      layer, the mixer's before the MLP's.
    seed: key of the ``"random"`` rule.
    loss: auxiliary-loss name of the sparsity regulariser.
    num_modules: gated branches in the model (set by ``DecoderLM``; the regulariser is a mean over them).
  """
  granularity: str = "vector"
  bias_init: float = 5.0
  kernel_stddev: float = 0.01
  stop_gradient_input: bool = True
  train_budget: float = 0.0
  budget_start: int = 0
  budget_steps: int = 1
  rule: str = "none"
  budget: float = 0.0
  thresholds: tuple[float, ...] = ()
  seed: int = 0
  loss: str = "gateskip_sparsity"
  num_modules: int = 1

  @classmethod
  def from_mapping(cls, mapping: Any, num_modules: int) -> GateSkipSpec:
    return _from_mapping(cls, "gateskip", mapping, num_modules=num_modules)

  def validate(self) -> None:
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"gateskip.granularity: got {self.granularity!r}; allowed: {', '.join(GRANULARITIES)}")
    if self.rule not in SKIP_RULES:
      raise ValueError(f"gateskip.rule: got {self.rule!r}; allowed: {', '.join(SKIP_RULES)}")
    _number("gateskip.kernel_stddev", self.kernel_stddev, 0.0)
    _number("gateskip.bias_init", self.bias_init, float("-inf"))
    _number("gateskip.train_budget", self.train_budget, 0.0, 1.0)
    _number("gateskip.budget", self.budget, 0.0, 1.0)
    _int("gateskip.budget_start", self.budget_start, 0)
    _int("gateskip.budget_steps", self.budget_steps, 1)
    _int("gateskip.seed", self.seed, 0)
    if not isinstance(self.stop_gradient_input, bool):
      raise ValueError(f"gateskip.stop_gradient_input: got {self.stop_gradient_input!r}; allowed: True or False")
    thresholds = self.thresholds
    if self.rule == "threshold" and (not isinstance(thresholds, tuple) or len(thresholds) != self.num_modules
                                     or not all(isinstance(t, (int, float)) for t in thresholds)):
      raise ValueError(f"gateskip.thresholds: got {thresholds!r}; allowed: {self.num_modules} numbers, one per "
                       "gated module (rule='threshold')")

  def training_budget(self, train_step: jax.Array) -> jax.Array:
    """``ρ(step)``: 0 until ``budget_start``, then linear to ``train_budget`` over ``budget_steps``."""
    progress = (jnp.asarray(train_step, jnp.float32) - self.budget_start) / self.budget_steps
    return self.train_budget * jnp.clip(progress, 0.0, 1.0)


def eligible_tokens(positions_BT: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
  """Tokens that may skip: not the first of a sequence or packed segment, not padding."""
  eligible = positions_BT > 0
  return eligible if segment_ids is None else eligible & (segment_ids != 0)


def quantile_threshold(importance_BT: jax.Array, eligible_BT: jax.Array, fraction: jax.Array) -> jax.Array:
  """The linear-interpolated ``fraction`` quantile of the eligible tokens' importance (a scalar)."""
  return jnp.nanquantile(jnp.where(eligible_BT, importance_BT, jnp.nan), fraction)


class ResidualGate(nn.Module):
  """GateSkip's gate on one residual branch: returns ``keep ⊙ g ⊙ y`` (module docstring).

  Attributes:
    spec: the model's GateSkip settings.
    module_index: this module's place in the order of ``spec.thresholds``.
    dtype: dtype of the gate projection.
  """
  spec: GateSkipSpec
  module_index: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, u_BTD: jax.Array, y_BTD: jax.Array, *, positions_BT: jax.Array,
               segment_ids: jax.Array | None, train_step: jax.Array | None) -> jax.Array:
    spec = self.spec
    width = u_BTD.shape[-1] if spec.granularity == "vector" else 1
    gate_in = jax.lax.stop_gradient(u_BTD) if spec.stop_gradient_input else u_BTD
    logits = nn.Dense(width, dtype=self.dtype, name="proj",
                      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(spec.kernel_stddev),
                                                               ("embed", None)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.constant(spec.bias_init), (None,))
                      )(gate_in)
    g_BTW = jax.nn.sigmoid(logits.astype(jnp.float32))
    importance_BT = jnp.mean(g_BTW, axis=-1)
    sow_aux_loss(self, spec.loss, jnp.mean(jnp.square(g_BTW)) / spec.num_modules)
    eligible_BT = eligible_tokens(positions_BT, segment_ids)
    skip_BT = self._skip(importance_BT, eligible_BT, train_step)
    sow_metric(self, "gateskip_gate", jnp.mean(importance_BT))
    sow_metric(self, "gateskip_skipped", jnp.mean(skip_BT.astype(jnp.float32)))
    if self.is_mutable_collection("intermediates"):
      first_BT1 = importance_BT[:, :1]
      below = jnp.sum((importance_BT < first_BT1) & eligible_BT, -1) / jnp.maximum(jnp.sum(eligible_BT, -1), 1)
      self.sow("intermediates", "first_token_rank", jnp.mean(below))
    keep_BT1 = 1.0 - skip_BT.astype(jnp.float32)[..., None]
    return (y_BTD.astype(jnp.float32) * g_BTW * keep_BT1).astype(y_BTD.dtype)

  def _skip(self, importance_BT: jax.Array, eligible_BT: jax.Array, train_step: jax.Array | None) -> jax.Array:
    """Boolean ``(B, T)``: the tokens that skip this branch."""
    spec = self.spec
    if train_step is not None:
      if spec.train_budget == 0:
        return jnp.zeros_like(eligible_BT)
      return self._quantile_skip(importance_BT, eligible_BT, spec.training_budget(train_step))
    if spec.rule == "quantile":
      return self._quantile_skip(importance_BT, eligible_BT, jnp.float32(spec.budget))
    if spec.rule == "threshold":
      return eligible_BT & (importance_BT <= spec.thresholds[self.module_index])
    if spec.rule == "random":
      key = jax.random.fold_in(jax.random.PRNGKey(spec.seed), self.module_index)
      return eligible_BT & (jax.random.uniform(key, importance_BT.shape) < spec.budget)
    return jnp.zeros_like(eligible_BT)

  def _quantile_skip(self, importance_BT, eligible_BT, fraction) -> jax.Array:
    threshold = quantile_threshold(importance_BT, eligible_BT, fraction)
    if self.is_mutable_collection("intermediates"):
      self.sow("intermediates", "threshold", threshold)
    return eligible_BT & (importance_BT <= threshold) & (fraction > 0)


@dataclasses.dataclass(frozen=True)
class SkipMiddleSpec:
  """Skip-the-middle settings (module docstring). ``DecoderLM(skip_middle={...})`` takes these fields.

  Attributes:
    router_stddev: standard deviation of the initial router weights (0: zero init, the paper's config default;
      its gated runs use 0.02).
    outer_target: mean-gate target of the outermost router (layer 0).
    inner_target: mean-gate target of the innermost router (layer L/2 − 1); linear in between.
    loss: auxiliary-loss name of the target penalty.
    num_layers: layers of the model (set by ``DecoderLM``; even).
  """
  router_stddev: float = 0.02
  outer_target: float = 1.0
  inner_target: float = 0.5
  loss: str = "skip_middle_sparsity"
  num_layers: int = 2

  @classmethod
  def from_mapping(cls, mapping: Any, num_layers: int) -> SkipMiddleSpec:
    return _from_mapping(cls, "skip_middle", mapping, num_layers=num_layers)

  def validate(self) -> None:
    _number("skip_middle.router_stddev", self.router_stddev, 0.0)
    _number("skip_middle.outer_target", self.outer_target, 0.0, 1.0)
    _number("skip_middle.inner_target", self.inner_target, 0.0, 1.0)
    if self.num_layers % 2:
      raise ValueError(f"num_layers: got {self.num_layers} with skip_middle; allowed: an even number (the "
                       "skipped span is symmetric about the middle of the stack)")

  def target(self, router: int) -> float:
    """Mean-gate target ``μ*`` of router ``router`` (0 … L/2 − 1)."""
    half = self.num_layers // 2
    return self.outer_target + (self.inner_target - self.outer_target) * router / max(half - 1, 1)

  def layer_gate(self, layer: int) -> int:
    """Index of the router whose gate layer ``layer`` uses."""
    return layer if layer < self.num_layers // 2 else self.num_layers - 1 - layer


class SkipMiddleRouter(nn.Module):
  """Router ``i < L/2`` of skip-the-middle: ``(gate_BT, cumulative_BT)`` from the residual entering layer
  ``i`` and the cumulative router output of the layers before it (module docstring).

  Attributes:
    spec: the model's skip-middle settings.
    router: this router's index ``i``.
  """
  spec: SkipMiddleSpec
  router: int

  @nn.compact
  def __call__(self, x_BTD: jax.Array, cumulative_BT: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    init = nn.with_logical_partitioning(nn.initializers.normal(self.spec.router_stddev)
                                        if self.spec.router_stddev > 0 else nn.initializers.zeros, ("embed", None))
    r_BT = jax.nn.relu(nn.Dense(1, kernel_init=init, name="proj")(x_BTD.astype(jnp.float32))[..., 0])
    cumulative_BT = r_BT if cumulative_BT is None else cumulative_BT + r_BT
    gate_BT = 1.0 - jnp.clip(cumulative_BT, 0.0, 1.0)
    target = self.spec.target(self.router)
    mean, var = jnp.mean(gate_BT), jnp.var(gate_BT)
    penalty = jnp.square(mean - target) + jnp.square(var - target * (1.0 - target))
    sow_aux_loss(self, self.spec.loss, penalty / (self.spec.num_layers // 2))
    sow_metric(self, "skip_middle_gate", mean)
    sow_metric(self, "skip_middle_active", jnp.mean((gate_BT > 0).astype(jnp.float32)))
    return gate_BT, cumulative_BT


__all__ = ["DECODE_RULES", "GRANULARITIES", "GateSkipSpec", "ResidualGate", "SKIP_RULES", "SkipMiddleRouter",
           "SkipMiddleSpec", "eligible_tokens", "quantile_threshold"]
