"""Training: ``train(config, workdir)`` and its parts (docs/architecture.md, "Training").

``loop.py`` the loop; ``step.py`` the jitted steps; ``sharding.py`` the mesh and logical-axis rules;
``checkpoint.py`` orbax checkpoints; ``optim.py`` the optax optimiser; ``flops.py`` MFU; ``writers.py``
JSONL/TensorBoard; ``distributed.py`` multi-host start-up; ``metrics.py`` attention-sink/activation
diagnostics; ``orthograd.py`` ⊥Grad as an optax transformation and ``losses.py`` StableMax cross-entropy and
the Softmax Collapse measure (the grokking study, arXiv 2501.04697).
"""

from gated_jax.train.checkpoint import CheckpointError, Checkpointer
from gated_jax.train.loop import TrainResult, evaluate, train
from gated_jax.train.sharding import AXES, RULES, make_mesh

__all__ = ["AXES", "CheckpointError", "Checkpointer", "RULES", "TrainResult", "evaluate", "make_mesh", "train"]
