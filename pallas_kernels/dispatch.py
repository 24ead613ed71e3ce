"""The single dispatch layer: registry of implementations per op, selection, overrides, errors.

Every public op (``attention``, ``linear_attention``, ``delta_rule``) is an :class:`Op`. An op owns an
ordered table of implementations; a call picks one of them:

* ``implementation=None`` (auto): the overrides below if set, otherwise every implementation that is part of
  the auto order and supports the current backend, best first, then ``"xla"``, then ``"reference"`` as the
  last resort for calls no fast path supports (e.g. sort-based normalizers), with a :class:`FallbackWarning`.
* ``implementation="name"``: exactly that one; its ``NotImplementedError`` propagates with its message.
* ``implementation=("a", "b", ...)``: tried in order; ``NotImplementedError`` moves on to the next.

Auto selection is honest about hardware: a Pallas kernel enters a backend's auto order only when that backend
is in its ``validated_on`` — set at registration, and only after the kernel ran compiled on that backend and
beat ``"xla"`` in a benchmark committed under ``experiments/benchmarks/results/``. Until then it is opt-in by
name. Interpret mode makes Pallas kernels *runnable* on any backend but never puts them in the auto order.

A fallback is never silent: when an implementation that was tried raises ``NotImplementedError`` and a later
one runs instead, a :class:`FallbackWarning` says which, and why (once per message, Python's default warning
filter). Silence it with ``warnings.filterwarnings("ignore", category=pallas_kernels.FallbackWarning)``.

Overrides that need no change to model code, in decreasing precedence after an explicit argument:

* ``with pallas_kernels.use("xla"): ...`` or ``use(attention="reference", linear_attention="xla")``;
* the environment variable ``GATED_JAX_IMPL``: ``"xla"``, ``"pallas_tpu,xla"`` (all ops), or per op
  ``"attention=reference;linear_attention=parallel,xla"``.

``with pallas_kernels.interpret(): ...`` runs the Pallas implementations in interpret mode, which makes them
runnable by name on any backend (so the same kernels run on a CPU).

Implementations are registered lazily by module path, so hardware-specific imports
(``jax.experimental.pallas.tpu``, ``...pallas.triton``, ``jax_triton``) happen only when that implementation is
first selected; an import failure becomes a ``NotImplementedError`` that auto selection skips.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

ENV_VAR = "GATED_JAX_IMPL"

# All names an implementation may have. "parallel" is the quadratic form of the linear-attention ops.
KNOWN_IMPLEMENTATIONS = ("reference", "parallel", "xla", "pallas_tpu", "pallas_triton", "triton")

_OVERRIDES: contextvars.ContextVar[dict[str | None, tuple[str, ...]]] = contextvars.ContextVar(
    "gated_jax_impl_overrides", default={})
_INTERPRET: contextvars.ContextVar[bool] = contextvars.ContextVar("gated_jax_pallas_interpret", default=False)


class FallbackWarning(UserWarning):
  """An implementation raised ``NotImplementedError`` and a later candidate ran instead."""


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One way of computing an op.

  Attributes:
    name: one of ``KNOWN_IMPLEMENTATIONS``.
    target: ``"module.path:function"``, imported on first use (keeps hardware imports lazy).
    platforms: backends it runs on natively (``"cpu"``, ``"gpu"``, ``"tpu"``); ``None`` means all.
    auto_priority: position in the auto order (lower first); ``None`` keeps it out of auto selection.
    pallas: whether it is a Pallas kernel (runnable everywhere under :func:`interpret`).
    validated_on: backends where this Pallas kernel ran compiled and beat ``"xla"`` in a committed benchmark;
      only there may auto selection pick it.
  """
  name: str
  target: str
  platforms: frozenset[str] | None = None
  auto_priority: int | None = None
  pallas: bool = False
  validated_on: frozenset[str] = frozenset()

  def load(self) -> Callable[..., Any]:
    module_name, _, attr = self.target.partition(":")
    try:
      module = importlib.import_module(module_name)
    except ImportError as e:  # e.g. jax_triton on a CPU-only jaxlib
      raise NotImplementedError(f"implementation {self.name!r} is unavailable here: {e}") from e
    return getattr(module, attr)

  def supports_backend(self, backend: str) -> bool:
    if self.pallas and interpret_mode():
      return True
    return self.platforms is None or backend in self.platforms

  def in_auto_order(self, backend: str) -> bool:
    """Whether auto selection may pick it on ``backend`` (Pallas kernels: only where validated)."""
    if self.auto_priority is None:
      return False
    if self.pallas:
      return backend in self.validated_on
    return self.platforms is None or backend in self.platforms


_OPS: dict[str, "Op"] = {}


def registered_ops() -> tuple["Op", ...]:
  """Every op of the library (each op module registers its own at import; ``pallas_kernels`` imports all)."""
  import pallas_kernels  # pylint: disable=import-outside-toplevel,unused-import  (fills the table)
  return tuple(_OPS.values())


class Op:
  """A public op: validation is done by the caller; this object picks and runs an implementation.

  ``Op(name)`` makes a free-standing op (tests); ``Op.public(name)`` also lists it in :func:`registered_ops`.
  """

  def __init__(self, name: str):
    self.name = name
    self._impls: dict[str, Implementation] = {}

  @classmethod
  def public(cls, name: str) -> "Op":
    if name in _OPS:
      raise ValueError(f"op {name!r} is already registered")
    _OPS[name] = op = cls(name)
    return op

  def register(self, name: str, target: str, *, platforms: Sequence[str] | None = None,
               auto_priority: int | None = None, pallas: bool = False, validated_on: Sequence[str] = ()) -> None:
    if name not in KNOWN_IMPLEMENTATIONS:
      raise ValueError(f"implementation name {name!r} is not one of {KNOWN_IMPLEMENTATIONS}")
    if validated_on and not pallas:
      raise ValueError(f"validated_on: got {tuple(validated_on)} for {name!r}; only Pallas kernels carry it")
    self._impls[name] = Implementation(name, target, None if platforms is None else frozenset(platforms),
                                       auto_priority, pallas, frozenset(validated_on))

  @property
  def implementations(self) -> tuple[str, ...]:
    return tuple(self._impls)

  def auto_order(self, backend: str | None = None) -> tuple[str, ...]:
    """Implementations auto selection tries on ``backend`` (default: the current one), best first."""
    backend = backend or current_backend()
    ranked = sorted((i for i in self._impls.values() if i.in_auto_order(backend)), key=lambda i: i.auto_priority)
    names = [i.name for i in ranked if i.name not in ("xla", "reference")]
    return (*names, "xla", *(("reference",) if "reference" in self._impls else ()))

  def validated(self) -> dict[str, tuple[str, ...]]:
    """Pallas implementation -> backends where auto selection may pick it (docs/architecture.md, "Dispatch";
    the README lists them)."""
    return {i.name: tuple(sorted(i.validated_on)) for i in self._impls.values() if i.pallas}

  def resolve(self, implementation: str | Sequence[str] | None) -> tuple[tuple[str, ...], bool]:
    """Returns the candidate names and whether they were named explicitly (single-name errors propagate)."""
    if implementation is None:
      implementation = _override_for(self.name, self.implementations)
      if implementation is None:
        return self.auto_order(), False
    names = (implementation,) if isinstance(implementation, str) else tuple(implementation)
    if not names:
      raise ValueError(f"implementation for {self.name}: got an empty sequence; "
                       f"allowed: None, one of {self.implementations}, or a sequence of them")
    unknown = [n for n in names if n not in self._impls]
    if unknown:
      raise ValueError(f"implementation for {self.name}: got {unknown[0]!r}; "
                       f"allowed: None, one of {self.implementations}, or a sequence of them")
    return names, len(names) == 1

  def __call__(self, *args: Any, implementation: str | Sequence[str] | None = None, **kwargs: Any) -> Any:
    names, explicit = self.resolve(implementation)
    failures: list[str] = []
    for name in names:
      impl = self._impls[name]
      try:
        if not impl.supports_backend(current_backend()):
          raise NotImplementedError(
              f"{name} runs on {sorted(impl.platforms or ())}, not on backend {current_backend()!r}"
              + (" (use pallas_kernels.interpret() to run it in interpret mode)" if impl.pallas else ""))
        result = impl.load()(*args, **kwargs)
      except NotImplementedError as e:
        if explicit:
          raise NotImplementedError(f"{self.name}[{name}]: {e}") from e
        failures.append(f"{name}: {e}")
        continue
      if failures:
        warnings.warn(f"{self.name}: ran {name!r} after " + "; ".join(failures), FallbackWarning, stacklevel=3)
      return result
    raise NotImplementedError(f"no implementation of {self.name} supports this call; tried "
                              + "; ".join(failures))


def current_backend() -> str:
  """``"cpu"``, ``"gpu"`` or ``"tpu"`` (CUDA and ROCm both count as ``"gpu"``)."""
  backend = jax.default_backend()
  return "gpu" if backend in ("cuda", "rocm", "gpu") else backend


def interpret_mode() -> bool:
  """Whether Pallas implementations should run with ``interpret=True``."""
  return _INTERPRET.get()


@contextlib.contextmanager
def interpret(enabled: bool = True) -> Iterator[None]:
  """Runs Pallas implementations in interpret mode (and makes them runnable by name on any backend)."""
  token = _INTERPRET.set(enabled)
  try:
    yield
  finally:
    _INTERPRET.reset(token)


@contextlib.contextmanager
def use(default: str | Sequence[str] | None = None, **per_op: str | Sequence[str]) -> Iterator[None]:
  """Overrides implementation selection inside the block, for calls that pass ``implementation=None``.

  ``use("xla")`` applies to every op; ``use(attention="reference")`` to one op; both may be combined, the
  per-op value winning. Names are validated when an op is called (an op lacking a name raises ValueError).
  """
  overrides = dict(_OVERRIDES.get())
  if default is not None:
    overrides[None] = _as_names(default, "use(default)")
  for op_name, value in per_op.items():
    overrides[op_name] = _as_names(value, f"use({op_name}=...)")
  token = _OVERRIDES.set(overrides)
  try:
    yield
  finally:
    _OVERRIDES.reset(token)


def _as_names(value: str | Sequence[str], where: str) -> tuple[str, ...]:
  names = (value,) if isinstance(value, str) else tuple(value)
  bad = [n for n in names if n not in KNOWN_IMPLEMENTATIONS]
  if not names or bad:
    raise ValueError(f"{where}: got {value!r}; allowed: names from {KNOWN_IMPLEMENTATIONS}")
  return names


def parse_env(text: str) -> dict[str | None, tuple[str, ...]]:
  """Parses ``GATED_JAX_IMPL``: ``"xla"``, ``"a,b"`` or ``"op=a,b;op2=c"`` (see module docstring)."""
  result: dict[str | None, tuple[str, ...]] = {}
  for part in filter(None, (p.strip() for p in text.split(";"))):
    op_name, sep, value = part.rpartition("=")
    key = op_name.strip() if sep else None
    result[key] = _as_names(tuple(v.strip() for v in value.split(",") if v.strip()), f"{ENV_VAR}={text!r}")
  return result


def _override_for(op_name: str, available: tuple[str, ...]) -> tuple[str, ...] | None:
  """The override for ``op_name``: context per-op, context default, env per-op, env default, or None.

  A default (all-ops) override keeps only the names this op has, so ``use("parallel")`` leaves ops without
  a ``parallel`` implementation on auto; a per-op override is taken as given (and validated by the op).
  """
  for overrides in (_OVERRIDES.get(), parse_env(os.environ.get(ENV_VAR, ""))):
    if op_name in overrides:
      return overrides[op_name]
    if None in overrides:
      names = tuple(n for n in overrides[None] if n in available)
      if names:
        return names
  return None
