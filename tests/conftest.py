"""Fixtures shared by the test modules, and a compilation cache shared by the whole run.

Many tests compile the same small programs (the tiny LM's train step in-process and in the multi-device,
multi-process and resume subprocesses; the same op at the same shapes in several test files). JAX's persistent
compilation cache, in one directory for every pytest worker and every subprocess they start (set through the
environment before any of them compiles), compiles each once per run. Set ``JAX_COMPILATION_CACHE_DIR``
yourself to choose the directory.
"""

import os
import tempfile

import jax
import pytest

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "gated_jax_test_compilation_cache"))
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # inherited by the subprocesses the tests start
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@pytest.fixture(scope="module")
def fast_compile():
  """Tiny shapes: XLA optimisation passes cost far more than they save (as flax's lm1b train_test)."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)
