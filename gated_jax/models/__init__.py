"""Models assembled from the layer registries: the decoder LM, its config builder and cached generation."""

from gated_jax.models.generate import generate
from gated_jax.models.lm import Block, DecoderLM, lm_from_config

__all__ = ["Block", "DecoderLM", "generate", "lm_from_config"]
