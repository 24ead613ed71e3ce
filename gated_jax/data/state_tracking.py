"""State-tracking tasks: the running sum of a token sequence modulo ``m`` (parity is ``m = 2``), labelled at
every position, as in the formal-language suites of xLSTM (Beck et al. arXiv 2405.04517 §4.1, "Parity" and
"Mod Arithmetic") and of Grazzi et al. (arXiv 2411.12537 §5.1).

An example of length ``L`` is ``L + 1`` tokens: a beginning-of-sequence token ``BOS = m`` (id ``modulus``),
then ``x_1..x_L`` drawn uniformly from ``[0, m)``. The target at position ``t >= 1`` is ``(x_1 + ... + x_t) mod
m`` with weight 1; position 0 (BOS) has target 0 and weight 0. Every prefix is an instance of the task, so a
causal model trained at length ``L`` is scored at any length ``L' <= L_eval`` by its prediction at position
``L'`` of one long sequence.
"""

from __future__ import annotations

import numpy as np

TASKS = {"parity": 2, "modular_sum": None}  # task -> fixed modulus (None: the ``modulus`` argument)


def task_modulus(task: str, modulus: int = 5) -> int:
  """The modulus of ``task`` (2 for parity; ``modulus`` for the modular sum, which must be >= 2)."""
  if task not in TASKS:
    raise ValueError(f"task: got {task!r}; allowed: {', '.join(TASKS)}")
  fixed = TASKS[task]
  if fixed is not None:
    return fixed
  if isinstance(modulus, bool) or not isinstance(modulus, (int, np.integer)) or modulus < 2:
    raise ValueError(f"modulus: got {modulus!r}; allowed: an int >= 2")
  return int(modulus)


def vocab_size(task: str, modulus: int = 5) -> int:
  """Token ids ``0..m-1`` plus BOS."""
  return task_modulus(task, modulus) + 1


def generate(task: str, num_examples: int, length: int, seed: int | list[int], modulus: int = 5
             ) -> dict[str, np.ndarray]:
  """``num_examples`` examples of ``length`` task tokens (``length + 1`` with BOS), deterministic in ``seed``.

  Returns:
    ``{"inputs": int32 (N, L+1), "targets": int32 (N, L+1), "weights": float32 (N, L+1)}``.
  """
  m = task_modulus(task, modulus)
  for name, value in (("num_examples", num_examples), ("length", length)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"{name}: got {value!r}; allowed: a positive int")
  tokens_NL = np.random.default_rng(seed).integers(0, m, size=(num_examples, length))
  running_NL = np.cumsum(tokens_NL, axis=1) % m
  bos_N1 = np.full((num_examples, 1), m)
  weights = np.ones((num_examples, length + 1), np.float32)
  weights[:, 0] = 0.0
  return {"inputs": np.concatenate([bos_N1, tokens_NL], axis=1).astype(np.int32),
          "targets": np.concatenate([np.zeros_like(bos_N1), running_NL], axis=1).astype(np.int32),
          "weights": weights}
