"""Causal long convolution over the sequence axis, one filter per channel: the operator of the implicit- and
explicit-filter models (Hyena, Poli et al. arXiv 2302.10866 §3.2-3.3; H3's SSM kernels materialised as
convolutions, Fu et al. arXiv 2212.14052 §3.1-3.3).

    y[b, t, c] = sum_{s <= t, seg(b, s) = seg(b, t)} kernel[t - s, c] * u[b, s, c]

``kernel`` has one tap per position (``(T, C)``: tap ``j`` weights the input ``j`` steps back), so the filter
is as long as the sequence. ``segment_ids`` keep packed sequences apart (contiguous runs of one id).

Implementations: ``reference`` (the sum above as a loop over lags, float32 at the highest precision: the test
oracle, ``O(T²C)`` work and ``O(TC)`` memory) and ``xla`` (without segments the FFT convolution of Hyena's
``fftconv``: both signals zero-padded to ``2T`` so the circular product is the linear one, ``O(TC log T)``;
with segments a masked ``(T, T)`` Toeplitz matrix per channel, ``O(T²C)``, since a per-token restart breaks
the shift invariance the FFT relies on). Both compute in float32 and return the dtype of ``u``.
"""

from __future__ import annotations

from collections.abc import Sequence

from pallas_kernels import _checks
from pallas_kernels.dispatch import Op

long_conv_op = Op.public("long_conv")
long_conv_op.register("reference", "pallas_kernels.long_conv.direct:reference")
long_conv_op.register("xla", "pallas_kernels.long_conv.xla:long_conv", auto_priority=100)


def long_conv(u, kernel, *, segment_ids=None, implementation: str | Sequence[str] | None = None):
  """The causal long convolution (module docstring).

  Args:
    u: ``(B, T, C)`` input.
    kernel: ``(T, C)`` filter taps, one per lag ``0 .. T-1`` (the layer cuts its filter to the length).
    segment_ids: ``(B, T)`` int ids of packed sequences.
    implementation: see :mod:`pallas_kernels.dispatch`.
  Returns:
    ``y`` ``(B, T, C)`` in the dtype of ``u``.
  """
  _checks.check_array("u", u, rank=3, layout="(batch, seq, channels)")
  _checks.check_array("kernel", kernel, rank=2, layout="(seq, channels)")
  _checks.check_shape("kernel", kernel, u.shape[1:], "(seq, channels): one tap per position of u")
  if segment_ids is not None:
    _checks.check_array("segment_ids", segment_ids, rank=2, layout="(batch, seq)", floating=False)
    _checks.check_shape("segment_ids", segment_ids, u.shape[:2], "(batch, seq)")
  return long_conv_op(u, kernel, segment_ids, implementation=implementation)
