"""Linear-attention mixers with no or fixed per-head decay (plain linear attention, RetNet, Lightning), and
the import point of the whole gated linear-attention family (GLA, HGRN2, LINA, DeltaNet, Gated DeltaNet,
mLSTM, GSA), whose modules register themselves in ``MIXERS`` when imported here.

Registered names: "linear_attention", "retnet", "lightning" (this file); "gla", "hgrn2" (``linear_gla``);
"lina" (``linear_lina``); "deltanet", "gated_deltanet" (``delta_net``); "mlstm" (``mlstm``); "gsa" (``gsa``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gated_jax.layers import delta_net, gsa, linear_gla, linear_lina, mlstm  # noqa: F401  (registration)
from gated_jax.layers import positional
from gated_jax.layers.linear_base import LinearMixer, check_flag
from gated_jax.layers.registry import MIXERS

MIXERS.register("linear_attention")(LinearMixer)


def _constant_log_decay(x_BTD: jax.Array, log_gamma_H: np.ndarray) -> jax.Array:
  batch, seq = x_BTD.shape[:2]
  return jnp.broadcast_to(jnp.asarray(log_gamma_H, jnp.float32), (batch, seq, len(log_gamma_H)))


@MIXERS.register("retnet")
class RetNet(LinearMixer):
  """Multi-scale retention, RetNet arXiv 2307.08621 eq. 8-9 (recurrent form) as fla's
  ``MultiScaleRetention``: rotary position embedding on q and k (the paper's xPos rotation, §2.1, without its
  length-extrapolation scaling; fla's ``RotaryEmbedding``: rotate-half pairing, base 10000, applied after the
  feature map), ``S_t = gamma_h S_{t-1} + k_t v_t^T`` with fixed ``gamma_h = 1 - 2^(-5-h)``, then per-head
  RMSNorm(o) * swish(g_proj(x)) and o_proj; expand_k 1, expand_v 2, GQA through ``num_kv_heads``.

  Positions are ``positions`` when given (packed sequences restart at 0), else ``arange(T)`` continued from
  the decode cache's index.

  Attributes:
    rope: rotate q and k (False: the RetNet recurrence without positions, a departure from fla).
    rope_base: rotary base.
  """
  expand_v: float = 2.0
  output_gate: str = "swish"
  rope: bool = True
  rope_base: float = 10000.0

  def __post_init__(self):
    check_flag("rope", self.rope)
    if isinstance(self.rope_base, bool) or not isinstance(self.rope_base, (int, float)) or not self.rope_base > 1:
      raise ValueError(f"rope_base: got {self.rope_base!r}; allowed: a number > 1")
    super().__post_init__()

  def log_gamma(self) -> np.ndarray:
    """``(H,)`` per-head natural-log decay."""
    return np.log1p(-(2.0 ** (-5.0 - np.arange(self.num_heads))))

  def _log_decay(self, x):
    return _constant_log_decay(x, self.log_gamma())

  def _mix(self, q, k, v, log_decay, x, segment_ids, mode, positions):
    if self.rope:
      if positions is None:
        offset = self.get_variable("cache", "cache_index") if mode == "step" else 0
        positions = positional.default_positions(q.shape[0], q.shape[1], offset)
      q = positional.apply_rope(q, positions, base=self.rope_base)
      k = positional.apply_rope(k, positions, base=self.rope_base)
    return super()._mix(q, k, v, log_decay, x, segment_ids, mode, positions)


@MIXERS.register("lightning")
class Lightning(RetNet):
  """Lightning attention (TransNormerLLM arXiv 2307.14995 §3.1, fla ``chunk_lightning_attn``): swish q/k
  and a fixed per-head decay ``log gamma_h = -(8/H) (1 - layer_idx/num_layers) h`` (head 0 never decays),
  so deeper layers decay less; output per-head RMSNorm(o) * swish(g_proj(x)), then o_proj. No rotary
  embedding (TransNormerLLM's relative position information is the decay itself).

  Attributes:
    layer_idx: this layer's index in ``[0, num_layers)``.
    num_layers: layers in the model.
  """
  expand_v: float = 1.0
  feature_map: str = "swish"
  rope: bool = False
  layer_idx: int = 0
  num_layers: int = 1

  def __post_init__(self):
    if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers <= 0:
      raise ValueError(f"num_layers: got {self.num_layers!r}; allowed: a positive int")
    if (isinstance(self.layer_idx, bool) or not isinstance(self.layer_idx, int)
        or not 0 <= self.layer_idx < self.num_layers):
      raise ValueError(f"layer_idx: got {self.layer_idx!r}; allowed: an int in [0, num_layers={self.num_layers})")
    super().__post_init__()

  def log_gamma(self) -> np.ndarray:
    depth = 1.0 - self.layer_idx / self.num_layers
    return -(8.0 / self.num_heads) * depth * np.arange(self.num_heads, dtype=np.float64)
