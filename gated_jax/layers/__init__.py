"""Flax linen layers, one file per family; importing this package fills the MIXERS and MLPS registries."""

from gated_jax.layers import attention, linear_attention, mlp, norms, positional, slstm  # noqa: F401  (registration)
from gated_jax.layers.registry import MIXERS, MLPS, Registry

__all__ = ["MIXERS", "MLPS", "Registry"]
