"""Checkpoints of a training run: one orbax ``CheckpointManager`` step holds the train state (params,
optimizer state, step, RNG), the grain iterator state of every process and the run's identity.

Layout: ``WORKDIR/checkpoints/<step>/{state, data, meta}``. Saves are asynchronous (orbax writes to a
temporary directory and commits it atomically, so a run killed mid-save leaves the previous step intact);
``max_to_keep`` keeps the newest ones. ``restore`` reads onto whatever shardings the abstract state carries,
so a checkpoint written on one mesh continues on another. ``meta`` records what must not change across a
resume (the model and the data stream); a checkpoint whose ``meta`` differs, or that orbax cannot read, is a
``CheckpointError`` naming the directory, never a silent restart from scratch.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import grain
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint that cannot be resumed: incompatible with the config, or unreadable."""


def _normalised(value: Any) -> Any:
  return json.loads(json.dumps(value, sort_keys=True, default=str))


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      out += _differences(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append(f"{prefix}{key}: checkpoint {a!r}, config {b!r}")
  return out


class Checkpointer:
  """Saves and restores ``(state, data iterator, meta)`` under ``directory`` (see the module docstring)."""

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 2, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, iterator: grain.DatasetIterator, meta: Mapping[str, Any]) -> None:
    """Starts an (asynchronous) save of ``step``; every process must call it."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator),
        meta=ocp.args.JsonSave(_normalised(dict(meta)))), force=True)

  def restore(self, step: int, abstract_state: Any, iterator: grain.DatasetIterator,
              meta: Mapping[str, Any]) -> Any:
    """The state of ``step`` with the shardings of ``abstract_state``; ``iterator`` is moved to its position.

    Raises:
      CheckpointError: the checkpoint's meta differs from ``meta`` or orbax cannot read it.
    """
    where = self.directory / str(step)
    try:
      saved = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # orbax raises many types for unreadable files
      raise CheckpointError(f"checkpoint {where}: cannot read its meta ({type(e).__name__}: {e}); delete it or "
                            "use another workdir") from e
    diffs = _differences(saved, _normalised(dict(meta)))
    if diffs:
      raise CheckpointError(f"checkpoint {where} was written by a different run; resuming would mix them. "
                            f"Differences: {'; '.join(diffs)}. Use another workdir or restore the config.")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(iterator)))
    except Exception as e:
      raise CheckpointError(f"checkpoint {where}: cannot restore the train state or data iterator "
                            f"({type(e).__name__}: {e}); delete it or use another workdir") from e
    return restored.state

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
