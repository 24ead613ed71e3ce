"""Max retrieval: softmax attention disperses as the number of items grows past the training sizes, and adaptive
temperature partly restores its sharpness (Veličković, Perivolaropoulos, Barbero & Pascanu, "softmax is not
enough (for sharp out-of-distribution)", arXiv 2410.01104: its dispersion theorem and adaptive temperature).

    python -m experiments reproduce max_retrieval [--scale tiny|small|paper] [--seeds N]

Task (the paper's max-retrieval set-up, sizes reduced for CPUs): a set of ``n`` items, item ``i`` with a priority
``x_i ~ U(0, 1)`` and a class ``c_i`` uniform in 0..9; predict the class of the item with the largest priority.
Model, as in the paper: a deep MLP on each item (``[x_i, onehot(c_i)]``, two GELU layers), a single attention
head whose query is a learned vector and whose keys and values are projections of the items
(:func:`pallas_kernels.attention`, non-causal, padding hidden by ``key_mask``), and a deep MLP predictor (two
GELU layers, 10 logits). Trained with cross-entropy on sets of ``n`` uniform in 2..16; evaluated on fresh sets
of ``n`` = 16, 32, ..., 1024.

Rows: the same training run (same seed, so identical parameters), evaluated with plain softmax (``softmax``) and
with adaptive temperature switched on at inference (``adaptive``: ``normalizers.AdaptiveTemperature``, the
paper's Fig. 4 rule, which it applies at inference only).

Metrics per ``n``: accuracy; the attention weight on the max item (mean over sets); the spread ``δ`` (max - min)
of the set's attention logits before any temperature (mean over sets). The paper's dispersion bound for softmax: no
item gets more than ``e^δ / (e^δ + n - 1)``, so while ``δ`` stays bounded the weight must fall once ``n`` is
well past ``e^δ``; its mean over sets is kept in ``runs.jsonl`` as ``bound_{n}`` (softmax's weights obey it).

Claims judged per seed and on the means: (a) softmax disperses: the max item's weight at the largest ``n`` is
less than half of its weight at ``n = 16``; (b) adaptive temperature puts more weight on the max item than
softmax at every ``n > 16``; (c) adaptive temperature's accuracy at the largest ``n`` is at least softmax's
(the paper: it helps, partially).

The paper reports these trends as figures (attention weight and accuracy against the number of items); no
numeric table of them is reproduced here, so the table has no paper columns: its claims are the paper's.

Scales:

* ``tiny`` (default; 2 CPU cores, ≤ 10 minutes for 2 rows × 2 seeds): width 64, 3000 AdamW steps at 1e-3,
  batch 128, 1024 evaluation sets per ``n``.
* ``small``: width 128, 20000 steps, ``n`` up to 4096.
* ``paper``: width 256, 100000 steps, ``n`` up to 16384 (point it at an accelerator).
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import pallas_kernels
from experiments.tables.common import Claim, Metric, Table

CLASSES = 10
TRAIN_SIZES = (2, 16)  # n uniform in this range (inclusive) during training
TEST_SIZES = (16, 32, 64, 128, 256, 512, 1024)
EVAL_CHUNK = 256  # evaluation sets per compiled call


class MaxRetriever(nn.Module):
  """Item MLP -> one attention head with a learned query -> MLP predictor (module docstring)."""
  width: int
  normalizer: str = "softmax"

  @nn.compact
  def __call__(self, items_BNF, valid_BN, max_onehot_BN):
    """Returns ``(logits (B, CLASSES), weight on the max item (B,), logits' spread (B,))``."""
    h = items_BNF
    for _ in range(2):
      h = nn.gelu(nn.Dense(self.width)(h))
    k_BNK, v_BNK = nn.Dense(self.width, name="key")(h), nn.Dense(self.width, name="value")(h)
    query_K = self.param("query", nn.initializers.normal(1.0), (self.width,))
    batch = items_BNF.shape[0]
    q_B11K = jnp.broadcast_to(query_K, (batch, 1, 1, self.width))
    # The max item's one-hot as an extra value channel: the output's last entry is its attention weight.
    v_BNK1 = jnp.concatenate([v_BNK, max_onehot_BN[..., None]], -1)
    o_BV = pallas_kernels.attention(q_B11K, k_BNK[:, :, None], v_BNK1[:, :, None], normalizer=self.normalizer,
                                    causal=False, key_mask=valid_BN, implementation="xla")[:, 0, 0]
    logits_BN = jnp.einsum("bnk,k->bn", k_BNK, query_K) * self.width ** -0.5
    spread_B = (jnp.max(jnp.where(valid_BN, logits_BN, -jnp.inf), -1)
                - jnp.min(jnp.where(valid_BN, logits_BN, jnp.inf), -1))
    z = o_BV[:, :-1]
    for _ in range(2):
      z = nn.gelu(nn.Dense(self.width)(z))
    return nn.Dense(CLASSES)(z), o_BV[:, -1], spread_B


def sample_sets(key, batch: int, low: int, high: int, pad: int):
  """``batch`` sets of ``n ~ U{low..high}`` items padded to ``pad``: ``(items (B, pad, 1 + CLASSES), valid
  (B, pad), onehot of the max item (B, pad), its class (B,))``."""
  k_n, k_x, k_c = jax.random.split(key, 3)
  n_B = jax.random.randint(k_n, (batch,), low, high + 1)
  x_BN = jax.random.uniform(k_x, (batch, pad))
  c_BN = jax.random.randint(k_c, (batch, pad), 0, CLASSES)
  valid_BN = jnp.arange(pad) < n_B[:, None]
  top_B = jnp.argmax(jnp.where(valid_BN, x_BN, -1.0), -1)
  items = jnp.concatenate([x_BN[..., None], jax.nn.one_hot(c_BN, CLASSES)], -1)
  return items, valid_BN, jax.nn.one_hot(top_B, pad), jnp.take_along_axis(c_BN, top_B[:, None], -1)[:, 0]


def _train(config: ml_collections.ConfigDict, key):
  model = MaxRetriever(config.width)
  low, high = TRAIN_SIZES
  k_init, k_data = jax.random.split(key)
  params = model.init(k_init, *sample_sets(k_data, 2, low, high, high)[:3])["params"]
  optimizer = optax.adamw(config.lr, weight_decay=config.weight_decay)
  state = optimizer.init(params)

  def loss_fn(params, key):
    items, valid, onehot, target = sample_sets(key, config.batch_size, low, high, high)
    logits, _, _ = model.apply({"params": params}, items, valid, onehot)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == target)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def steps(params, state, key):
    def one(carry, key):
      params, state = carry
      (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, key)
      updates, state = optimizer.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), (loss, accuracy)
    (params, state), (loss, accuracy) = jax.lax.scan(one, (params, state), jax.random.split(key, config.log_every))
    return params, state, loss.mean(), accuracy.mean()

  history = []
  for chunk in range(-(-config.steps // config.log_every)):
    params, state, loss, accuracy = steps(params, state, jax.random.fold_in(key, chunk))
    history.append({"step": (chunk + 1) * config.log_every, "loss": float(loss), "train_accuracy": float(accuracy)})
  return params, history


def _evaluate(config: ml_collections.ConfigDict, params, key) -> dict[str, float]:
  """Accuracy, max-item weight, logit spread and dispersion bound per test size with ``config.normalizer`` at
  inference."""
  model = MaxRetriever(config.width, config.normalizer)

  @functools.partial(jax.jit, static_argnums=(1,))
  def chunk_sums(key, n):
    items, valid, onehot, target = sample_sets(key, chunk, n, n, n)
    logits, weight, spread = model.apply({"params": params}, items, valid, onehot)
    bound = 1.0 / (1.0 + (n - 1) * jnp.exp(-spread))  # e^δ / (e^δ + n - 1), without overflow
    return jnp.stack([jnp.sum(jnp.argmax(logits, -1) == target), weight.sum(), spread.sum(), bound.sum()])

  metrics = {}
  chunk = min(EVAL_CHUNK, config.eval_sets)
  chunks = -(-config.eval_sets // chunk)
  for n in config.test_sizes:
    sums = sum(np.asarray(chunk_sums(jax.random.fold_in(key, 1000 * n + c), int(n)), np.float64)
               for c in range(chunks))
    total = chunks * chunk
    metrics.update({f"{kind}_{n}": value / total for kind, value in zip(("accuracy", "weight", "spread", "bound"),
                                                                          sums)})
  return metrics


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
  """The table's runner: train with softmax on n <= 16, evaluate with the row's normalizer at every test size
  (the evaluation sets depend on the seed only, so both rows see the same sets)."""
  del workdir
  key = jax.random.PRNGKey(config.seed)
  params, history = _train(config, key)
  return {"metrics": _evaluate(config, params, jax.random.fold_in(key, 1)), "history": history}


def base_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "seed": 0, "normalizer": "softmax", "width": 64, "steps": 3000, "batch_size": 128, "lr": 1e-3,
      "weight_decay": 1e-4, "log_every": 100, "eval_sets": 1024, "test_sizes": list(TEST_SIZES)})


VARIANTS = {"softmax": {"normalizer": "softmax"}, "adaptive": {"normalizer": "adaptive_temperature"}}

SCALES = {
    "micro": {"steps": 10, "log_every": 10, "batch_size": 8, "width": 8, "eval_sets": 32, "test_sizes": [16]},
    "tiny": {},
    "small": {"width": 128, "steps": 20_000, "test_sizes": list(TEST_SIZES) + [2048, 4096]},
    "paper": {"width": 256, "steps": 100_000, "test_sizes": list(TEST_SIZES) + [2048, 4096, 8192, 16384]},
}

METRICS = tuple(Metric(f"{kind}_{n}", f"{label} n={n}", ".3f") for kind, label in
                (("accuracy", "acc"), ("weight", "max weight"), ("spread", "logit spread")) for n in TEST_SIZES)


def _sizes(m) -> list[int]:
  """Test sizes present in the means (micro runs fewer)."""
  return sorted(int(k.split("_")[1]) for k in m["softmax"] if k.startswith("weight_"))


CLAIMS = (
    Claim("a", "softmax disperses: the max item's weight at the largest n is under half its weight at n = 16",
          ("softmax",), lambda m: m["softmax"][f"weight_{_sizes(m)[-1]}"] < 0.5 * m["softmax"]["weight_16"]),
    Claim("b", "adaptive temperature puts more weight on the max item than softmax at every n > 16",
          ("softmax", "adaptive"), lambda m: all(m["adaptive"][f"weight_{n}"] > m["softmax"][f"weight_{n}"]
                                                 for n in _sizes(m) if n > 16)),
    Claim("c", "adaptive temperature's accuracy at the largest n is at least softmax's", ("softmax", "adaptive"),
          lambda m: m["adaptive"][f"accuracy_{_sizes(m)[-1]}"] >= m["softmax"][f"accuracy_{_sizes(m)[-1]}"]),
)


TABLE = Table(
    name="max_retrieval",
    paper=("softmax is not enough (for sharp out-of-distribution), arXiv 2410.01104: max retrieval trained on "
           "n <= 16 items, tested on larger sets; plain softmax vs adaptive temperature at inference. The paper: "
           "the max item's weight disperses with n; adaptive temperature partly restores weight and accuracy"),
    variants=VARIANTS,
    scales=SCALES,
    metrics=METRICS,
    paper_columns=(),  # the paper shows these trends as figures only (module docstring)
    paper_numbers={},
    claims=CLAIMS,
    base_config=base_config,
    micro_variants=("softmax", "adaptive"),
    runner=run,
    default_seeds=2,
    plot_metric=f"accuracy_{TEST_SIZES[-1]}",
    curve_key="loss",
    baseline="softmax",
)
