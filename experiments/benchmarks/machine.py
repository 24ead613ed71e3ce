"""The machine a benchmark's numbers belong to (written into every results file)."""

from __future__ import annotations

import os
import platform
from typing import Any


def cpu_model() -> str:
  """The CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or "unknown"


def device_info() -> dict[str, Any]:
  """Platform, device kind and count of JAX's default backend, CPU model and cores, jax version."""
  import jax  # pylint: disable=import-outside-toplevel  (callers may set JAX_* variables first)
  device = jax.devices()[0]
  return {"platform": device.platform, "device_kind": device.device_kind, "num_devices": jax.device_count(),
          "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
          "jax": jax.__version__}
