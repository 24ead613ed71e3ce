"""Multi-query associative recall (MQAR), as defined by Zoology (Arora et al., arXiv 2312.04927, §3;
``zoology/data/multiquery_ar.py``).

An example of length ``L`` over a vocabulary of ``V`` tokens is

    k_1 v_1 k_2 v_2 ... k_n v_n  (repeated ``num_passes`` times)  | query region of length L - context

* keys are ``n = num_kv_pairs`` distinct tokens from ``[1, V/2)``, values ``n`` distinct tokens from
  ``[V/2, V)``; ``context = 2 n num_passes``;
* every key is queried exactly once in the query region, at an even offset ``2 g``, where the ``n`` gaps
  ``g`` are drawn without replacement from ``(L - context) / 2`` slots with power-law probability
  ``p_i ∝ a i^(a-1)`` (``i = 1..slots``, ``a = power_a = 0.01``): most queries sit near the region's start;
* the rest of the query region is filler ``0`` (or, with ``random_non_queries``, uniform tokens from the
  whole vocabulary, as Zoology replaces every 0 of the input);
* only query positions are scored: the model predicts the next token, so the target at a query key's
  position is its paired value (weight 1); every other position has the next input token as target and
  weight 0.

Constraints (ValueError otherwise): ``L`` even, ``V > L``, ``2 n num_passes + 2 n <= L``.

Generation is vectorised numpy and deterministic in ``(seed, split)``; weighted sampling without replacement
uses Gumbel-top-k, which draws the same distribution and order as ``numpy.random.choice(..., replace=False,
p=p)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import grain
import numpy as np

from gated_jax.data.sources import SOURCES, SPLITS, TRAIN, canonical_split

_BLOCK = 8192  # examples generated per vectorised block (bounds the temporaries)


@dataclasses.dataclass(frozen=True)
class MQARConfig:
  """Zoology's ``multiquery_ar`` arguments (defaults as in Zoology's Figure 2 configs).

  Attributes:
    seq_len: ``L``, even.
    num_kv_pairs: ``n``, the number of key-value pairs (and queries).
    vocab_size: ``V > L``; keys come from ``[1, V/2)``, values from ``[V/2, V)``.
    power_a: exponent ``a`` of the power-law gap distribution.
    random_non_queries: fill non-query positions with uniform random tokens instead of 0.
    num_passes: times the key-value context is repeated (JRT option; 1 in Zoology's figures).
  """
  seq_len: int = 64
  num_kv_pairs: int = 4
  vocab_size: int = 8192
  power_a: float = 0.01
  random_non_queries: bool = False
  num_passes: int = 1

  def __post_init__(self):
    for name in ("seq_len", "num_kv_pairs", "vocab_size", "num_passes"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if self.seq_len % 2:
      raise ValueError(f"seq_len: must be even, got {self.seq_len}")
    if self.vocab_size <= self.seq_len:
      raise ValueError(f"vocab_size: must exceed seq_len={self.seq_len}, got {self.vocab_size}")
    if self.num_kv_pairs > self.vocab_size // 2 - 1:
      raise ValueError(f"num_kv_pairs: at most vocab_size // 2 - 1 = {self.vocab_size // 2 - 1} distinct keys, "
                       f"got {self.num_kv_pairs}")
    if self.context_len + 2 * self.num_kv_pairs > self.seq_len:
      raise ValueError(f"num_kv_pairs: need 2*num_kv_pairs*num_passes + 2*num_kv_pairs <= seq_len={self.seq_len}, "
                       f"got num_kv_pairs={self.num_kv_pairs}, num_passes={self.num_passes}")
    if not self.power_a > 0:
      raise ValueError(f"power_a: expected a positive float, got {self.power_a!r}")

  @property
  def context_len(self) -> int:
    return 2 * self.num_kv_pairs * self.num_passes


def generate(config: MQARConfig, num_examples: int, seed: int | list[int]) -> dict[str, np.ndarray]:
  """Generates ``num_examples`` MQAR examples.

  Args:
    config: the task definition.
    num_examples: number of examples ``N``.
    seed: a non-negative int (or list of them); the same ``(config, num_examples, seed)`` gives the same arrays.
  Returns:
    ``{"inputs": int32 (N, L), "targets": int32 (N, L), "weights": float32 (N, L)}``.
  """
  if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples <= 0:
    raise ValueError(f"num_examples: expected a positive int, got {num_examples!r}")
  root = np.random.SeedSequence(seed)
  blocks = [_generate_block(config, min(_BLOCK, num_examples - start), np.random.default_rng(child))
            for start, child in zip(range(0, num_examples, _BLOCK),
                                    root.spawn((num_examples + _BLOCK - 1) // _BLOCK))]
  return {name: np.concatenate([b[name] for b in blocks]) for name in blocks[0]}


def _generate_block(config: MQARConfig, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """One vectorised block of ``n`` examples (see :func:`generate`)."""
  kv, half, length = config.num_kv_pairs, config.vocab_size // 2, config.seq_len
  keys_NP = 1 + _sample_without_replacement(rng, n, half - 1, kv)
  values_NP = half + _sample_without_replacement(rng, n, config.vocab_size - half, kv)
  slots = (length - config.context_len) // 2
  log_p = np.log(config.power_a) + (config.power_a - 1) * np.log(np.arange(1, slots + 1))
  gaps_NP = _sample_without_replacement(rng, n, slots, kv, log_p=log_p)

  # The sequence has L + 1 tokens so that inputs = seq[:-1] and targets = seq[1:] (next-token prediction).
  seq_NL = np.zeros((n, length + 1), np.int64)
  pairs_N2P = np.stack([keys_NP, values_NP], axis=-1).reshape(n, 2 * kv)
  seq_NL[:, :config.context_len] = np.tile(pairs_N2P, (1, config.num_passes))
  query_pos_NP = config.context_len + 2 * gaps_NP
  np.put_along_axis(seq_NL, query_pos_NP, keys_NP, axis=1)
  if config.random_non_queries:
    filler = rng.integers(0, config.vocab_size, size=seq_NL.shape)
    seq_NL = np.where(seq_NL == 0, filler, seq_NL)
  targets_NL = seq_NL[:, 1:].copy()
  np.put_along_axis(targets_NL, query_pos_NP, values_NP, axis=1)
  weights_NL = np.zeros((n, length), np.float32)
  np.put_along_axis(weights_NL, query_pos_NP, 1.0, axis=1)
  return {"inputs": seq_NL[:, :-1].astype(np.int32), "targets": targets_NL.astype(np.int32),
          "weights": weights_NL}


def _sample_without_replacement(rng: np.random.Generator, n: int, population: int, k: int,
                                log_p: np.ndarray | None = None) -> np.ndarray:
  """``(n, k)`` indices into ``range(population)``, distinct per row, in draw order.

  Weighted (or small-population) draws use Gumbel-top-k; uniform draws from a large population keep the
  first ``k`` distinct values of ``2k`` draws with replacement (the same distribution, without an
  ``(n, population)`` matrix), redrawing the rare rows that have fewer.
  """
  if log_p is not None or population <= 16 * k:
    scores_NP = rng.gumbel(size=(n, population)) + (0.0 if log_p is None else log_p)
    return np.argsort(-scores_NP, axis=1)[:, :k]
  draws_NM = rng.integers(0, population, size=(n, 2 * k))
  order_NM = np.argsort(draws_NM, axis=1, kind="stable")
  sorted_NM = np.take_along_axis(draws_NM, order_NM, axis=1)
  repeat_NM = np.zeros_like(draws_NM, dtype=bool)
  np.put_along_axis(repeat_NM, order_NM[:, 1:], sorted_NM[:, 1:] == sorted_NM[:, :-1], axis=1)
  first_NK = np.argsort(repeat_NM, axis=1, kind="stable")[:, :k]  # positions of first occurrences, in order
  out_NK = np.take_along_axis(draws_NM, first_NK, axis=1)
  short = np.flatnonzero((~repeat_NM).sum(axis=1) < k)
  if short.size:
    out_NK[short] = _sample_without_replacement(rng, short.size, population, k)
  return out_NK


def config_from_data(data_config: Any) -> MQARConfig:
  """Builds :class:`MQARConfig` from a data ConfigDict (``seq_len`` and optional task fields)."""
  fields = {f.name: data_config[f.name] for f in dataclasses.fields(MQARConfig)
            if f.name in data_config and data_config[f.name] is not None}
  return MQARConfig(**fields)


@SOURCES.register("mqar")
def make_source(data_config: Any, split: str) -> grain.MapDataset:
  """``grain.MapDataset`` of MQAR examples for ``split``.

  Args:
    data_config: ConfigDict with ``seq_len`` and optionally ``num_kv_pairs``, ``vocab_size``, ``power_a``,
      ``random_non_queries``, ``num_passes``, ``seed`` (default 0), ``num_train_examples`` (default 100,000)
      and ``num_eval_examples`` (default 3,000), Zoology's Figure 2 sizes.
    split: ``"train"`` or ``"validation"`` (or an alias, see ``sources.canonical_split``): independent draws
      of the same task.
  Returns:
    A dataset of dicts ``{"inputs": int32 (L,), "targets": int32 (L,), "weights": float32 (L,)}``.
  """
  split = canonical_split(split)
  config = config_from_data(data_config)
  get = lambda name, default: data_config[name] if name in data_config and data_config[name] is not None else default
  num = get("num_train_examples", 100_000) if split == TRAIN else get("num_eval_examples", 3_000)
  return grain.MapDataset.source(_Examples(_cached_generate(config, int(num), int(get("seed", 0)),
                                                            SPLITS.index(split))))


@functools.lru_cache(maxsize=8)
def _cached_generate(config: MQARConfig, num_examples: int, seed: int, split_index: int):
  """Per-process cache: the trainer asks for the same split repeatedly (evaluation every few steps)."""
  return generate(config, num_examples, seed=[seed, split_index])


class _Examples:
  """Random-access view of generated arrays, one dict per example (grain's data source protocol)."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self._arrays = arrays

  def __len__(self) -> int:
    return len(self._arrays["inputs"])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {name: array[index] for name, array in self._arrays.items()}
