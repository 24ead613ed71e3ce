"""xLSTM language model (Beck et al. arXiv 2405.04517 §4): mLSTM and sLSTM blocks at the paper's ratios, on the
embedded byte corpus.

    python -m experiments.train --config=experiments/configs/xlstm.py:tiny --workdir=/tmp/xlstm_tiny
    python -m experiments.train --config=experiments/configs/xlstm.py:small,7:1 --workdir=/tmp/xlstm

``get_config("SIZE[,a:b]")``: ``SIZE`` one of ``lm.SIZES`` (``tiny``, ``small``, ``medium``) and the paper's
``xLSTM[a:b]`` ratio of mLSTM to sLSTM blocks, one of ``RATIOS`` (default: ``7:1`` where the depth allows it,
else ``1:1``). In each run of ``a + b`` blocks the last ``b`` are sLSTM (``xLSTM[7:1]``: every eighth block;
``[1:1]`` alternates, starting with mLSTM; ``[1:0]`` and ``[0:1]`` are single-cell stacks). Sizes: ``tiny``
(2 blocks, d_model 64: ``[1:1]``), ``small`` (8 blocks, d_model 384), ``medium`` (24 blocks, d_model 768, the
paper's 125M shape). Both cells use 4 heads, as in the paper.

Deviation from the paper's blocks: ``gated_jax.models.DecoderLM`` gives every block the same residual layout
``x + mixer(norm(x)); x + mlp(norm(x))``. For sLSTM blocks that is the paper's post-up-projection block (the
mixer, then a GeLU-gated FFN of width ``1.3 d``, rounded up to a multiple of 32, as the xLSTM code's
``proj_factor``); mLSTM blocks get the same FFN instead of the paper's pre-up-projection (the mLSTM mixer's
value expansion 2 plays the role of its up-projection).
"""

from __future__ import annotations

import math

import ml_collections

from experiments.configs import lm

RATIOS = ("1:0", "0:1", "1:1", "7:1")
_LAYERS = {"tiny": 2, "small": 8, "medium": 24}


def mixer_layout(ratio: str, num_layers: int) -> tuple[tuple[str, ...], tuple[dict, ...]]:
  """``(mixer names, mixer kwargs)`` per block for ``xLSTM[a:b]`` (module docstring)."""
  if ratio not in RATIOS:
    raise ValueError(f"ratio: got {ratio!r}; allowed: {', '.join(RATIOS)}")
  mlstm, slstm = (int(x) for x in ratio.split(":"))
  period = mlstm + slstm
  if num_layers % period:
    raise ValueError(f"num_layers: got {num_layers}; allowed: a multiple of {period} for xLSTM[{ratio}]")
  names = tuple("slstm" if i % period >= mlstm else "mlstm" for i in range(num_layers))
  kwargs = tuple({"expand_v": 2.0} if name == "mlstm" else {} for name in names)
  return names, kwargs


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  """The xLSTM config for ``"SIZE[,a:b]"`` (module docstring)."""
  size, _, ratio = arg.partition(",")
  if size not in _LAYERS:
    raise ValueError(f"size: got {size!r}; allowed: {', '.join(_LAYERS)}")
  num_layers = _LAYERS[size]
  ratio = ratio or ("7:1" if num_layers % 8 == 0 else "1:1")
  names, kwargs = mixer_layout(ratio, num_layers)
  config = lm.get_config(size)
  d_model = config.model.d_model
  fields = dict(num_layers=num_layers, num_heads=4, mixer=names, mixer_kwargs=kwargs, mlp="geglu",
                mlp_hidden_dim=int(math.ceil(1.3 * d_model / 32) * 32))
  with config.ignore_type():
    for name, value in fields.items():
      config.model[name] = value
  return config
