"""Models assembled from the layer registries: the decoder LM, its config builder and cached generation, and
the patch-token image classifier."""

from gated_jax.models.generate import generate
from gated_jax.models.lm import Block, DecoderLM, lm_from_config
from gated_jax.models.vision import VisionClassifier

__all__ = ["Block", "DecoderLM", "VisionClassifier", "generate", "lm_from_config"]
