"""Feature maps phi(.) applied to linear-attention queries/keys, and the q/k normalisers.

Linear attention replaces exp(q.k) by phi(q).phi(k) (Katharopoulos et al., arXiv 2006.16236 eq. 5: phi =
elu + 1); GLA/RetNet use the identity, TransNormerLLM/HGRN2/GSA a swish (arXiv 2307.14995, 2404.07904,
2409.07146), LINA ReLU + 1e-6 (arXiv 2601.22630). ``l2_normalize`` is fla's ``x / sqrt(sum x^2 + 1e-6)``
used on DeltaNet/GDN queries and keys (arXiv 2406.06484 §3.3); ``sum_normalize`` is fla DeltaNet's
``qk_norm="sum"`` option, ``x / sum(x)`` (meant for positive feature maps such as ReLU or ELU + 1).

fla's DeltaNet ``qk_activation`` names map onto ``FEATURE_MAPS`` as: "silu" -> "swish", "relu" -> "relu",
"elu" -> "elu_plus_one", "identity" -> "identity".
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels import _checks

FEATURE_MAPS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": lambda x: x,
    "elu_plus_one": lambda x: nn.elu(x) + 1.0,
    "relu": nn.relu,
    "relu_eps": lambda x: nn.relu(x) + 1e-6,
    "swish": nn.swish,
}


def get_feature_map(name: str, *, argument: str = "feature_map") -> Callable[[jax.Array], jax.Array]:
  """The feature map called ``name`` (ValueError naming ``argument`` and the known maps otherwise)."""
  _checks.check_choice(argument, name, tuple(FEATURE_MAPS))
  return FEATURE_MAPS[name]


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """``x / sqrt(sum(x^2) + eps)`` over the last axis, computed in float32, returned in ``x.dtype``."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def sum_normalize(x: jax.Array) -> jax.Array:
  """``x / sum(x)`` over the last axis, computed in float32, returned in ``x.dtype`` (no epsilon, as fla)."""
  x32 = x.astype(jnp.float32)
  return (x32 / jnp.sum(x32, axis=-1, keepdims=True)).astype(x.dtype)


QK_NORMS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "none": lambda x: x,
    "l2": l2_normalize,
    "sum": sum_normalize,
}
