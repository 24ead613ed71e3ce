"""Paper tables, one module per table, each exposing ``TABLE`` (an ``experiments.tables.common.Table``).

A module dropped into this package is registered under its file name; ``names()`` lists them and
``get(name)`` imports one (ValueError listing the known names otherwise).
"""

from __future__ import annotations

import importlib
import pkgutil

from experiments.tables.common import Table

_NOT_TABLES = frozenset({"common"})


def names() -> tuple[str, ...]:
  """The registered table names, sorted."""
  return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                      if m.name not in _NOT_TABLES and not m.name.startswith("_")))


def get(name: str) -> Table:
  """The ``Table`` declared by ``experiments/tables/<name>.py``."""
  if name not in names():
    raise ValueError(f"table: got {name!r}; known: {', '.join(names())}")
  return importlib.import_module(f"{__name__}.{name}").TABLE


__all__ = ["Table", "get", "names"]
