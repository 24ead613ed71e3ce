"""Grain data sources and pipelines; importing this package fills the ``SOURCES`` registry.

Sources: ``stdlib_bytes`` (byte-level LM corpus from the Python standard library, ``corpus.py``) and ``mqar``
(Zoology multi-query associative recall, ``mqar.py``).
"""

from gated_jax.data import corpus, mqar  # noqa: F401  (registration)
from gated_jax.data.sources import SOURCES

__all__ = ["SOURCES"]
