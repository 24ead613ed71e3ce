"""``train(config, workdir)``: the training loop of every gated_jax experiment (docs/architecture.md, "Training").

One function runs on one CPU, one GPU or a TPU pod slice unchanged:

* ``train.mode="jit"`` (default): a ``(data, fsdp, tensor, expert)`` mesh from ``config.mesh``; parameters
  and optimizer state are created already sharded (``jax.jit(init, out_shardings=...)`` with the logical
  rules of ``sharding.RULES``); the step is jitted with explicit in/out shardings under ``jax.set_mesh``.
  ``train.mode="pmap"``: classic data parallelism over this host's devices (state replicated, gradients
  ``psum``-ed).
* Data: ``gated_jax.data.pipeline`` (grain); each process reads its own shard; global batches are assembled
  with ``jax.make_array_from_process_local_data``.
* Checkpoints (``workdir/checkpoints``, ``checkpoint.Checkpointer``): params, optimizer state, step, RNG and
  the grain iterator every ``train.checkpoint_every`` steps and at the end; a run restarted with the same
  command resumes from the latest one, with the same losses and data order as an uninterrupted run.
* A NaN/Inf loss or gradient stops the run with a ``FloatingPointError`` before anything non-finite is
  saved; the last good checkpoint stays.
* Metrics: ``workdir/metrics.jsonl`` and TensorBoard (process 0), a tqdm bar with loss, tokens/s and MFU
  (``flops.py``), a final summary line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import NamedSharding, PartitionSpec

from gated_jax.data import pipeline
from gated_jax.train import checkpoint, distributed, flops, metrics, sharding, step, writers
from gated_jax.train.optim import learning_rate_schedule, make_optimizer

MODES = ("jit", "pmap")
_NOT_IN_META = ("num_workers",)  # data fields that may change across a resume

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
  """What a run produced.

  Attributes:
    history: logged training entries ``{"step", "loss", "accuracy", "grad_norm", "lr", ...}`` of this call.
    eval: final validation ``loss`` and ``accuracy`` (weighted by the batch weights), plus the diagnostics of
      ``gated_jax.train.metrics`` when ``train.diagnostics``.
    num_params: parameter count.
    params: final parameters (host-local view: jit mode global arrays, pmap mode one replica).
    step: the step reached.
    resumed_from: the checkpoint step this call resumed from (None: a fresh start).
  """
  history: list[dict[str, float]]
  eval: dict[str, float]
  num_params: int
  params: Any
  step: int
  resumed_from: int | None


def _positive_int(config: Any, path: str) -> int:
  group, field = path.split(".")
  value = config[group][field]
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{path}: got {value!r}; allowed: a positive int")
  return value


def _host(tree: Any) -> Any:
  """Host numpy copies of (replicated, possibly multi-process) arrays."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x),
                      tree)


def _run_meta(config: Any) -> dict[str, Any]:
  data = {k: v for k, v in config.data.to_dict().items() if k not in _NOT_IN_META}
  return {"model": config.model.to_dict(), "data": data, "seed": config.seed,
          "process_count": jax.process_count()}


class _Runner:
  """The compiled pieces of one run in ``jit`` or ``pmap`` mode (placement, steps, checkpoint views)."""

  def __init__(self, config: Any, fns: step.StepFns, example: jax.ShapeDtypeStruct):
    self.mode = config.train.mode
    rng = jax.random.PRNGKey(config.seed)
    boxed_init = step.boxed_state_fn(fns.model, fns.tx, example)
    abstract = jax.eval_shape(boxed_init, rng)
    if self.mode == "jit":
      self.mesh = sharding.make_mesh(config.mesh)
      self.shardings = sharding.logical_shardings(abstract, self.mesh)
      batch_sh = sharding.batch_sharding(self.mesh)
      with jax.set_mesh(self.mesh):
        self.state = jax.jit(step.unboxed(boxed_init), out_shardings=self.shardings)(rng)
      replicated = NamedSharding(self.mesh, PartitionSpec())
      self._train = jax.jit(fns.train_step, in_shardings=(self.shardings, batch_sh),
                            out_shardings=(self.shardings, replicated), donate_argnums=0)
      self._eval = jax.jit(fns.eval_step, in_shardings=(self.shardings["params"], batch_sh),
                           out_shardings=replicated)
      self._intermediates = jax.jit(fns.intermediates, in_shardings=(self.shardings["params"], batch_sh))
      self.abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   step.unboxed(lambda: abstract)(), self.shardings)
    else:
      self.mesh = None
      self.devices = jax.local_devices()
      single = jax.jit(step.unboxed(boxed_init))(rng)
      self.state = self._replicate(single)
      pfns = dataclasses.replace(fns, pmap=True)
      self._train = jax.pmap(pfns.train_step, axis_name=step.PMAP_AXIS, donate_argnums=0)
      self._eval = jax.pmap(pfns.eval_step, axis_name=step.PMAP_AXIS)
      self._intermediates = jax.jit(fns.intermediates)
      self.abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), single)

  def _replicate(self, tree: Any) -> Any:
    n = len(self.devices)
    return jax.pmap(lambda x: x, devices=self.devices)(jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)),
                                                                    tree))

  def put(self, local_batch: Mapping[str, np.ndarray]) -> Any:
    if self.mode == "jit":
      return sharding.global_batch(local_batch, self.mesh)
    n = len(self.devices)
    rows = next(iter(local_batch.values())).shape[0]
    if rows % n:
      raise ValueError(f"data.batch_size: the local batch of {rows} rows does not split over {n} devices (pmap)")
    return {k: v.reshape(n, rows // n, *v.shape[1:]) for k, v in local_batch.items()}

  def train_step(self, batch: Any) -> dict[str, float]:
    with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
      self.state, m = self._train(self.state, batch)
    m = _host(m)
    return {k: float(v.reshape(-1)[0]) for k, v in m.items()}

  def eval_sums(self, batch: Any) -> dict[str, float]:
    with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
      sums = _host(self._eval(self.params(), batch))
    return {k: float(v.reshape(-1)[0]) for k, v in sums.items()}

  def intermediates(self, local_batch: Mapping[str, np.ndarray]) -> Any:
    if self.mode == "jit":
      with jax.set_mesh(self.mesh):
        return _host(self._intermediates(self.params(), sharding.global_batch(local_batch, self.mesh)))
    return _host(self._intermediates(self.params(), dict(local_batch)))

  def params(self) -> Any:
    return self.state["params"]

  def checkpoint_view(self) -> Any:
    """The state as saved: global arrays (jit) or one replica (pmap)."""
    if self.mode == "jit":
      return self.state
    return jax.tree.map(lambda x: x[0], self.state)

  def load(self, saved: Any) -> None:
    self.state = saved if self.mode == "jit" else self._replicate(saved)

  def final_params(self) -> Any:
    return self.checkpoint_view()["params"]


class _Throughput:
  """Tokens/s between reports, leaving out the first step of a call (compilation) and eval/checkpoint time."""

  def __init__(self, tokens_per_step: int):
    self.tokens_per_step = tokens_per_step
    self.start: float | None = None
    self.steps = 0

  def step_done(self) -> None:
    if self.start is None:
      self.start = time.perf_counter()
    else:
      self.steps += 1

  @contextlib.contextmanager
  def paused(self):
    began = time.perf_counter()
    yield
    if self.start is not None:
      self.start += time.perf_counter() - began

  def report(self) -> float | None:
    """Tokens/s since the previous report (None when only the compiling step ran)."""
    now = time.perf_counter()
    rate = self.tokens_per_step * self.steps / max(now - self.start, 1e-9) if self.steps else None
    self.start, self.steps = now, 0
    return rate


def _guard(finite: float, m: Mapping[str, float], step_number: int, ckpt: checkpoint.Checkpointer | None) -> None:
  """The NaN/Inf guard: FloatingPointError naming the step and the last good checkpoint."""
  if finite:
    return
  last = ckpt.latest_step() if ckpt is not None else None
  where = f"step {last} in {ckpt.directory}" if last is not None else "none"
  raise FloatingPointError(f"non-finite loss or gradient at step {step_number} (loss {m['loss']}, grad_norm "
                           f"{m['grad_norm']}); stopped before saving it. Last good checkpoint: {where}")


def _checksum(inputs_BT: np.ndarray) -> float:
  """A position-weighted checksum of the batch's tokens (logged to check the data order across resumes)."""
  weights = 1 + np.arange(inputs_BT.shape[1])
  return float(np.sum(inputs_BT.astype(np.int64) * weights) % 1_000_003)


def _validate(config: Any) -> None:
  for path in ("train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
               "train.checkpoint_every", "train.grad_accum", "train.max_to_keep"):
    _positive_int(config, path)
  if config.train.mode not in MODES:
    raise ValueError(f"train.mode: got {config.train.mode!r}; allowed: {', '.join(MODES)}")
  local_rows = config.data.batch_size // max(jax.process_count(), 1)
  if local_rows % config.train.grad_accum:
    raise ValueError(f"train.grad_accum: got {config.train.grad_accum}; allowed: a divisor of the per-process "
                     f"batch of {local_rows} rows")


def _plain_dict(value: Any) -> dict[str, float]:
  value = value.to_dict() if hasattr(value, "to_dict") else dict(value)
  for name, weight in value.items():
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
      raise ValueError(f"train.aux_loss_weights.{name}: got {weight!r}; allowed: a finite float")
  return {k: float(v) for k, v in value.items()}


def evaluate(runner: _Runner, batches: list[dict[str, np.ndarray]], diagnostics: bool) -> dict[str, float]:
  """Validation loss and accuracy over ``batches`` (weighted), the layers' sown metrics (weighted means) and,
  if asked, the attention/activation diagnostics."""
  totals: dict[str, float] = {}
  for batch in batches:
    for k, v in runner.eval_sums(runner.put(batch)).items():
      totals[k] = totals.get(k, 0.0) + v
  weight = max(totals.pop("weight_sum"), 1.0)
  result = {"loss": totals.pop("loss_sum") / weight, "accuracy": totals.pop("correct_sum") / weight}
  result.update({k.removesuffix("_sum"): v / weight for k, v in totals.items()})
  if diagnostics:
    result.update(metrics.summarize_intermediates(runner.intermediates(batches[0])))
  return result


def train(config: Any, workdir: str | pathlib.Path | None = None) -> TrainResult:
  """Trains ``config`` (``experiments/configs/lm.py``'s fields), resuming from ``workdir`` if it holds a checkpoint.

  Args:
    config: ConfigDict with groups ``model``, ``data``, ``optim``, ``train``, ``mesh``, ``distributed`` and
      ``seed``.
    workdir: directory for checkpoints and metrics (default ``config.workdir``; empty: no checkpoints or
      metric files).

  Raises:
    ValueError: a bad config field (named in the message).
    checkpoint.CheckpointError: the workdir holds a checkpoint this config cannot resume.
    FloatingPointError: the loss or gradient became NaN/Inf (the last good checkpoint is kept).
  """
  distributed.initialize(config.get("distributed"))
  _validate(config)
  workdir = workdir or config.get("workdir") or None
  workdir = pathlib.Path(workdir) if workdir else None
  steps, is_chief = config.train.steps, jax.process_index() == 0
  model = step.make_model(config)
  schedule_steps = config.optim.get("schedule_steps") or steps
  tx = make_optimizer(config.optim, schedule_steps)
  aux_weights = tuple(sorted(_plain_dict(config.train.get("aux_loss_weights", {})).items()))
  fns = step.StepFns(model, tx, learning_rate_schedule(config.optim, schedule_steps), config.train.grad_accum,
                     aux_loss_weights=aux_weights)
  local = dict(process_index=jax.process_index(), process_count=jax.process_count())
  iterator = pipeline.train_iterator(config.data, seed=config.seed, **local)
  eval_data = pipeline.eval_batches(config.data, num_batches=config.train.eval_batches, **local)
  example = jax.ShapeDtypeStruct((1, config.data.seq_len), jnp.int32)
  runner = _Runner(config, fns, example)
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(runner.abstract["params"]))

  ckpt = resumed = None
  start = 0
  meta = _run_meta(config)
  if workdir is not None:
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=config.train.max_to_keep,
                                   async_save=config.train.get("async_checkpointing", True))
    resumed = ckpt.latest_step()
    if resumed is not None:
      runner.load(ckpt.restore(resumed, runner.abstract, iterator, meta))
      start = resumed
  writer = writers.MetricWriter(workdir or ".", enabled=is_chief and workdir is not None,
                                tensorboard=config.train.get("tensorboard", True))
  flops_per_token = flops.model_flops_per_token(runner.abstract["params"], config.model, config.data.seq_len)
  peak = flops.peak_flops_per_device(jax.devices()[0], config.train.get("peak_flops"))
  history: list[dict[str, float]] = []
  bar = tqdm.tqdm(total=steps, initial=start, disable=not (is_chief and config.train.get("progress", True)),
                  desc="train", dynamic_ncols=True)
  throughput = _Throughput(config.data.batch_size * config.data.seq_len)
  try:
    for i in range(start, steps):
      local_batch = next(iterator)
      m = runner.train_step(runner.put(local_batch))
      done = i + 1
      _guard(m.pop("finite"), m, done, ckpt)
      throughput.step_done()
      m["tokens_checksum"] = _checksum(local_batch["inputs"])
      if done % config.train.log_every == 0 or done == steps:
        rate = throughput.report()
        if rate is not None:
          m["tokens_per_s"] = rate
          if peak:
            m["mfu"] = flops_per_token * rate / (peak * jax.device_count())
        history.append({"step": done, **m})
        writer.write(done, m)
        bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{rate:.3g}" if rate else "n/a",
                        mfu=f"{m['mfu']:.1%}" if "mfu" in m else "n/a", refresh=False)
      with throughput.paused():
        if done % config.train.eval_every == 0 and done != steps:
          writer.write(done, {f"eval_{k}": v for k, v in evaluate(runner, eval_data, False).items()})
        if ckpt is not None and (done % config.train.checkpoint_every == 0 or done == steps):
          ckpt.save(done, runner.checkpoint_view(), iterator, meta)
      bar.update(1)
    final = evaluate(runner, eval_data, config.train.get("diagnostics", False))
    writer.write(max(steps, start), {f"eval_{k}": v for k, v in final.items()})
  finally:
    bar.close()
    writer.close()
    if ckpt is not None:
      ckpt.close()
  if is_chief:
    log.info("finished step %d: val loss %.4f, accuracy %.4f, %d params", max(steps, start), final["loss"],
             final["accuracy"], num_params)
  return TrainResult(history=history, eval=final, num_params=num_params, params=runner.final_params(),
                     step=max(steps, start), resumed_from=resumed)
