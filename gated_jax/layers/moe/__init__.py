"""Mixture of experts: the ``ROUTERS`` registry (one module per router family), dispatch (dropless via
``pallas_kernels.grouped_matmul``, or capacity buffers), expert parallelism, losses and the ``MoE`` MLP
(``MLPS["moe"]``). Importing this package registers every router and the layer. Design notes: ``docs/moe.md``.
"""

from gated_jax.layers.moe import expert_choice, routers, routers_dynamic, routers_sigmoid  # noqa: F401
from gated_jax.layers.moe.calibration import calibrate_skip_thresholds
from gated_jax.layers.moe.layer import DEFAULT_AUX_LOSS_WEIGHTS, SKIP_THRESHOLDS, MoE
from gated_jax.layers.moe.routing import ROUTERS, Router, Routing

__all__ = ["DEFAULT_AUX_LOSS_WEIGHTS", "MoE", "ROUTERS", "Router", "Routing", "SKIP_THRESHOLDS",
           "calibrate_skip_thresholds"]
