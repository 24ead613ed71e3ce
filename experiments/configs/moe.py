"""Mixture-of-experts decoder LM on the embedded byte corpus (``gated_jax.layers.moe``).

    python -m experiments.train --config=experiments/configs/moe.py:tiny --workdir=/tmp/moe_tiny
    python -m experiments.train --config=experiments/configs/moe.py:small --workdir=/tmp/moe \\
        --config.model.mlp_kwargs.router=sigmoid --config.mesh.expert=4 --config.mesh.data=-1

``get_config(size)`` is ``experiments/configs/lm.py``'s config of that size with every block's MLP replaced by
an ``MoE`` of 8 experts, top-2 routing and experts of half the dense width (equal active parameters to the
dense SwiGLU of ``lm.py``), ``train.aux_loss_weights`` set to ``gated_jax.layers.moe.DEFAULT_AUX_LOSS_WEIGHTS``
(Switch load balance 1e-2, ST-MoE z-loss 1e-3, ...). ``model.mlp_kwargs`` holds the MoE fields (``router``,
``router_kwargs``, ``dispatch``, ``num_shared_experts``, ...); ``mesh.expert`` shards the experts (it must
divide ``num_experts``; the batch is then split over ``data``, ``fsdp`` and ``expert``).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import lm
from gated_jax.layers.moe import DEFAULT_AUX_LOSS_WEIGHTS

NUM_EXPERTS = 8
TOP_K = 2


def get_config(size: str = "tiny") -> ml_collections.ConfigDict:
  """The MoE LM config of ``size`` (``tiny``, ``small`` or ``medium``; see ``experiments/configs/lm.py``)."""
  config = lm.get_config(size)
  config.model.mlp = "moe"
  config.model.mlp_hidden_dim = config.model.mlp_hidden_dim // TOP_K
  config.model.mlp_kwargs = ml_collections.ConfigDict(dict(
      num_experts=NUM_EXPERTS, k=TOP_K, router="topk_softmax", router_kwargs={}, dispatch="dropless",
      capacity_factor=1.25, num_shared_experts=0))
  config.train.aux_loss_weights = dict(DEFAULT_AUX_LOSS_WEIGHTS)
  return config
