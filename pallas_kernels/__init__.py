"""pallas_kernels: every sequence-mixing primitive behind one dispatch layer.

Public ops (layout ``(batch, seq, heads, head_dim)``; see each docstring):

* :func:`attention` — softmax-family attention with every normalizer, GQA, causal/window/segment masks.
* :func:`linear_attention` — gated linear attention (no decay, per-head or per-key-channel log decay).
* :func:`delta_rule` — DeltaNet / Gated DeltaNet.
* :func:`linear_attention_step`, :func:`delta_rule_step` — one decoding step of those two recurrences.
* :func:`grouped_matmul` — rows sorted by group times per-group matrices (mixture-of-experts experts).
* :func:`spiking_scan` — leaky integrate-and-fire neurons over time (surrogate gradients).
* :func:`biased_attention` — dense attention with a per-head score bias and weight (vision windows).
* :func:`slstm` — the sLSTM recurrence of xLSTM (exponential gating, normaliser and stabiliser states).
* :func:`long_conv` — causal convolution with a sequence-long filter per channel (Hyena, H3).

Selection knobs: ``implementation=`` per call, ``with use("xla"):``, ``GATED_JAX_IMPL=xla``, and
``with interpret():`` to run the Pallas kernels in interpret mode on any backend. Auto selection picks a
Pallas kernel only on a backend where it is validated (``dispatch.Op.validated``); a fallback emits a
:class:`FallbackWarning`. This package never imports
``gated_jax`` and imports no hardware-specific module until an implementation needs it.
"""

from pallas_kernels.attention import attention
from pallas_kernels.biased_attention import biased_attention
from pallas_kernels.dispatch import (KNOWN_IMPLEMENTATIONS, FallbackWarning, current_backend, interpret,
                                     interpret_mode, use)
from pallas_kernels.grouped_matmul import grouped_matmul
from pallas_kernels.linear_attention import delta_rule, delta_rule_step, linear_attention, linear_attention_step
from pallas_kernels.long_conv import long_conv
from pallas_kernels.slstm import SLSTMState, slstm
from pallas_kernels.spiking_scan import spiking_scan

__all__ = [
    "KNOWN_IMPLEMENTATIONS", "FallbackWarning", "SLSTMState", "attention", "biased_attention", "current_backend",
    "delta_rule", "delta_rule_step", "grouped_matmul", "interpret", "interpret_mode", "linear_attention",
    "linear_attention_step", "long_conv", "slstm", "spiking_scan", "use",
]
