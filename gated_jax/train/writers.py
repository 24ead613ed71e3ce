"""Where training metrics go: a JSONL file and TensorBoard event files in the workdir, from process 0 only.

``metrics.jsonl`` gets one JSON object per logged step (``{"step": ..., "loss": ..., ...}``; eval entries
carry ``eval_`` keys); a resumed run appends to it. TensorBoard scalars are written with the ``tensorboard``
package's own event-file writer (no TensorFlow needed): ``tensorboard --logdir WORKDIR/tensorboard``.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Mapping

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class MetricWriter:
  """Writes scalar metrics to ``workdir/metrics.jsonl`` and ``workdir/tensorboard/`` (no-op when disabled)."""

  def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._events = None
    if not enabled:
      return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
    if tensorboard:
      self._events = EventFileWriter(str(workdir / "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")
    self._jsonl.flush()
    if self._events is not None:
      values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
      self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                             summary=summary_pb2.Summary(value=values)))

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._events is not None:
      self._events.close()
