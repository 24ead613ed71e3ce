"""Spiking layers: surrogate spike functions, neurons, and (registered on import of ``gated_jax.layers``) the
spiking MLP and the spiking sequence mixers. See ``docs/spiking.md``."""

from gated_jax.layers.spiking import surrogates
from gated_jax.layers.spiking.neurons import (LIF, NEURONS, PLIF, SPIKE_RATE, ParallelLIF, UltraDLIF, UltraDPLIF,
                                              UltraLIF, UltraPLIF, get_neuron)

__all__ = ["LIF", "NEURONS", "PLIF", "SPIKE_RATE", "ParallelLIF", "UltraDLIF", "UltraDPLIF", "UltraLIF",
           "UltraPLIF", "get_neuron", "surrogates"]
