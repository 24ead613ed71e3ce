"""MQAR (Zoology, Arora et al., arXiv 2312.04927): 2-layer, MLP-free models on multi-query associative recall,
swept over task size, width and learning rate, each model built as Zoology builds it.

    python -m experiments reproduce mqar --scale tiny          # the whole table
    python -m experiments.train --config=experiments/configs/mqar.py:tiny --workdir=/tmp/mqar_attention

``get_config(scale)`` is one run of the sweep (the first task and width of the scale, softmax attention, the
first learning rate); ``SWEEPS[scale]`` is the grid the table runs. The model is Zoology's: 2 layers of which
the first is a BaseConv (``("base_conv", mixer)``, Zoology's ``Hybrid`` of ``[conv_mixer, mixer]`` with
``n_layers=2``), no MLP (``state_mixer`` Identity), tied embeddings, no positional embedding. Training is
Zoology's harness: AdamW (weight decay 0.1), cosine to 0, best accuracy over the learning rates. The table
trains the learning rates of one model together (``experiments/tables/_lr_sweep.py``).

Scales:

* ``tiny`` (2 CPU cores, the whole table ≤ 20 minutes): L=64 with 8 pairs, vocabulary 256 (keys 1-127,
  values 128-255; Zoology's 8192 only makes the logits dominate the cost), widths {32, 64}, learning rates
  {3e-3, 1e-2}, batch 16, 900 steps of fresh examples (no epochs), 3 seeds. Attention's accuracy jumps from
  the 1/pairs plateau to ≈1 between steps ~300 and ~500 depending on the seed, so 900 steps leave it margin;
  width 128 (and a third learning rate) would double the runtime, dominated by the delta-rule mixers. The
  gated-convolution baselines ``CONV_ROWS`` (Hyena, H3, Dauphin's GLU conv) run at width 64 and learning rate
  1e-2 only: a training step of Hyena or H3 costs about 2.5x attention's on this CPU, the full grid would add
  ~700 CPU-seconds, and this grid adds ~250 (at 1e-2, Hyena's pilot run beat 3e-3). Their claim compares them
  with attention at width 64.
* ``small`` (one accelerator): L=128 with 16 pairs, vocabulary 8192, widths {64, 128, 256}, Zoology's 4
  learning rates of Figure 2, 16 epochs of 100k examples.
* ``paper``: Zoology's Figure 2 grid, (L, pairs) ∈ {(64, 4), (128, 8), (256, 16), (512, 64)}, widths
  {64, 128, 256, 512}, 4 learning rates, 64 epochs of 100k examples, batch by length.

Deviations from Zoology: no dropout (Zoology: 0.1 on the embeddings and in attention) and no early stopping at
0.99; our blocks are pre-norm residual (``x + mixer(RMSNorm(x))``) where Zoology's MLP-free blocks add the
normed residual stream back.
"""

from __future__ import annotations

import dataclasses

import ml_collections


@dataclasses.dataclass(frozen=True)
class Sweep:
  """One scale's grid.

  Attributes:
    tasks: ``(seq_len, num_kv_pairs)`` pairs.
    widths: ``d_model`` values.
    lrs: learning rates (the table reports the best).
    vocab_size: MQAR vocabulary (keys from ``[1, V/2)``, values from ``[V/2, V)``).
    num_train_examples: training examples (None: fresh ones every step, ``steps * batch``).
    num_eval_examples: evaluation examples.
    epochs: passes over the training set (sets ``train.steps``), or with fresh data ``steps`` directly.
    batch_size: ``seq_len -> batch`` (Zoology: 512 for L <= 128, 256 at 256, 128 at 512).
    compute_dtype: training compute dtype.
    steps_fresh: training steps when ``num_train_examples`` is None.
    conv_widths: widths of the ``CONV_ROWS`` mixers (None: ``widths``).
    conv_lrs: learning rates of the ``CONV_ROWS`` mixers (None: ``lrs``).
  """
  tasks: tuple[tuple[int, int], ...]
  widths: tuple[int, ...]
  lrs: tuple[float, ...]
  vocab_size: int
  num_train_examples: int | None
  num_eval_examples: int
  epochs: float
  batch_size: dict[int, int]
  compute_dtype: str = "float32"
  steps_fresh: int = 0
  conv_widths: tuple[int, ...] | None = None
  conv_lrs: tuple[float, ...] | None = None

  def widths_of(self, mixer: str) -> tuple[int, ...]:
    return self.conv_widths if mixer in CONV_ROWS and self.conv_widths is not None else self.widths

  def lrs_of(self, mixer: str) -> tuple[float, ...]:
    return self.conv_lrs if mixer in CONV_ROWS and self.conv_lrs is not None else self.lrs

  def steps(self, seq_len: int) -> int:
    if self.num_train_examples is None:
      return self.steps_fresh
    return max(1, round(self.epochs * self.num_train_examples / self.batch_size[seq_len]))

  def train_examples(self, seq_len: int) -> int:
    return self.num_train_examples or self.steps(seq_len) * self.batch_size[seq_len]


CONV_ROWS = ("hyena", "h3", "gated_conv")  # the gated-convolution baselines beside base_conv (Sweep.conv_*)
_ZOOLOGY_LRS = (1e-4, 4.6e-4, 2.2e-3, 1e-2)  # logspace(-4, -2, 4)
_ZOOLOGY_BATCH = {64: 512, 128: 512, 256: 256, 512: 128}
SWEEPS = {
    "micro": Sweep(((32, 2),), (16,), (3e-3, 1e-2), 64, None, 32, 1.0, {32: 16}, steps_fresh=8),
    "tiny": Sweep(((64, 8),), (32, 64), (3e-3, 1e-2), 256, None, 512, 1.0, {64: 16}, steps_fresh=900,
                  conv_widths=(64,), conv_lrs=(1e-2,)),
    "small": Sweep(((128, 16),), (64, 128, 256), _ZOOLOGY_LRS, 8192, 100_000, 3_000, 16, _ZOOLOGY_BATCH,
                   "bfloat16"),
    "paper": Sweep(((64, 4), (128, 8), (256, 16), (512, 64)), (64, 128, 256, 512), _ZOOLOGY_LRS, 8192,
                   100_000, 3_000, 64, _ZOOLOGY_BATCH),
}
ATTENTION_KWARGS = {"gate_position": "none", "rope": False, "qk_norm": False}  # Zoology's MHA: no positions


def run_overrides(sweep: Sweep, seq_len: int, num_kv_pairs: int, d_model: int, lr: float) -> dict[str, object]:
  """Dotted-path overrides for one point of ``sweep`` (task, width, learning rate)."""
  steps = sweep.steps(seq_len)
  batch = sweep.batch_size[seq_len]
  return {
      "model.vocab_size": sweep.vocab_size, "model.d_model": d_model, "model.max_len": seq_len,
      "data.seq_len": seq_len, "data.num_kv_pairs": num_kv_pairs, "data.vocab_size": sweep.vocab_size,
      "data.num_train_examples": sweep.train_examples(seq_len), "data.num_eval_examples": sweep.num_eval_examples,
      "data.batch_size": batch, "optim.lr": lr, "optim.warmup_steps": max(1, steps // 20),
      "train.steps": steps, "train.eval_every": steps, "train.checkpoint_every": steps,
      "train.eval_batches": max(1, sweep.num_eval_examples // batch), "train.log_every": max(1, steps // 50),
      "train.compute_dtype": sweep.compute_dtype,
  }


def get_config(scale: str = "tiny") -> ml_collections.ConfigDict:
  """One MQAR run at ``scale`` (``micro``, ``tiny``, ``small`` or ``paper``): BaseConv + softmax attention."""
  if scale not in SWEEPS:
    raise ValueError(f"scale: got {scale!r}; allowed: {', '.join(SWEEPS)}")
  from experiments.configs import lm  # pylint: disable=import-outside-toplevel  (tables import this module)

  sweep = SWEEPS[scale]
  config = lm.get_config("tiny")
  with config.ignore_type():
    config.model.update(num_layers=2, num_heads=1, num_kv_heads=None, head_dim=None, mlp="none")
    config.model.mixer, config.model.mixer_kwargs = ("base_conv", "gated_attention"), ({}, ATTENTION_KWARGS)
    for field, value in dict(name="mqar", num_kv_pairs=4, vocab_size=8192, power_a=0.01, random_non_queries=False,
                             num_passes=1, num_train_examples=100_000, num_eval_examples=3_000, seed=0).items():
      config.data[field] = value
    config.optim.update(weight_decay=0.1, schedule="warmup_cosine", min_lr_ratio=0.0)
    config.optim.lr_sweep = tuple(sweep.lrs)  # trained together by the table's runner (the trainer uses lr)
    config.train.diagnostics = False
  (seq_len, num_kv_pairs), d_model, lr = sweep.tasks[0], sweep.widths[0], sweep.lrs[0]
  for path, value in run_overrides(sweep, seq_len, num_kv_pairs, d_model, lr).items():
    group, field = path.split(".")
    with config.ignore_type():
      config[group][field] = value
  return config
