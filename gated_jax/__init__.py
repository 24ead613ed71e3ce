"""gated_jax: functional Flax modules for gating mechanisms, their models, data and training.

Subpackages: ``gated_jax.layers`` (mixers and MLPs by registry), ``gated_jax.models`` (decoder LM),
``gated_jax.data`` (grain sources and pipelines), ``gated_jax.train`` (configs, sharding, trainer,
checkpoints, metrics). The sequence-mixing math lives in the separate ``pallas_kernels`` package.
"""

__version__ = "0.1.0"
