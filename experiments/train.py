"""One training run from a config file: ``python -m experiments.train --config=FILE[:ARG] [--config.X=...]``.

    python -m experiments.train --config=experiments/configs/lm.py:tiny --workdir=/tmp/lm_tiny
    python -m experiments.train --config=experiments/configs/lm.py:tiny --config.model.mixer=gla \\
        --config.mesh.data=2 --config.mesh.tensor=2 --workdir=/tmp/lm_gla

Re-running the same command resumes from the newest checkpoint in ``--workdir``. On a multi-host TPU pod
slice add ``--config.distributed.enabled=True`` and launch the command on every worker.
"""

from __future__ import annotations

import json
import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from gated_jax.train import distributed, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. experiments/configs/lm.py:tiny",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints and metrics (default: config.workdir)")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  distributed.initialize(config.get("distributed"))  # before any other JAX call
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  logging.getLogger("gated_jax").setLevel(logging.INFO)
  result = train(config, workdir=_WORKDIR.value)
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    print(json.dumps({"step": result.step, "resumed_from": result.resumed_from, "num_params": result.num_params,
                      **{f"eval_{k}": v for k, v in result.eval.items()}}))


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
