"""Non-causal token mixers for image patches; importing this package fills ``VISION_MIXERS``.

Registered names: ``vit`` and ``convit`` (``attention``), ``vig`` (``vig``), ``swin_rmt``,
``gated_swin_rmt_retention`` and ``gated_swin_rmt_swat`` (``swin_rmt``). The call contract is in ``common``.
"""

from gated_jax.layers.vision import attention, swin_rmt, vig  # noqa: F401  (registration)
from gated_jax.layers.vision.common import VISION_MIXERS

__all__ = ["VISION_MIXERS"]
