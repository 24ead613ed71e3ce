"""Decoder LM on the embedded byte-level corpus (the Python standard library's sources).

    python -m experiments.train --config=experiments/configs/lm.py:tiny --workdir=/tmp/lm_tiny
    python -m experiments.train --config=experiments/configs/lm.py:small --workdir=/tmp/lm \\
        --config.model.mixer=gla --config.mesh.data=-1

``get_config(size)`` with ``size`` one of ``SIZES``: ``tiny`` (2 layers, d_model 64: a minute on 2 CPU cores,
val loss about 2.3 nats/byte after 300 steps), ``small`` (6 layers, d_model 384, one GPU), ``medium`` (12
layers, d_model 768, GPT-2-small shape, bf16; a GPU or a TPU slice). Every field can be overridden from the
command line (``--config.train.steps=1000``). Groups:

* ``model``: ``gated_jax.models.DecoderLM`` fields (mixer and MLP by registry name, ``mixer_kwargs``).
* ``data``: a ``gated_jax.data.SOURCES`` name, ``seq_len``, the *global* ``batch_size``, ``packing`` (first-fit
  sequence packing with segment ids, for variable-length sources such as ``stdlib_documents``),
  ``num_workers`` (grain worker processes), ``corpus_bytes``.
* ``optim``: AdamW with warmup + cosine (``gated_jax.train.optim``).
* ``train``: steps, logging/eval/checkpoint intervals, ``grad_accum``, ``compute_dtype`` (params stay
  float32), ``mode`` (``jit`` with the mesh, or ``pmap``), ``diagnostics`` (attention-sink and activation
  statistics at the final eval), ``peak_flops`` (per device, for MFU where the device is not in
  ``gated_jax.train.flops.PEAK_FLOPS``), ``aux_loss_weights`` (name -> weight of each auxiliary loss the layers
  sow, e.g. ``{"load_balance": 0.01}``; see ``gated_jax.layers.collections``).
* ``mesh``: sizes of the ``data``, ``fsdp``, ``tensor``, ``expert`` axes (``-1``: the remaining devices).
* ``distributed``: ``enabled=True`` calls ``jax.distributed.initialize`` (multi-host; on a Cloud TPU pod the
  other fields stay None).
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

SIZES = {
    #         d_model layers heads mlp  seq  batch steps  lr     warmup dtype
    "tiny": (64, 2, 4, 256, 128, 16, 300, 3e-3, 30, "float32"),
    "small": (384, 6, 6, 1536, 512, 32, 3000, 2e-3, 300, "bfloat16"),
    "medium": (768, 12, 12, 3072, 1024, 64, 20000, 6e-4, 1000, "bfloat16"),
}


def get_config(size: str = "tiny") -> ml_collections.ConfigDict:
  """The LM config of ``size`` (``tiny``, ``small`` or ``medium``)."""
  if size not in SIZES:
    raise ValueError(f"size: got {size!r}; allowed: {', '.join(SIZES)}")
  d_model, layers, heads, mlp, seq, batch, steps, lr, warmup, dtype = SIZES[size]
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.workdir = ""
  config.model = ml_collections.ConfigDict(dict(
      vocab_size=256, d_model=d_model, num_layers=layers, num_heads=heads, num_kv_heads=placeholder(int),
      head_dim=placeholder(int),
      mixer="gated_attention", mixer_kwargs={}, mlp="swiglu", mlp_hidden_dim=mlp, mlp_kwargs={},
      tie_embeddings=True, max_len=seq, remat=False))
  config.data = ml_collections.ConfigDict(dict(
      name="stdlib_bytes", seq_len=seq, batch_size=batch, packing=False, num_workers=0,
      corpus_bytes=4_000_000))
  config.optim = ml_collections.ConfigDict(dict(
      lr=lr, warmup_steps=warmup, schedule_steps=placeholder(int), schedule="warmup_cosine", min_lr_ratio=0.1,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0))
  config.train = ml_collections.ConfigDict(dict(
      steps=steps, log_every=max(1, steps // 50), eval_every=steps, eval_batches=8,
      checkpoint_every=max(1, steps // 4), max_to_keep=2, async_checkpointing=True, grad_accum=1,
      compute_dtype=dtype, mode="jit", diagnostics=True, tensorboard=True, progress=True, peak_flops=0.0,
      aux_loss_weights={}))
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  config.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address=placeholder(str), num_processes=placeholder(int),
      process_id=placeholder(int)))
  return config
