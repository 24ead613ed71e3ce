"""Early exit on scikit-learn's digits: JEI-DNN's learned exit gates (Regol, Chataoui & Coates, arXiv 2310.09163)
against the max-softmax confidence cascade (BranchyNet-style thresholding, arXiv 1709.01686) on one multi-exit
backbone per seed.

    python -m experiments reproduce early_exit [--scale tiny|small|paper] [--seeds N]

Data: the 8x8 digits as a 4x4 grid of 2x2-pixel patches (16 tokens; ``gated_jax.data.digit_images``, as the
``vision_gating`` table), the whole training split (1,437 images), scored on the test split (360 images).

Model (``gated_jax.models.early_exit.MultiExitClassifier``): a ``VisionClassifier`` backbone of 4 pre-norm
``vit`` blocks (d_model 48, 4 heads, GELU MLP 192, learned position embedding) with an inference module
(LayerNorm, mean pool, linear) after every block, so 4 exits with costs ``C_l`` ≈ 0.25, 0.50, 0.75, 1 (XLA's
FLOP count of embedding + blocks + IMs up to the exit, over the count for the last exit).

Each seed trains the backbone and its IMs once (the warm-up: AdamW on the summed per-exit cross-entropy,
``train.steps`` batches of 64). Then, per row:

* ``full model``: every example leaves at the last exit (cost 1);
* ``cascade τ=…``: the first exit whose max softmax probability is ≥ τ, on the warm-up IMs;
* ``JEI-DNN λ=…``: the backbone frozen, the gates and IMs trained in alternating phases (``jei.phase_steps``
  batches each, gates first; Adam, ``jei.steps`` batches in all) with the trade-off ``λ`` of the oracle exit
  ``argmin_l CE_l + λ C_l`` (the paper's default 0.7; smaller λ buys accuracy with compute); inference exits at
  the first gate ≥ ½. The cascade on the same seed's warm-up IMs is swept over 100 thresholds and its
  accuracy and ECE are interpolated at the JEI row's cost (columns ``cascade acc @cost``, ``cascade ECE @cost``).

Metrics: test accuracy (%), mean cost, ECE of the exiting prediction (15 equal-width bins, %), and the fraction
of test images leaving at each exit (``runs.jsonl`` also holds each exit's cost ``cost_exit_l``).

Claims (from the JEI-DNN abstract and the reference experiment "learned exits beat thresholding"):

* ``accuracy_at_matched_cost``: JEI-DNN is more accurate than the cascade at the same cost — the mean over the
  λ rows of (JEI accuracy − cascade accuracy at the JEI cost) is positive;
* ``calibration_at_matched_cost``: JEI-DNN's exiting predictions are better calibrated — the same mean of
  (JEI ECE − cascade ECE at the JEI cost) is negative (the paper: thresholding biases the kept confidences up);
* ``accuracy_kept_at_60pct``: some row (cascade or JEI) has mean cost ≤ 0.6 and accuracy within 1 point of the
  full model.

Departures from the paper: the backbone is trained here (the paper freezes a pretrained T2T-ViT and trains only
IMs and gates); the gate targets come from the training split, as the paper's, on which our IMs fit closely;
Adam replaces the paper's SGD (lr 0.01, cosine); the class balancing of the gate loss is per batch.

Scales: ``tiny`` (default; 3 seeds, 1.1 minutes on an idle 2-core machine): the above, 300 warm-up steps, 400 JEI steps
in phases of 50. ``small`` (one accelerator or a patient CPU): 64 pixel tokens (patch 1), d_model 96, 6 blocks,
3,000 warm-up and 2,000 JEI steps (phases of 200, the paper's), 5 seeds. ``paper``: the paper uses
T2T-ViT-7/14 on CIFAR-10/100 and ImageNet with a pretrained backbone; not reproducible on the digits —
``paper`` runs the ``small`` grid with 20,000 warm-up steps and 10 seeds.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from experiments.tables import common, vision_gating
from experiments.tables.common import Claim, Metric, Table

THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
TRADEOFFS = (0.7, 0.3, 0.15, 0.05)
SWEEP = tuple(np.concatenate([[0.0], 1.0 - np.geomspace(1.0, 1e-6, 98), [1.01]]).tolist())  # 100 thresholds
FULL = "full model"
MAX_COST, MAX_DROP = 0.6, 1.0


def cascade(threshold: float) -> str:
  return f"cascade τ={threshold:g}"


def jei(tradeoff: float) -> str:
  return f"JEI-DNN λ={tradeoff:g}"


VARIANTS = {FULL: {"policy.kind": "full"},
            **{cascade(t): {"policy.kind": "cascade", "policy.threshold": t} for t in THRESHOLDS},
            **{jei(t): {"policy.kind": "jei", "jei.tradeoff": t} for t in TRADEOFFS}}


def base_config() -> ml_collections.ConfigDict:
  """``vision_gating``'s classifier, data and optimiser (4 blocks, the whole training split), plus the JEI-DNN
  phases and the row's exit policy."""
  config = vision_gating.base_config().to_dict()
  config["model"]["num_layers"] = 4
  config["data"] = {"batch_size": config["data"]["batch_size"]}
  return ml_collections.ConfigDict({
      **config,
      "jei": {"steps": 400, "phase_steps": 50, "ims_lr": 1e-3, "gates_lr": 1e-2, "tradeoff": 0.7},
      "policy": {"kind": "full", "threshold": 0.9},
  })


class WarmedUp(NamedTuple):
  """One seed's warm-up: the model, its parameters, cached block states and the test logits of its IMs."""
  model: Any
  heads: Any  # jitted (params, states_LBTD) -> ExitOutputs
  params: Any
  costs: np.ndarray
  train_states: np.ndarray
  test_states: np.ndarray
  test_logits: np.ndarray
  history: list[dict[str, float]]


@functools.lru_cache(maxsize=4)
def _compiled(model_json: str, optim_json: str, steps: int):
  """``(model, costs, init, warm-up step, states, heads)``, shared by every seed of one model."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel

  from gated_jax.models import VisionClassifier  # pylint: disable=import-outside-toplevel
  from gated_jax.models import early_exit  # pylint: disable=import-outside-toplevel
  from gated_jax.train import optim  # pylint: disable=import-outside-toplevel

  fields = json.loads(model_json)
  backbone = VisionClassifier(**{**fields, "image_size": tuple(fields["image_size"])})
  model = early_exit.MultiExitClassifier(backbone)
  tx = early_exit.group_optimizer(optim.make_optimizer(ml_collections.ConfigDict(json.loads(optim_json)), steps),
                                  ("backbone", "ims"))

  @jax.jit
  def init(key, images):
    params = nn.unbox(model.init(key, images)["params"])
    return params, tx.init(params)

  states = jax.jit(lambda params, images: model.apply({"params": params}, images, method=model.states))
  heads = jax.jit(lambda params, states: model.apply({"params": params}, states, method=model.from_states))
  return model, early_exit.exit_costs(backbone), init, early_exit.warmup_step(model, tx), states, heads


@functools.lru_cache(maxsize=16)
def warm_up(config_json: str, seed: int) -> WarmedUp:
  """Trains backbone and IMs on the summed per-exit loss (every row of one seed reuses the result)."""
  import jax  # pylint: disable=import-outside-toplevel

  from gated_jax.data import digit_images  # pylint: disable=import-outside-toplevel

  config = ml_collections.ConfigDict(json.loads(config_json))
  train_x, train_y, test_x, _ = digit_images.split()
  batch, steps = config.data.batch_size, config.train.steps
  model, costs, init, step, states, heads = _compiled(json.dumps(config.model.to_dict(), sort_keys=True),
                                               json.dumps(config.optim.to_dict(), sort_keys=True), steps)
  params, opt_state = init(jax.random.key(seed), train_x[:1])
  order = _order(len(train_y), steps * batch, seed)
  history = []
  for i in range(steps):
    idx = order[i * batch:(i + 1) * batch]
    params, opt_state, loss = step(params, opt_state, train_x[idx], train_y[idx])
    if (i + 1) % config.train.log_every == 0 or i + 1 == steps:
      history.append({"step": i + 1, "loss": float(loss)})
  all_states = np.asarray(states(params, np.concatenate([train_x, test_x])))  # one compilation for both splits
  train_states, test_states = all_states[:, :len(train_x)], all_states[:, len(train_x):]
  return WarmedUp(model, heads, params, costs, train_states, test_states,
                  np.asarray(heads(params, test_states).logits_LBC), history)


def _order(n: int, total: int, seed: int, stream: int = 1) -> np.ndarray:
  """``total`` example indices: shuffled epochs of ``range(n)``."""
  rng = np.random.default_rng([seed, stream])
  return np.concatenate([rng.permutation(n) for _ in range(-(-total // n))])[:total]


def _jei(config: ml_collections.ConfigDict, trained: WarmedUp, labels: np.ndarray):
  """JEI-DNN's alternating phases on the frozen backbone's cached states; ``(params, history)``."""
  import optax  # pylint: disable=import-outside-toplevel

  from gated_jax.models import early_exit  # pylint: disable=import-outside-toplevel

  batch, steps = config.data.batch_size, config.jei.steps
  order = _order(len(labels), steps * batch, config.seed, stream=2)
  batches = ((trained.train_states[:, order[i:i + batch]], labels[order[i:i + batch]])
             for i in range(0, steps * batch, batch))
  return early_exit.fit_jei(trained.model, trained.params, batches, costs_L=trained.costs,
                            tradeoff=float(config.jei.tradeoff), steps=steps, phase_steps=config.jei.phase_steps,
                            ims_tx=optax.adam(config.jei.ims_lr), gates_tx=optax.adam(config.jei.gates_lr))


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
  """Scores the row's exit policy on the test split (the seed's warm-up is trained once and cached)."""
  del workdir
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from gated_jax.data import digit_images  # pylint: disable=import-outside-toplevel
  from gated_jax.models import early_exit  # pylint: disable=import-outside-toplevel

  _, train_y, _, test_y = digit_images.split()
  shared = {k: config[k].to_dict() for k in ("model", "data", "optim", "train")}
  trained = warm_up(json.dumps(shared, sort_keys=True, default=list), config.seed)
  logits, costs, exits = trained.test_logits, trained.costs, len(trained.costs)
  kind, history = config.policy.kind, trained.history
  common_metrics = {"num_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trained.params)),
                    **{f"cost_exit_{l}": float(c) for l, c in enumerate(costs)}}
  if kind == "full":
    decision = early_exit.policies.decide(jnp.asarray(logits), jnp.full(len(test_y), exits - 1), costs)
    return {"metrics": {**early_exit.score(decision, test_y, exits), **common_metrics}, "history": history}
  if kind == "cascade":
    decision = early_exit.confidence_cascade(jnp.asarray(logits), float(config.policy.threshold), costs)
    return {"metrics": {**early_exit.score(decision, test_y, exits), **common_metrics}, "history": history}
  if kind != "jei":
    raise ValueError(f"policy.kind: got {kind!r}; allowed: 'full', 'cascade', 'jei'")
  params, jei_history = _jei(config, trained, train_y)
  outputs = trained.heads(params, trained.test_states)
  metrics = early_exit.score(early_exit.gate_policy(*outputs, costs), test_y, exits)
  sweep = early_exit.threshold_sweep(jnp.asarray(logits), test_y, costs, SWEEP)
  metrics.update(cascade_accuracy=early_exit.at_cost(sweep, metrics["cost"], "accuracy"),
                 cascade_ece=early_exit.at_cost(sweep, metrics["cost"], "ece"), **common_metrics)
  offset = history[-1]["step"]
  return {"metrics": metrics, "history": history + [{**h, "step": offset + h["step"]} for h in jei_history]}


def _jei_rows(means: common.Means) -> list[str]:
  rows = [v for v in means if v.startswith("JEI-DNN")]
  if not rows:
    raise KeyError("JEI-DNN rows")
  return rows


def _mean_gap(means: common.Means, key: str, cascade_key: str) -> float:
  """Mean over the JEI rows of (JEI value − the cascade's value interpolated at the JEI cost)."""
  return float(np.mean([means[v][key] - means[v][cascade_key] for v in _jei_rows(means)]))


def _kept_at_budget(means: common.Means) -> bool:
  full = means[FULL]["accuracy"]
  return any(m["cost"] <= MAX_COST and m["accuracy"] >= full - MAX_DROP for v, m in means.items() if v != FULL)


METRICS = (Metric("accuracy", "test acc %", ".1f"), Metric("cost", "cost", ".3f"), Metric("ece", "ECE %", ".2f"),
           Metric("cascade_accuracy", "cascade acc @cost", ".1f"), Metric("cascade_ece", "cascade ECE @cost", ".2f"),
           *(Metric(f"exit_{l}", f"exit {l + 1}", ".2f") for l in range(4)))

CLAIMS = (
    Claim("accuracy_at_matched_cost", "JEI-DNN is more accurate than the max-softmax cascade at the same cost "
          "(mean gap over the λ rows > 0)", tuple(jei(t) for t in TRADEOFFS),
          lambda m: _mean_gap(m, "accuracy", "cascade_accuracy") > 0),
    Claim("calibration_at_matched_cost", "JEI-DNN has a lower ECE than the cascade at the same cost (mean gap over "
          "the λ rows < 0)", tuple(jei(t) for t in TRADEOFFS), lambda m: _mean_gap(m, "ece", "cascade_ece") < 0),
    Claim("accuracy_kept_at_60pct", f"some exit policy keeps accuracy within {MAX_DROP:g} point of the full model at "
          f"<= {MAX_COST:.0%} of its compute", tuple(VARIANTS), _kept_at_budget),
)


def accuracy_cost_plot(out_dir: pathlib.Path) -> str:
  """Replaces ``plot.png`` with the accuracy–cost and ECE–cost curves (mean ± std over seeds, both axes) and
  returns the curves as markdown."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  runs = common.read_runs(out_dir)
  stats = common.aggregate(runs, ("accuracy", "cost", "ece"))
  series = {"max-softmax cascade": [cascade(t) for t in THRESHOLDS], "JEI-DNN": [jei(t) for t in TRADEOFFS],
            FULL: [FULL]}
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  lines = ["## Accuracy and ECE against cost (mean ± std over seeds)", "",
           "| series | row | cost | test acc % | ECE % |", "|---|---|---|---|---|"]
  for name, variants in series.items():
    points = sorted((stats[v]["cost"], stats[v]["accuracy"], stats[v]["ece"], v) for v in variants if v in stats)
    if not points:
      continue
    cost, acc, ece, labels = zip(*points)
    for ax, values in zip(axes, (acc, ece)):
      ax.errorbar([c for c, _ in cost], [y for y, _ in values], xerr=[c for _, c in cost],
                  yerr=[y for _, y in values], fmt="s" if name == FULL else "o-", capsize=3, label=name)
    lines += [f"| {name} | {v} | {c:.3f} ± {cs:.3f} | {a:.1f} ± {as_:.1f} | {e:.2f} ± {es:.2f} |"
              for (c, cs), (a, as_), (e, es), v in points]
  axes[0].set(xlabel="mean cost (fraction of the full model's FLOPs)", ylabel="test accuracy (%)",
              title="accuracy vs cost")
  axes[1].set(xlabel="mean cost (fraction of the full model's FLOPs)", ylabel="ECE (%)", title="calibration vs cost")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out_dir / "plot.png", dpi=120)
  plt.close(fig)
  return "\n".join(lines) + "\n"


_MICRO = {"model.d_model": 8, "model.num_layers": 2, "model.num_heads": 2, "model.mlp": "none",
          "data.batch_size": 8, "train.steps": 2, "train.log_every": 1, "optim.warmup_steps": 1, "jei.steps": 2,
          "jei.phase_steps": 1}
_SMALL = {"model.patch_size": 1, "model.d_model": 96, "model.num_layers": 6, "data.batch_size": 128,
          "train.steps": 3000, "train.log_every": 100, "optim.warmup_steps": 200, "jei.steps": 2000,
          "jei.phase_steps": 200}
TABLE = Table(
    name="early_exit",
    paper="JEI-DNN (Regol, Chataoui & Coates, arXiv 2310.09163, ICLR 2024): learned exit gates vs max-softmax "
          "thresholding (BranchyNet, arXiv 1709.01686) at matched cost; accuracy, cost and ECE. Digits, 4-exit ViT.",
    variants=VARIANTS,
    scales={"micro": _MICRO, "tiny": {}, "small": _SMALL, "paper": {**_SMALL, "train.steps": 20_000}},
    metrics=METRICS,
    paper_columns=(),
    paper_numbers={},
    claims=CLAIMS,
    base_config=base_config,
    micro_variants=(FULL, cascade(0.9), jei(0.7)),
    summary=accuracy_cost_plot,
    runner=run,
    default_seeds=3,
    plot_metric="accuracy",
    baseline=FULL,
)
