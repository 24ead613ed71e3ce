"""H3 (Fu et al., "Hungry Hungry Hippos", arXiv 2212.14052 §3.1, Figure 1 and Algorithm 1), as Zoology runs
it (``mixers/h3/h3.py``), with both SSMs materialised as long convolutions (:func:`pallas_kernels.long_conv`).

Per token, with ``u`` the input and ``H = d_model / head_dim`` heads of ``head_dim = p`` channels:

    q, k, v = W_q u + b_q, W_k u + b_k, W_v u + b_v
    k <- SSM_shift(k) + d_k ⊙ k              a learned causal FIR filter of ``state_size`` taps per channel
    kv[i, j] = k[i] v[j]                      per head, the p x p outer product
    y[i, j] = SSM_diag(kv[i, j]) + d_h kv[i, j]   one diagonal-SSM kernel per head, shared by its p² channels
    o[j] = sum_i q[i] y[i, j];   out = W_o o + b_o

The shift SSM (``A`` the shift matrix, ``B = e_1``) has the kernel ``K_t = C_t`` for ``t < N`` and 0 after
(§3.1), initialised like a PyTorch ``Conv1d`` of ``N`` taps, as in Zoology's ``SSKernelShift``. The diagonal
SSM is S4D (Gu et al. arXiv 2206.11893: the zero-order-hold diagonal kernel) with ``N / 2`` complex
conjugate mode pairs, S4D-Lin init ``A_n = -1/2 + iπn``, ``B = 1``, ``C ~ CN(0, 1)``, ``Δ`` log-uniform in
``[dt_min, dt_max]``:
``K_t = 2 Re Σ_n C_n (e^{ΔA_n} - 1) / A_n · e^{ΔA_n t}``. Zoology's MQAR setting is ``state_size =``
sequence length and ``head_dim = 2`` (its comment: "makes it mathematically equivalent to Hyena").

Simplifications: both kernels are computed in full and applied by convolution (no recurrent SSM state); the
real and imaginary parts of ``A`` and ``Δ`` are trained like every parameter (S4D's per-parameter learning
rates are not reproduced). Decode caches every input to the two convolutions, ``(B, max_len, D + H p²)``
float32, and re-convolves them per call (``conv.cached_long_conv``), not the SSMs' ``O(N)`` recurrent step.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels import _checks
from gated_jax.layers.conv import cached_long_conv, pytorch_uniform
from gated_jax.layers.gated_conv import dense
from gated_jax.layers.hyena import LongConvMixer
from gated_jax.layers.linear_base import check_positive_float
from gated_jax.layers.registry import MIXERS


def s4d_kernel(log_dt_H: jax.Array, log_neg_a_real_HN: jax.Array, a_imag_HN: jax.Array, c_HN2: jax.Array,
               length: int) -> jax.Array:
  """``(length, H)`` zero-order-hold S4D kernel ``2 Re Σ_n C_n (e^{ΔA_n} - 1) / A_n e^{ΔA_n t}`` with
  ``A_n = -exp(log_neg_a_real) + i a_imag`` and ``C = c[..., 0] + i c[..., 1]`` (``B = 1``)."""
  a = -jnp.exp(log_neg_a_real_HN) + 1j * a_imag_HN
  dt_a = jnp.exp(log_dt_H)[:, None] * a
  c = (c_HN2[..., 0] + 1j * c_HN2[..., 1]) * (jnp.exp(dt_a) - 1) / a
  t = jnp.arange(length, dtype=jnp.float32)
  return 2 * jnp.einsum("hn,hnt->th", c, jnp.exp(dt_a[..., None] * t)).real


def _log_uniform(low: float, high: float):
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, math.log(low), math.log(high))


@MIXERS.register("h3")
class H3(LongConvMixer):
  """H3 (module docstring). ``num_heads`` is unused: the heads are ``d_model / head_dim``.

  Attributes:
    state_size: ``N``, the shift filter's taps and twice the diagonal SSM's mode pairs (Zoology ``d_state``);
      None: ``max_len`` rounded up to even (Zoology's MQAR setting, ``d_state = L``).
    head_dim: ``p``, channels per head of the ``k v^T`` outer product.
    dt_min, dt_max: range of the diagonal SSM's step ``Δ``.
  """
  state_size: int | None = 64
  head_dim: int = 1
  dt_min: float = 1e-3
  dt_max: float = 1e-1

  def __post_init__(self):
    _checks.check_positive_int("head_dim", self.head_dim, allow_none=False)
    _checks.check_positive_int("state_size", self.state_size)
    if self.state_size is not None and self.state_size % 2:
      raise ValueError(f"state_size: got {self.state_size}; allowed: an even number (complex conjugate pairs)")
    if self.d_model % self.head_dim:
      raise ValueError(f"head_dim: got {self.head_dim}; allowed: a divisor of d_model={self.d_model}")
    for name in ("dt_min", "dt_max"):
      check_positive_float(name, getattr(self, name))
    if self.dt_min > self.dt_max:
      raise ValueError(f"dt_min: got {self.dt_min} > dt_max={self.dt_max}; allowed: dt_min <= dt_max")
    super().__post_init__()

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, decode: bool = False) -> jax.Array:
    """``x_BTD`` -> ``y_BTD``; ``positions`` is unused (the kernels are indexed by lag)."""
    del positions
    u, mode = self._start(x_BTD, segment_ids, decode)
    batch, seq, _ = u.shape
    taps = self.max_len + self.max_len % 2 if self.state_size is None else self.state_size
    heads, p, modes = self.d_model // self.head_dim, self.head_dim, taps // 2
    q, k, v = (dense(self.d_model, self.init_std, self.dtype, name)(u) for name in ("q_proj", "k_proj", "v_proj"))

    shift_taps = self.param("shift_kernel", pytorch_uniform(taps), (taps, self.d_model), jnp.float32)
    shift_kernel = lambda n: jnp.pad(shift_taps, ((0, max(0, n - taps)), (0, 0)))[:n]
    k_skip = self.param("shift_skip", nn.initializers.normal(1.0), (self.d_model,), jnp.float32)
    k = cached_long_conv(self, k, shift_kernel, segment_ids, mode, self.max_len, "shift_inputs") \
        + k_skip.astype(self.dtype) * k

    log_dt = self.param("log_dt", _log_uniform(self.dt_min, self.dt_max), (heads,), jnp.float32)
    log_neg_a_real = self.param("log_neg_a_real", nn.initializers.constant(math.log(0.5)), (heads, modes),
                                jnp.float32)
    a_imag = self.param("a_imag", lambda key, shape: jnp.broadcast_to(math.pi * jnp.arange(modes, dtype=jnp.float32),
                                                                       shape), (heads, modes))
    c = self.param("c", nn.initializers.normal(0.5 ** 0.5), (heads, modes, 2), jnp.float32)
    diag_kernel = lambda n: jnp.repeat(s4d_kernel(log_dt, log_neg_a_real, a_imag, c, n), p * p, axis=1)
    kv = (k.reshape(batch, seq, heads, p, 1) * v.reshape(batch, seq, heads, 1, p)).reshape(batch, seq, -1)
    y_skip = self.param("diag_skip", nn.initializers.normal(1.0), (heads,), jnp.float32)
    y = cached_long_conv(self, kv, diag_kernel, segment_ids, mode, self.max_len, "diag_inputs") \
        + jnp.repeat(y_skip, p * p).astype(self.dtype) * kv
    o = jnp.einsum("bthi,bthij->bthj", q.reshape(batch, seq, heads, p), y.reshape(batch, seq, heads, p, p))
    out = dense(self.d_model, self.init_std, self.dtype, "out_proj", ("mlp", "embed"))(o.reshape(batch, seq, -1))
    return self._finish(out, x_BTD, mode)
