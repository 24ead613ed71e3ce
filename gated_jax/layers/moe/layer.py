"""The mixture-of-experts MLP, registered in ``MLPS`` as ``"moe"``: a router from ``ROUTERS``, GLU experts,
optional shared experts, dropless or capacity dispatch, expert parallelism, auxiliary losses, metrics and
MoDES-style skipping of low-weight experts at inference."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from gated_jax.layers.collections import sow_aux_loss, sow_metric
from gated_jax.layers.moe import dispatch as dispatch_lib
from gated_jax.layers.moe import losses, parallel
from gated_jax.layers.moe.routing import ROUTERS, check_choice, check_positive_int, deactivate
from gated_jax.layers.registry import MLPS

DISPATCHES = ("dropless", "capacity")
EXPERT_ACTIVATIONS = {"swiglu": jax.nn.silu, "geglu": lambda h: jax.nn.gelu(h, approximate=False),
                      "reglu": jax.nn.relu}
# Weights for config.train.aux_loss_weights covering every auxiliary loss an MoE layer may sow: Switch's
# 1e-2 (arXiv 2101.03961 §2.2), ST-MoE's z-loss 1e-3 (arXiv 2202.08906 §3.1), tensor2tensor's 1e-2 for noisy
# top-k's importance and load, DeepSeek-V3's 1e-4 for its sequence-wise balance loss (arXiv 2412.19437
# §2.1.2), and 1e-4 for the top-p entropy loss (an assumption: the weight of arXiv 2403.07652 is not confirmed).
DEFAULT_AUX_LOSS_WEIGHTS = {"load_balance": 1e-2, "router_z": 1e-3, "importance": 1e-2, "load": 1e-2,
                            "sequence_balance": 1e-4, "top_p_entropy": 1e-4}
# The variable collection of calibrated MoDES thresholds (``gated_jax.layers.moe.calibration``): one scalar
# ``threshold`` per MoE layer, passed at inference as ``model.apply({"params": ..., SKIP_THRESHOLDS: ...}, ...)``.
SKIP_THRESHOLDS = "moe_skip"
_INIT_STDDEV = 0.02


@MLPS.register("moe")
class MoE(nn.Module):
  """Sparse mixture of GLU experts (Shazeer et al. 2017, arXiv 1701.06538; Switch Transformer arXiv 2101.03961;
  DeepSeekMoE arXiv 2401.06066 for shared experts): ``y = Σ_slots w · expert(x) [+ shared(x)]``.

  Attributes:
    d_model: input/output width.
    hidden_dim: hidden width of *each* expert (a dense MLP of width ``k · hidden_dim`` has the same active
      parameters).
    num_experts: routed experts E.
    k: routing slots per token (``ROUTERS`` entries document how they use it).
    router: a ``ROUTERS`` name; ``router_kwargs`` its extra fields.
    activation: the experts' GLU (``swiglu``, ``geglu``, ``reglu``); shared experts use the same MLP.
    num_shared_experts: experts every token uses (one dense GLU of width ``num_shared_experts · hidden_dim``).
    dispatch: ``"dropless"`` (sort, grouped matmul, unsort; nothing dropped) or ``"capacity"`` (per-sequence
      buffers of ``ceil(capacity_factor · T · k / E)`` slots per expert, overflow dropped in ``priority``
      order, ``"token_order"`` or ``"top1_first"``; see :mod:`gated_jax.layers.moe.dispatch`).
    causal: the layer serves a causal model (expert choice then raises unless its ``allow_noncausal`` is set;
      ``top1_first`` priority with k > 1 is rejected, since a token's later slots depend on later tokens).
    skip_threshold: MoDES-style expert skipping at inference (Huang et al. 2025, arXiv 2511.15690 §3): outside
      training (``train_step`` None), a slot whose importance ``skip_scale · weight`` is below the threshold is
      skipped (0 disables; ``skip_scale`` is the layer's globally calibrated factor α). A ``threshold`` in the
      ``SKIP_THRESHOLDS`` variable collection (set by ``calibration.calibrate_skip_thresholds``, α folded in)
      replaces both: slots with ``weight < threshold`` are skipped.
    gmm_implementation: ``pallas_kernels.grouped_matmul``'s ``implementation`` (None: auto).
    dtype: compute dtype of the experts (routing is always float32); param_dtype: parameter dtype.

  Sown auxiliary losses (``gated_jax.layers.collections.sow_aux_loss``; weights in
  ``config.train.aux_loss_weights``, see ``DEFAULT_AUX_LOSS_WEIGHTS``): ``load_balance`` (1 when balanced),
  ``router_z``, and the router's own (e.g. ``importance``, ``load``, ``sequence_balance``, ``top_p_entropy``).
  Sown metrics: ``load_cv``, ``load_max_over_mean`` (over experts, from the router's assignments),
  ``dropped_fraction``, ``router_entropy``, ``active_experts`` (mean slots used per token) and, when skipping,
  ``skipped_fraction``.

  Expert parallelism: under a mesh whose ``expert`` axis is larger than 1 (``jax.set_mesh``), the dropless path
  shards the experts over it (:mod:`gated_jax.layers.moe.parallel`) when the batch divides the batch shards
  (initialisation with one example computes every expert on every device instead); the capacity path shards
  its expert buffers.
  """
  d_model: int
  hidden_dim: int
  num_experts: int = 8
  k: int = 2
  router: str = "topk_softmax"
  router_kwargs: Mapping[str, Any] | None = None
  activation: str = "swiglu"
  num_shared_experts: int = 0
  dispatch: str = "dropless"
  capacity_factor: float = 1.25
  priority: str = "token_order"
  causal: bool = True
  skip_threshold: float = 0.0
  skip_scale: float = 1.0
  gmm_implementation: str | Sequence[str] | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  uses_train_step: ClassVar[bool] = True

  def _check_fields(self) -> None:
    for name in ("d_model", "hidden_dim", "num_experts", "k"):
      check_positive_int(name, getattr(self, name))
    if isinstance(self.num_shared_experts, bool) or not isinstance(self.num_shared_experts, int) \
        or self.num_shared_experts < 0:
      raise ValueError(f"num_shared_experts: got {self.num_shared_experts!r}; allowed: an int >= 0")
    check_choice("dispatch", self.dispatch, DISPATCHES)
    check_choice("priority", self.priority, dispatch_lib.PRIORITIES)
    check_choice("activation", self.activation, tuple(EXPERT_ACTIVATIONS))
    if not self.capacity_factor > 0:
      raise ValueError(f"capacity_factor: got {self.capacity_factor!r}; allowed: a float > 0")
    if not self.skip_threshold >= 0:
      raise ValueError(f"skip_threshold: got {self.skip_threshold!r}; allowed: a float >= 0 (0: no skipping)")
    if self.causal and self.priority == "top1_first" and self.dispatch == "capacity" and self.k > 1:
      raise ValueError("priority: got 'top1_first' with causal=True and k > 1; a token's later slots would "
                       "depend on later tokens' first choices; allowed: 'token_order', or causal=False")

  def _router(self) -> nn.Module:
    cls = ROUTERS.get(self.router)
    kwargs = dict(self.router_kwargs or {})
    if "causal" in {f.name for f in dataclasses.fields(cls)}:
      kwargs.setdefault("causal", self.causal)
    return cls(num_experts=self.num_experts, k=self.k, name="router", **kwargs)

  def _experts(self) -> dispatch_lib.Experts:
    def weight(name, shape, axes):
      init = nn.with_logical_partitioning(nn.initializers.normal(_INIT_STDDEV), axes)
      return self.param(name, init, shape, self.param_dtype).astype(self.dtype)
    e, d, h = self.num_experts, self.d_model, self.hidden_dim
    return dispatch_lib.Experts(weight("wi", (e, d, h), ("expert", "embed", "mlp")),
                                weight("wi_up", (e, d, h), ("expert", "embed", "mlp")),
                                weight("wo", (e, h, d), ("expert", "mlp", "embed")),
                                EXPERT_ACTIVATIONS[self.activation])

  def _kept_slots(self, weights: jax.Array, train_step: jax.Array | None) -> jax.Array | None:
    """MoDES skipping (inference only): which slots stay, by the calibrated threshold of the
    ``SKIP_THRESHOLDS`` collection if given, else by the fields; None when nothing is skipped."""
    if train_step is not None:
      return None
    if self.has_variable(SKIP_THRESHOLDS, "threshold"):
      return weights >= self.get_variable(SKIP_THRESHOLDS, "threshold")
    return self.skip_scale * weights >= self.skip_threshold if self.skip_threshold > 0 else None

  @nn.compact
  def __call__(self, x_BTD: jax.Array, train_step: jax.Array | None = None) -> jax.Array:
    """``x_BTD`` ``(B, T, d_model)`` -> same shape and dtype; ``train_step`` is None outside training."""
    self._check_fields()
    if x_BTD.ndim != 3 or x_BTD.shape[-1] != self.d_model:
      raise ValueError(f"x_BTD: got shape {tuple(x_BTD.shape)}; allowed: (batch, seq, {self.d_model})")
    batch, seq, dim = x_BTD.shape
    routing = self._router()(x_BTD, train_step=train_step)
    weights, indices = routing.weights, routing.indices
    active = indices < self.num_experts
    keep = self._kept_slots(weights, train_step)
    if keep is not None:
      weights, indices = deactivate(weights, indices, keep, self.num_experts)
      sow_metric(self, "skipped_fraction",
                 1.0 - jnp.sum(indices < self.num_experts) / jnp.maximum(jnp.sum(active), 1))
    experts = self._experts()
    if self.dispatch == "dropless":
      if parallel.expert_shards() > 1 and parallel.batch_divides(batch):
        y_BTD = parallel.dropless_expert_parallel(x_BTD, weights, indices, experts,
                                                  implementation=self.gmm_implementation)
      else:
        y_BTD = dispatch_lib.dropless(x_BTD.reshape(batch * seq, dim), weights.reshape(batch * seq, -1),
                                      indices.reshape(batch * seq, -1), experts,
                                      implementation=self.gmm_implementation).reshape(batch, seq, dim)
      dropped = jnp.zeros((), jnp.float32)
    else:
      capacity = max(1, math.ceil(self.capacity_factor * seq * self.k / self.num_experts))
      constrain = parallel.expert_buffer_constraint if parallel.expert_shards() > 1 else (lambda b: b)
      y_BTD, dropped = dispatch_lib.capacity(x_BTD, weights, indices, experts, capacity=capacity,
                                             priority=self.priority, constrain=constrain)
    if self.num_shared_experts:
      shared = MLPS.get(self.activation)(d_model=self.d_model, hidden_dim=self.num_shared_experts * self.hidden_dim,
                                         dtype=self.dtype, param_dtype=self.param_dtype, name="shared")
      y_BTD = y_BTD + shared(x_BTD).astype(jnp.float32)
    sow_aux_loss(self, "load_balance", losses.load_balance(routing.probs, routing.indices))
    sow_aux_loss(self, "router_z", losses.z_loss(routing.logits))
    for name, value in routing.aux.items():
      sow_aux_loss(self, name, value)
    for name, value in losses.load_metrics(routing.indices, self.num_experts).items():
      sow_metric(self, name, value)
    sow_metric(self, "dropped_fraction", dropped)
    sow_metric(self, "router_entropy", losses.entropy(routing.probs))
    sow_metric(self, "active_experts", jnp.mean(jnp.sum(indices < self.num_experts, axis=-1)))
    return y_BTD.astype(x_BTD.dtype)
