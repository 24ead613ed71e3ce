"""The fast long convolution: FFT without segments, a masked Toeplitz matrix with them."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def long_conv(u_BTC, kernel_TC, segment_ids):
  """See :mod:`pallas_kernels.long_conv`; float32 throughout, output in ``u``'s dtype."""
  seq = u_BTC.shape[1]
  u = u_BTC.astype(jnp.float32)
  kernel = kernel_TC.astype(jnp.float32)
  if segment_ids is None:
    # Zero-padded to 2T, the circular convolution of the FFT product is the linear one on the first T outputs.
    spectrum = jnp.fft.rfft(u, n=2 * seq, axis=1) * jnp.fft.rfft(kernel, n=2 * seq, axis=0)
    y = jnp.fft.irfft(spectrum, n=2 * seq, axis=1)[:, :seq]
  else:
    lag_TS = jnp.arange(seq)[:, None] - jnp.arange(seq)[None, :]
    toeplitz_TSC = jnp.where((lag_TS >= 0)[..., None], kernel[jnp.clip(lag_TS, 0)], 0.0)
    same_BTS = segment_ids[:, :, None] == segment_ids[:, None, :]
    y = jnp.einsum("bts,tsc,bsc->btc", same_BTS.astype(jnp.float32), toeplitz_TSC, u,
                   precision=jax.lax.Precision.HIGHEST)
  return y.astype(u_BTC.dtype)
