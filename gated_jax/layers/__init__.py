"""Flax linen layers, one file per family; importing this package fills the MIXERS and MLPS registries."""

from gated_jax.layers import (  # noqa: F401  (registration)
    attention, gated_conv, h3, hyena, linear_attention, mlp, moe, norms, positional, slstm)
from gated_jax.layers.moe import ROUTERS
from gated_jax.layers.spiking import mixers as spiking_mixers, mlp as spiking_mlp  # noqa: F401  (registration)
from gated_jax.layers.registry import MIXERS, MLPS, Registry

__all__ = ["MIXERS", "MLPS", "ROUTERS", "Registry"]
