"""A seconds-long LM config for the training tests, and a runner used by the multi-device subprocesses."""

from __future__ import annotations

import json
import sys

from experiments.configs import lm
from experiments.tables.common import apply_overrides

TINY = {
    "model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2, "model.mlp_hidden_dim": 64,
    "model.max_len": 32, "data.seq_len": 32, "data.batch_size": 8, "data.corpus_bytes": 100_000,
    "optim.warmup_steps": 1, "train.steps": 6, "train.log_every": 1, "train.eval_every": 6,
    "train.eval_batches": 2, "train.checkpoint_every": 3, "train.diagnostics": False, "train.progress": False,
    "train.compute_dtype": "float32", "mesh.data": 1,
}


def tiny_config(**overrides):
  """``lm.py:tiny`` shrunk by ``TINY``, then ``overrides`` (dotted paths with ``__`` for ``.``)."""
  return apply_overrides(lm.get_config("tiny"), {**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}})


def losses(history):
  return [h["loss"] for h in history]


def main(jobs_json: str) -> None:
  """Runs each job ``{"overrides": {...}, "workdir": str|None, "specs": bool}`` and prints one JSON line."""
  import jax  # pylint: disable=import-outside-toplevel
  from gated_jax.train import train  # pylint: disable=import-outside-toplevel

  out = []
  for job in json.loads(jobs_json):
    config = apply_overrides(tiny_config(), job["overrides"])
    result = train(config, workdir=job.get("workdir"))
    record = {"losses": losses(result.history), "steps": [h["step"] for h in result.history],
              "resumed_from": result.resumed_from, "eval_loss": result.eval["loss"]}
    if job.get("specs"):
      record["specs"] = {"/".join(str(getattr(k, "key", k)) for k in path): str(leaf.sharding.spec)
                         for path, leaf in jax.tree_util.tree_leaves_with_path(result.params)}
    out.append(record)
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1])
