"""The machine a benchmark's numbers belong to (written into every results file), and the measurements
benchmarks share: a call's median wall time (and, where memory is the question, its CPU time and fresh pages)
and the dense matmul peak that throughputs are quoted against; plus the argument type of their lists of sizes."""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
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


def time_call(fn: Callable[[], object], repeats: int) -> float:
  """Median wall time (seconds) of ``repeats`` calls after one warm-up call."""
  return call_cost(fn, repeats)["ms"] / 1e3


def call_cost(fn: Callable[[], object], repeats: int) -> dict[str, float]:
  """Per call, over ``repeats`` calls after one warm-up: median wall ``ms``, the process's user and system CPU
  seconds (``user_s``, ``sys_s``), and ``fresh_mib``: minor page faults times the page size, the memory the
  kernel had to hand the process afresh (XLA:CPU allocates a program's temporaries on every call; past glibc's
  ``mmap`` threshold each of their pages faults on first touch, and ``sys_s`` is mostly that)."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(fn())
  before, times = resource.getrusage(resource.RUSAGE_SELF), []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  after = resource.getrusage(resource.RUSAGE_SELF)
  return {"ms": 1e3 * statistics.median(times), "user_s": (after.ru_utime - before.ru_utime) / repeats,
          "sys_s": (after.ru_stime - before.ru_stime) / repeats,
          "fresh_mib": (after.ru_minflt - before.ru_minflt) * resource.getpagesize() / 2**20 / repeats}


def matmul_peak(dtype, size: int = 2048, repeats: int = 5) -> float:
  """Measured dense matmul throughput (GFLOP/s) of ``size``-square ``dtype`` matrices (best of ``repeats``)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  a, b = (jax.random.normal(jax.random.key(i), (size, size), jnp.float32).astype(dtype) for i in (1, 2))
  fn = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  seconds = min(time_call(lambda: fn(a, b), 1) for _ in range(repeats))
  return 2.0 * size ** 3 / seconds / 1e9


def positive_ints(text: str) -> tuple[int, ...]:
  """``argparse`` type of a comma-separated list of positive ints (e.g. ``--seq-lens 1024,4096``)."""
  try:
    values = tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    values = ()
  if not values or min(values) <= 0:
    raise argparse.ArgumentTypeError(f"got {text!r}; allowed: comma-separated positive ints")
  return values
