"""Grokking at the Edge of Numerical Stability (Prieto et al., ICLR 2025, arXiv 2501.04697), Figures 1, 2 and 4:
without weight decay, softmax cross-entropy drives the logits into Softmax Collapse and the model never
generalises; a loss that cannot collapse (StableMax) or an optimizer that cannot scale the logits (⊥Grad) lets
it generalise.

    python -m experiments reproduce grokking [--scale tiny|small|paper] [--seeds N]

Task and model (the paper's code, ``grokking_experiments.py``): modular addition and, as its Figure 4, modular
multiplication mod ``p``; every pair is an example and a seeded random ``train_fraction`` of them is the
training split (``gated_jax.data.modular``); an MLP ``2p → 200 → 200 → p`` with ReLU and no biases on the two
concatenated one-hot operands, PyTorch's default ``nn.Linear`` initialisation (U(±1/√fan_in)); full-batch
Adam, lr 0.01, ε = 1e-25, no weight decay, no regularisation.

Variants (per task):

* ``softmax``: softmax cross-entropy in float32 (β₂ 0.99);
* ``softmax-fp64`` (addition only, the collapse check): the log-softmax evaluated in float64, the model still
  float32 (the paper's precision comparison, Figure 2; with 64-bit types enabled for the run, Adam's
  bias-correction scalars are float64 as well, and the float32 parameters are updated from them);
* ``stablemax``: StableMax cross-entropy (β₂ 0.999 as the paper's script). The paper's code evaluates it in
  float64; ours stays in float32, the precision whose collapse it is meant to avoid;
* ``orthograd``: ⊥AdamW — ``gated_jax.train.orthograd`` around the same Adam — with softmax cross-entropy in
  float32 (β₂ 0.99).

Every run stops at the step budget or as soon as test accuracy reaches 0.99.

Metrics: final train and test accuracy; ``step_90``, the first evaluated step at which test accuracy reaches
90% (``inf`` — "never" in ``summary.md`` — when it does not within the budget); ``absorbed_max``, the peak over
the run of the Softmax Collapse measure of the paper's code (the share of training samples whose normaliser
sum, in the loss's precision, equals the top term alone: ``gated_jax.train.losses.absorbed_fraction``); the
weights' global norm at the end (naïve loss minimisation grows it). ``summary.md`` lists ``step_90`` per seed
and ``curves.png`` draws train/test accuracy and the absorbed fraction against the step for every run.

Claims, per task: (a) softmax in float32 does not generalise (test < 0.9) and collapses (peak absorbed ≥ 0.25
of the training samples); (b) StableMax prevents the collapse (never absorbs a sample) and ends above
softmax's test accuracy; (c) StableMax generalises (test ≥ 0.9); (d) ⊥AdamW generalises (test ≥ 0.9), no
later than StableMax; and for addition (e) float64 delays the collapse (lower peak absorbed than float32).

Scales:

* ``tiny`` (default; 2 CPU cores, ≤ 20 minutes for 7 variants × 3 seeds): ``p = 97`` and 60% train (the
  paper's Figure 2 split; at 40% StableMax's test accuracy has not moved after 3000 steps at this ``p``), the
  paper's MLP and optimizer, 2000 full-batch steps evaluated every 50. Softmax collapses near step 1800; ⊥AdamW
  generalises within a few hundred steps; StableMax's test accuracy rises steadily but needs several thousand
  more steps to reach 0.9 ("never" at this budget is the expected tiny-scale outcome of claim c).
* ``small`` (a few CPU-hours, minutes on an accelerator): the paper's ``p = 113`` and 40% split, 20k steps.
* ``paper``: the paper's Figure 1 budget, 80k full-batch epochs (one step each).
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from experiments.tables import common
from experiments.tables.common import Claim, Metric, Table
from gated_jax.data.modular import modular_arithmetic
from gated_jax.train import losses
from gated_jax.train.orthograd import orthograd

TASKS = ("add", "multiply")
TEST_THRESHOLD = 0.9
COLLAPSE_THRESHOLD = 0.25
_TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # U(±1/sqrt(fan_in))


class GrokkingMLP(nn.Module):
  """The paper's MLP on two one-hot operands, without biases (``models.py``, ``bias=False``).

  The first layer's product ``concat(onehot(a), onehot(b)) @ W`` is computed as ``W[a] + W[p + b]`` (the same
  numbers without the ``2p``-wide one-hot matmul).
  """
  modulus: int
  hidden: tuple[int, ...] = (200, 200)

  @nn.compact
  def __call__(self, pairs_N2: jax.Array) -> jax.Array:
    w_in = self.param("input", _TORCH_LINEAR_INIT, (2 * self.modulus, self.hidden[0]))
    h_NH = w_in[pairs_N2[:, 0]] + w_in[self.modulus + pairs_N2[:, 1]]
    for i, width in enumerate(self.hidden[1:]):
      h_NH = nn.Dense(width, use_bias=False, kernel_init=_TORCH_LINEAR_INIT, name=f"hidden_{i}")(nn.relu(h_NH))
    return nn.Dense(self.modulus, use_bias=False, kernel_init=_TORCH_LINEAR_INIT, name="out")(nn.relu(h_NH))


def base_config() -> ml_collections.ConfigDict:
  """Fields of one grokking run (the scales and variants override them)."""
  return ml_collections.ConfigDict({
      "seed": 0,
      "task": {"operation": "add", "modulus": 113, "train_fraction": 0.4},
      "model": {"hidden": (200, 200)},
      "loss": {"normalizer": "softmax", "dtype": "float32"},
      "optim": {"lr": 0.01, "b1": 0.9, "b2": 0.99, "eps": 1e-25, "orthograd": False},
      "train": {"steps": 1500, "eval_every": 50, "stop_at": 0.99},
  })


def _loss_fn(config: ml_collections.ConfigDict):
  dtype = jnp.dtype(config.loss.dtype)
  if config.loss.normalizer == "softmax":
    return lambda logits, labels: losses.softmax_cross_entropy(logits, labels, dtype)
  return lambda logits, labels: losses.stablemax_cross_entropy(logits, labels, dtype)


def _optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
  adam = optax.adam(optim.lr, b1=optim.b1, b2=optim.b2, eps=optim.eps)
  return orthograd(adam) if optim.orthograd else adam


def _train(config: ml_collections.ConfigDict) -> dict[str, Any]:
  split = modular_arithmetic(config.task.operation, config.task.modulus, config.task.train_fraction, config.seed)
  model = GrokkingMLP(config.task.modulus, tuple(config.model.hidden))
  train_x, train_y = jnp.asarray(split.train_pairs), jnp.asarray(split.train_labels)
  test_x, test_y = jnp.asarray(split.test_pairs), jnp.asarray(split.test_labels)
  params = model.init(jax.random.PRNGKey(config.seed), train_x[:1])["params"]
  tx = _optimizer(config.optim)
  loss_fn = _loss_fn(config)
  normalizer, dtype = config.loss.normalizer, jnp.dtype(config.loss.dtype)

  def step(_, state):
    params, opt_state = state
    grads = jax.grad(lambda p: loss_fn(model.apply({"params": p}, train_x), train_y).astype(jnp.float32))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def chunk(state):
    return jax.lax.fori_loop(0, config.train.eval_every, step, state)

  @jax.jit
  def measure(params):
    train_logits, test_logits = model.apply({"params": params}, train_x), model.apply({"params": params}, test_x)
    accuracy = lambda logits, y: jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))  # noqa: E731
    return {"loss": loss_fn(train_logits, train_y).astype(jnp.float32),
            "train_accuracy": accuracy(train_logits, train_y), "test_accuracy": accuracy(test_logits, test_y),
            "absorbed": losses.absorbed_fraction(train_logits, normalizer, dtype),
            "weight_norm": optax.tree.norm(params)}

  state = (params, tx.init(params))
  history = [{"step": 0, **{k: float(v) for k, v in measure(params).items()}}]
  for done in range(config.train.eval_every, config.train.steps + 1, config.train.eval_every):
    state = chunk(state)
    history.append({"step": done, **{k: float(v) for k, v in measure(state[0]).items()}})
    if history[-1]["test_accuracy"] >= config.train.stop_at:
      break
  passed = [h["step"] for h in history if h["test_accuracy"] >= TEST_THRESHOLD]
  final = history[-1]
  metrics = {k: final[k] for k in ("train_accuracy", "test_accuracy", "weight_norm", "loss")}
  metrics.update(absorbed_max=max(h["absorbed"] for h in history), step_90=float(passed[0]) if passed else math.inf)
  return {"metrics": metrics, "history": history}


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
  """The table's runner: one full-batch training run (float64 enabled for ``loss.dtype == "float64"``)."""
  del workdir
  if config.train.steps % config.train.eval_every:
    raise ValueError(f"train.steps: got {config.train.steps}; allowed: a multiple of train.eval_every="
                     f"{config.train.eval_every}")
  if config.loss.normalizer not in losses.NORMALIZERS or config.loss.dtype not in ("float32", "float64"):
    raise ValueError(f"loss: got {config.loss.to_dict()}; allowed: normalizer in {losses.NORMALIZERS}, dtype "
                     "float32 or float64")
  with jax.enable_x64(config.loss.dtype == "float64"):
    return _train(config)


_LOSS_VARIANTS = {
    "softmax": {"loss.normalizer": "softmax", "optim.b2": 0.99},
    "softmax-fp64": {"loss.normalizer": "softmax", "loss.dtype": "float64", "optim.b2": 0.99},
    "stablemax": {"loss.normalizer": "stablemax", "optim.b2": 0.999},
    "orthograd": {"loss.normalizer": "softmax", "optim.b2": 0.99, "optim.orthograd": True},
}
PRECISION_TASK = "add"  # the float64 collapse check runs on this task only
VARIANTS = {f"{task} {name}": {"task.operation": task, **overrides}
            for task in TASKS for name, overrides in _LOSS_VARIANTS.items()
            if name != "softmax-fp64" or task == PRECISION_TASK}


def _scale(modulus, fraction, hidden, steps, eval_every):
  return {"task.modulus": modulus, "task.train_fraction": fraction, "model.hidden": hidden,
          "train.steps": steps, "train.eval_every": eval_every}


SCALES = {
    "micro": _scale(11, 0.4, (32, 32), 20, 10),
    "tiny": _scale(97, 0.6, (200, 200), 2000, 50),
    "small": _scale(113, 0.4, (200, 200), 20_000, 200),
    "paper": _scale(113, 0.4, (200, 200), 80_000, 500),
}

METRICS = (
    Metric("test_accuracy", "test acc"),
    Metric("train_accuracy", "train acc"),
    Metric("step_90", "step test ≥ 90%", ".0f"),
    Metric("absorbed_max", "peak absorbed (SC)"),
    Metric("weight_norm", "‖w‖", ".1f"),
)


def _claims(task: str) -> tuple[Claim, ...]:
  soft, fp64, stable, ortho = (f"{task} {n}" for n in _LOSS_VARIANTS)
  return (
      Claim(f"{task}: softmax collapses", f"softmax CE in float32 does not generalise (test < 0.9) and collapses "
            f"(peak absorbed ≥ {COLLAPSE_THRESHOLD} of the training samples) ({task})", (soft,),
            lambda m: m[soft]["test_accuracy"] < TEST_THRESHOLD and m[soft]["absorbed_max"] >= COLLAPSE_THRESHOLD),
      Claim(f"{task}: stablemax prevents collapse", f"StableMax never absorbs a sample and ends with a higher test "
            f"accuracy than softmax ({task})", (soft, stable),
            lambda m: m[stable]["absorbed_max"] == 0 and m[stable]["test_accuracy"] > m[soft]["test_accuracy"]),
      Claim(f"{task}: stablemax generalises", f"StableMax without weight decay reaches test accuracy ≥ 0.9 ({task})",
            (stable,), lambda m: m[stable]["test_accuracy"] >= TEST_THRESHOLD),
      Claim(f"{task}: orthograd generalises first", f"⊥AdamW reaches test ≥ 0.9, no later than StableMax ({task})",
            (ortho, stable), lambda m: m[ortho]["test_accuracy"] >= TEST_THRESHOLD
            and m[ortho]["step_90"] <= m[stable]["step_90"]),
  ) + ((Claim(f"{task}: float64 delays collapse", f"softmax in float64 absorbs fewer samples at its peak than in "
               f"float32 ({task})", (soft, fp64), lambda m: m[fp64]["absorbed_max"] < m[soft]["absorbed_max"]),)
        if fp64 in VARIANTS else ())


def _runs(out_dir: pathlib.Path) -> list[Mapping[str, Any]]:
  return common.read_runs(out_dir)


def summary(out_dir: pathlib.Path) -> str:
  """``summary.md`` (the step at which test accuracy passed 90%, per seed) and ``curves.png``."""
  runs = _runs(out_dir)
  variants = list(dict.fromkeys(r["variant"] for r in runs))
  lines = ["## Step at which test accuracy passes 90% (per seed)", "", "| variant | seeds |", "|---|---|"]
  for variant in variants:
    steps = [r["metrics"]["step_90"] for r in runs if r["variant"] == variant]
    lines.append(f"| {variant} | {', '.join('never' if not math.isfinite(s) else f'{s:.0f}' for s in steps)} |")
  text = "\n".join(lines) + "\n"
  (out_dir / "summary.md").write_text(text)
  _plot_curves(runs, variants, out_dir / "curves.png")
  return text


def _plot_curves(runs, variants, path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  tasks = list(dict.fromkeys(v.split()[0] for v in variants))
  fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 3.8 * len(tasks)), squeeze=False)
  for row, task in zip(axes, tasks, strict=True):
    for color, variant in enumerate(v for v in variants if v.startswith(task + " ")):
      for run in (r for r in runs if r["variant"] == variant):
        steps = [h["step"] for h in run["history"]]
        first = run["seed"] == 0
        row[0].plot(steps, [h["test_accuracy"] for h in run["history"]], color=f"C{color}",
                    label=variant if first else None)
        row[0].plot(steps, [h["train_accuracy"] for h in run["history"]], color=f"C{color}", ls=":", lw=0.8)
        row[1].plot(steps, [h["absorbed"] for h in run["history"]], color=f"C{color}",
                    label=variant if first else None)
    row[0].axhline(TEST_THRESHOLD, color="k", lw=0.6)
    row[0].set(xlabel="step", ylabel="accuracy", title=f"{task}: test (solid) and train (dotted) accuracy")
    row[1].set(xlabel="step", ylabel="absorbed fraction", title=f"{task}: Softmax Collapse (absorbed samples)")
    row[0].legend(fontsize=7)
    row[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


TABLE = Table(
    name="grokking",
    paper="Grokking at the Edge of Numerical Stability (Prieto et al., ICLR 2025, arXiv 2501.04697), Figures 1, 2, 4",
    variants=VARIANTS,
    scales=SCALES,
    metrics=METRICS,
    paper_columns=(),
    paper_numbers={},
    claims=tuple(c for task in TASKS for c in _claims(task)),
    base_config=base_config,
    micro_variants=("add softmax", "add orthograd"),
    summary=summary,
    runner=run,
    default_seeds=3,
    plot_metric="test_accuracy",
    curve_key="test_accuracy",
    baseline="add softmax",
)
