"""Decoder-only language model assembled from the ``MIXERS`` / ``MLPS`` registries.

Pre-norm residual blocks (GPT-2/Llama layout, as in the Gated Attention paper's Qwen3 baseline, arXiv
2505.06708 §3 and Table 7): ``x += mixer(RMSNorm(x)); x += mlp(RMSNorm(x))``, a final RMSNorm, then logits
through the tied embedding table or an untied ``(embed, vocab)`` projection, always in float32. The mixer of
layer ``i`` is ``mixer[i % len(mixer)]`` with ``mixer_kwargs[i % len(mixer)]``, so a hybrid stack such as
``("gla", "gla", "gla", "sliding_attention")`` is a tuple of names.

When the ``"intermediates"`` collection is mutable each block sows ``max_abs_activation`` and ``kurtosis`` of
the residual stream after it (``gated_jax.models.diagnostics``), next to whatever its mixer sows.

Conditional computation (``gated_jax.layers.residual_gates``; all off by default, and then the model is the
plain one above): ``gateskip`` puts GateSkip's residual gate on every branch of every block (arXiv
2510.13876), ``skip_middle`` adds the symmetric middle-span router (arXiv 2506.21103) and
``branch_post_norm`` a post-norm on each branch output before the residual add (the sandwich / peri-LN layout
the skip-middle paper uses).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from gated_jax.layers import MIXERS, MLPS, Registry
from gated_jax.layers.norms import RMSNorm
from gated_jax.layers.residual_gates import DECODE_RULES, GateSkipSpec, ResidualGate, SkipMiddleRouter, SkipMiddleSpec
from gated_jax.models import diagnostics

# DecoderLM fields handed to a mixer that declares a field of the same name (unless set in its kwargs).
_SHARED_MIXER_FIELDS = ("num_kv_heads", "head_dim", "dtype", "max_len", "num_layers")
_RESERVED_MIXER_KWARGS = ("d_model", "num_heads")
_INIT_STDDEV = 0.02  # N(0, 0.02) as in the Qwen3 code the paper builds on (initializer_range).


def _declared_fields(cls: type) -> frozenset[str]:
  return frozenset(f.name for f in dataclasses.fields(cls))


def layer_names(mixer: str | Sequence[str], registry: Registry = MIXERS) -> tuple[str, ...]:
  """``mixer`` (a ``registry`` name or a non-empty sequence of names) as a tuple of known names."""
  names = (mixer,) if isinstance(mixer, str) else tuple(mixer)
  if not names or not all(isinstance(n, str) for n in names):
    raise ValueError(f"mixer: got {mixer!r}; allowed: a mixer name or a non-empty tuple of names from "
                     f"{', '.join(registry.names())}")
  for name in names:
    registry.get(name)
  return names


def layer_kwargs(mixer_kwargs: Any, count: int) -> tuple[dict[str, Any], ...]:
  """``mixer_kwargs`` (None, one mapping, or ``count`` mappings parallel to the names) as ``count`` dicts."""
  if mixer_kwargs is None:
    return ({},) * count
  if isinstance(mixer_kwargs, Mapping):
    return (dict(mixer_kwargs),) * count
  kwargs = tuple(mixer_kwargs)
  if len(kwargs) != count or not all(isinstance(k, Mapping) for k in kwargs):
    raise ValueError(f"mixer_kwargs: got {mixer_kwargs!r}; allowed: one dict, or a tuple of {count} dicts "
                     "parallel to mixer")
  return tuple(dict(k) for k in kwargs)


def _check_positive_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{name}: got {value!r}; allowed: a positive int")


def _frozen(value: Any) -> Any:
  if isinstance(value, Mapping):
    return FrozenDict({k: _frozen(v) for k, v in value.items()})
  if isinstance(value, list | tuple):
    return tuple(_frozen(v) for v in value)
  return value


def _step_kwarg(cls: type, train_step: jax.Array | None) -> dict[str, Any]:
  """``{"train_step": ...}`` for layers that ask for it (``gated_jax.layers.collections``), else nothing."""
  return {"train_step": train_step} if getattr(cls, "uses_train_step", False) else {}


class Block(nn.Module):
  """One pre-norm residual block: ``x + mixer(norm(x))`` then ``x + mlp(norm(x))`` (``mlp="none"``: no MLP).

  Attributes:
    mixer: registered mixer name.
    mixer_kwargs: complete constructor kwargs of the mixer (``d_model``, ``num_heads``, ...).
    mlp: registered MLP name or ``"none"``.
    mlp_kwargs: complete constructor kwargs of the MLP.
    dtype: compute dtype.
    gateskip: GateSkip settings of the model (None: no residual gates).
    layer_idx: this block's index (its gated modules come after those of the blocks before it).
    post_norm: RMSNorm on each branch output before the residual add.
  """
  mixer: str
  mixer_kwargs: Mapping[str, Any]
  mlp: str
  mlp_kwargs: Mapping[str, Any]
  dtype: Any = jnp.float32
  gateskip: GateSkipSpec | None = None
  layer_idx: int = 0
  post_norm: bool = False

  @nn.compact
  def __call__(self, x_BTD: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, decode: bool = False,
               train_step: jax.Array | None = None, token_gate_BT: jax.Array | None = None) -> jax.Array:
    """``token_gate_BT`` (skip-the-middle): a per-token factor on both branch outputs, also handed to the mixer
    as ``key_weights``."""
    gate_args = {}
    if self.gateskip is not None:
      gate_args = dict(positions_BT=self._gate_positions(x_BTD, positions, decode), segment_ids=segment_ids,
                       train_step=train_step)
    mixer_cls = MIXERS.get(self.mixer)
    key_weights = {} if token_gate_BT is None else {"key_weights": token_gate_BT}
    mixer = lambda h: mixer_cls(name="mixer", **self.mixer_kwargs)(
        h, segment_ids=segment_ids, positions=positions, decode=decode, **_step_kwarg(mixer_cls, train_step),
        **key_weights)
    x_BTD = self._branch(x_BTD, "mixer", mixer, 0, token_gate_BT, gate_args)
    if self.mlp != "none":
      mlp_cls = MLPS.get(self.mlp)
      mlp = lambda h: mlp_cls(name="mlp", **self.mlp_kwargs)(h, **_step_kwarg(mlp_cls, train_step))
      x_BTD = self._branch(x_BTD, "mlp", mlp, 1, token_gate_BT, gate_args)
    x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "embed"))
    if self.is_mutable_collection("intermediates"):
      self.sow("intermediates", "max_abs_activation", diagnostics.max_abs(x_BTD))
      self.sow("intermediates", "kurtosis", diagnostics.kurtosis(x_BTD))
    return x_BTD

  def _branch(self, x_BTD: jax.Array, name: str, fn: Any, branch: int, token_gate_BT: jax.Array | None,
              gate_args: dict[str, Any]) -> jax.Array:
    """``x + [token gate ⊙] [GateSkip gate ⊙] [post-norm] fn(norm(x))``."""
    h_BTD = RMSNorm(dtype=self.dtype, name=f"{name}_norm")(x_BTD)
    y_BTD = fn(h_BTD)
    if self.post_norm:
      y_BTD = RMSNorm(dtype=self.dtype, name=f"{name}_post_norm")(y_BTD)
    if self.gateskip is not None:
      index = self.layer_idx * (1 if self.mlp == "none" else 2) + branch
      y_BTD = ResidualGate(self.gateskip, index, self.dtype, name=f"{name}_skip_gate")(h_BTD, y_BTD, **gate_args)
    if token_gate_BT is not None:
      y_BTD = y_BTD * token_gate_BT[..., None].astype(y_BTD.dtype)
    return x_BTD + y_BTD.astype(x_BTD.dtype)

  def _gate_positions(self, x_BTD: jax.Array, positions: jax.Array | None, decode: bool) -> jax.Array:
    """Absolute token positions for GateSkip's first-token rule: ``positions``, else a decode counter (cache
    variable ``gateskip_index``), else ``arange``."""
    if decode and self.gateskip.rule not in DECODE_RULES:
      raise ValueError(f"gateskip.rule: got {self.gateskip.rule!r} with decode=True; allowed: "
                       f"{', '.join(DECODE_RULES)} (the other rules look at the whole sequence or batch)")
    if positions is not None:
      return positions
    batch, seq = x_BTD.shape[:2]
    start = jnp.zeros((), jnp.int32)
    if decode:
      initialized = self.has_variable("cache", "gateskip_index")
      index = self.variable("cache", "gateskip_index", lambda: jnp.zeros((), jnp.int32))
      if initialized:
        start, index.value = index.value, index.value + seq
    return jnp.broadcast_to(start + jnp.arange(seq, dtype=jnp.int32), (batch, seq))


class DecoderLM(nn.Module):
  """Decoder-only LM: embedding, ``num_layers`` pre-norm blocks, final RMSNorm, float32 logits.

  Attributes:
    vocab_size: number of token ids.
    d_model: residual width.
    num_layers: number of blocks.
    num_heads: query heads of each mixer.
    num_kv_heads: key/value heads (GQA), passed to mixers that declare it; None: the mixer's default.
    head_dim: per-head width, passed to mixers that declare it; None: the mixer's default.
    mixer: a ``MIXERS`` name, or a tuple of names cycled over layers.
    mixer_kwargs: one dict for every layer, or a tuple of dicts parallel to ``mixer``.
    mlp: an ``MLPS`` name, or ``"none"`` for attention-only blocks.
    mlp_hidden_dim: MLP hidden width; None: ``4 * d_model``.
    mlp_kwargs: extra MLP constructor kwargs (e.g. experts of an MoE).
    tie_embeddings: logits through the embedding table (True) or an untied projection (False).
    dtype: compute dtype (parameters stay float32; logits are float32).
    max_len: longest sequence (decode cache length), passed to mixers that declare it.
    remat: rematerialise each block in the backward pass (``nn.remat``).
    gateskip: None, or a mapping of ``gated_jax.layers.residual_gates.GateSkipSpec`` fields: GateSkip gates
      on every branch (e.g. ``{"train_budget": 0.2, "budget_steps": 1000}``; the sparsity regulariser needs
      ``train.aux_loss_weights["gateskip_sparsity"]``).
    skip_middle: None, or a mapping of ``SkipMiddleSpec`` fields: skip-the-middle routers (even
      ``num_layers``; mixers that accept ``key_weights``; weight ``"skip_middle_sparsity"``).
    branch_post_norm: RMSNorm on each branch output before the residual add.
  """
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  mixer: str | tuple[str, ...] = "gated_attention"
  mixer_kwargs: Any = None
  mlp: str = "swiglu"
  mlp_hidden_dim: int | None = None
  mlp_kwargs: Any = None
  tie_embeddings: bool = True
  dtype: Any = jnp.float32
  max_len: int = 2048
  remat: bool = False
  gateskip: Any = None
  skip_middle: Any = None
  branch_post_norm: bool = False

  def __post_init__(self):
    # Hashable fields (a static argument of jax.jit, e.g. in ``generate``): dicts -> FrozenDict, lists -> tuples.
    for name in ("mixer", "mixer_kwargs", "mlp_kwargs", "gateskip", "skip_middle"):
      object.__setattr__(self, name, _frozen(getattr(self, name)))
    super().__post_init__()

  def layer_specs(self) -> tuple[tuple[str, dict[str, Any]], ...]:
    """Validated ``(mixer name, complete mixer kwargs)`` of every layer (ValueError on bad fields)."""
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "max_len"):
      _check_positive_int(name, getattr(self, name))
    names = layer_names(self.mixer)
    kwargs = layer_kwargs(self.mixer_kwargs, len(names))
    if self.mlp != "none":
      MLPS.get(self.mlp)
    shared = {k: getattr(self, k) for k in _SHARED_MIXER_FIELDS} | {"dtype": jnp.dtype(self.dtype)}
    specs = []
    for i in range(self.num_layers):
      name, own = names[i % len(names)], kwargs[i % len(names)]
      reserved = sorted(set(own).intersection(_RESERVED_MIXER_KWARGS))
      if reserved:
        raise ValueError(f"mixer_kwargs: got {reserved} for layer {i}; set them with DecoderLM's own fields")
      declared = _declared_fields(MIXERS.get(name))
      full = {k: v for k, v in shared.items() if k in declared and v is not None}
      if "layer_idx" in declared:
        full["layer_idx"] = i
      full.update(own, d_model=self.d_model, num_heads=self.num_heads)
      specs.append((name, full))
    return tuple(specs)

  def gateskip_spec(self) -> GateSkipSpec | None:
    """The validated GateSkip settings (None when off)."""
    if self.gateskip is None:
      return None
    return GateSkipSpec.from_mapping(self.gateskip, self.num_layers * (1 if self.mlp == "none" else 2))

  def skip_middle_spec(self) -> SkipMiddleSpec | None:
    """The validated skip-the-middle settings (None when off); every mixer must accept ``key_weights``."""
    if self.skip_middle is None:
      return None
    spec = SkipMiddleSpec.from_mapping(self.skip_middle, self.num_layers)
    for name in layer_names(self.mixer):
      if not getattr(MIXERS.get(name), "accepts_key_weights", False):
        raise ValueError(f"mixer: got {name!r} with skip_middle; allowed: mixers that accept key_weights (hiding "
                         "skipped tokens from later attention), e.g. 'gated_attention'")
    return spec

  def _mlp_kwargs(self) -> dict[str, Any]:
    if self.mlp == "none":
      return {}
    hidden = 4 * self.d_model if self.mlp_hidden_dim is None else self.mlp_hidden_dim
    _check_positive_int("mlp_hidden_dim", hidden)
    kwargs = {"dtype": jnp.dtype(self.dtype)} if "dtype" in _declared_fields(MLPS.get(self.mlp)) else {}
    return {**kwargs, **dict(self.mlp_kwargs or {}), "d_model": self.d_model, "hidden_dim": hidden}

  @nn.compact
  def __call__(self, tokens_BT: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, decode: bool = False,
               train_step: jax.Array | None = None) -> jax.Array:
    """Logits ``(B, T, vocab_size)`` in float32 for integer ``tokens_BT``; ``train_step`` (int32 scalar, during
    training) reaches the layers that declare ``uses_train_step`` (``gated_jax.layers.collections``)."""
    if tokens_BT.ndim != 2 or not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
      raise ValueError(f"tokens_BT: got shape {tokens_BT.shape} dtype {tokens_BT.dtype}; allowed: an integer "
                       "array of shape (batch, length)")
    specs, mlp_kwargs, dtype = self.layer_specs(), self._mlp_kwargs(), jnp.dtype(self.dtype)
    init = nn.initializers.normal(stddev=_INIT_STDDEV)
    embed = nn.Embed(self.vocab_size, self.d_model, dtype=dtype, name="embed",
                     embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")))
    x_BTD = nn.with_logical_constraint(embed(tokens_BT), ("batch", "length", "embed"))
    gateskip, middle = self.gateskip_spec(), self.skip_middle_spec()
    if not isinstance(self.branch_post_norm, bool):
      raise ValueError(f"branch_post_norm: got {self.branch_post_norm!r}; allowed: True or False")
    block_cls = nn.remat(Block, static_argnums=(4,)) if self.remat else Block  # 4: decode (self is 0)
    gates_BT: list[jax.Array] = []
    cumulative_BT = None
    for i, (name, kwargs) in enumerate(specs):
      token_gate_BT = None
      if middle is not None:
        if i < self.num_layers // 2:
          gate_BT, cumulative_BT = SkipMiddleRouter(middle, i, name=f"skip_router_{i}")(x_BTD, cumulative_BT)
          gates_BT.append(gate_BT)
        token_gate_BT = gates_BT[middle.layer_gate(i)]
      block = block_cls(name, kwargs, self.mlp, mlp_kwargs, dtype, gateskip, i, self.branch_post_norm,
                        name=f"layer_{i}")
      x_BTD = block(x_BTD, segment_ids, positions, decode, train_step, token_gate_BT)
    x_BTD = RMSNorm(dtype=dtype, name="final_norm")(x_BTD).astype(jnp.float32)
    if self.tie_embeddings:
      logits_BTV = jnp.einsum("btd,vd->btv", x_BTD, embed.embedding.astype(jnp.float32))
    else:
      logits_BTV = nn.Dense(self.vocab_size, use_bias=False, dtype=jnp.float32, name="unembed",
                            kernel_init=nn.with_logical_partitioning(init, ("embed", "vocab")))(x_BTD)
    return nn.with_logical_constraint(logits_BTV, ("batch", "length", "vocab"))


def _plain(value: Any) -> Any:
  """ConfigDict / list / nested containers -> dicts and tuples."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


def lm_from_config(model_config: Any) -> DecoderLM:
  """Builds a ``DecoderLM`` from ``config.model`` (a ConfigDict or mapping of its fields)."""
  fields = _plain(model_config)
  allowed = sorted(_declared_fields(DecoderLM) - {"parent", "name"})
  unknown = sorted(set(fields) - set(allowed))
  if unknown:
    raise ValueError(f"config.model: got unknown fields {unknown}; allowed: {', '.join(allowed)}")
  return DecoderLM(**fields)
