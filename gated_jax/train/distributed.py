"""Multi-host start-up: ``jax.distributed.initialize`` from ``config.distributed`` (docs/architecture.md, "Training").

On Cloud TPU pods, Slurm, Kubernetes and GCE every field may stay None: jax detects the coordinator, the
process count and this process's id; launch the same command on every host (``--worker=all``). Elsewhere
(e.g. two processes on one machine) give ``coordinator_address`` (``host:port``), ``num_processes`` and
``process_id``. CPU processes exchange data through Gloo collectives. Must run before any other JAX call.
"""

from __future__ import annotations

from typing import Any

import jax

_initialized = False


def initialize(distributed_config: Any) -> None:
  """Calls ``jax.distributed.initialize`` once when ``distributed_config.enabled`` (no-op otherwise)."""
  global _initialized
  if _initialized or distributed_config is None or not distributed_config.get("enabled", False):
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {k: distributed_config.get(k) for k in ("coordinator_address", "num_processes", "process_id")}
  jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
  _initialized = True
