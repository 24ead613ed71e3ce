"""Early exit for the classifier models: a multi-exit ``VisionClassifier`` (an inference module after every
block), the max-softmax confidence cascade, and JEI-DNN's jointly learned exit gates (arXiv 2310.09163).
See docs/conditional_computation.md, "Early exit"."""

from gated_jax.models.early_exit.model import (ExitGates, ExitOutputs, InferenceModule, MultiExitClassifier,
                                               exit_costs, uncertainty_features)
from gated_jax.models.early_exit.policies import (ExitDecision, at_cost, confidence_cascade, exit_distribution,
                                                  expected_calibration_error, first_exit, gate_policy, score,
                                                  threshold_sweep)
from gated_jax.models.early_exit.training import (balanced_bce, fit_jei, gate_loss, gate_targets, group_optimizer,
                                                  ims_step, oracle_exits, per_exit_ce, summed_exit_loss,
                                                  warmup_step, weighted_exit_loss)

__all__ = ["ExitDecision", "ExitGates", "ExitOutputs", "InferenceModule", "MultiExitClassifier", "at_cost",
           "balanced_bce", "confidence_cascade", "exit_costs", "exit_distribution", "expected_calibration_error",
           "first_exit", "fit_jei", "gate_loss", "gate_policy", "gate_targets", "group_optimizer", "ims_step",
           "oracle_exits", "per_exit_ce", "score", "summed_exit_loss", "threshold_sweep", "uncertainty_features",
           "warmup_step", "weighted_exit_loss"]
