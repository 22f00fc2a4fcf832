"""Pure-torch, Trainer-free regularizers: TSRS noise stability, PACE consistency, distance constraints,
regularized self-labeling."""

from .blocks import find_blocks, unwrap_model
from .consistency import FastConsistencyStore, consistency_mse, lazy_should_apply, shared_dropout
from .distance import DistanceConstraint, project_frobenius_, project_inf_op_
from .noise_stability import NoiseStability, relative_perturbation
from .self_labeling import LabelCorrector, reweight_temperature, reweighted_loss

__all__ = [
    "DistanceConstraint",
    "FastConsistencyStore",
    "LabelCorrector",
    "NoiseStability",
    "consistency_mse",
    "find_blocks",
    "lazy_should_apply",
    "project_frobenius_",
    "project_inf_op_",
    "relative_perturbation",
    "reweight_temperature",
    "reweighted_loss",
    "shared_dropout",
    "unwrap_model",
]
