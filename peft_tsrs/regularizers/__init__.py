"""Pure-torch, Trainer-free regularizers — TSRS noise stability, PACE consistency, distance constraints, regularized
self-labeling, Batch Spectral Shrinkage — each behind the one :class:`~peft_tsrs.regularizers.base.Regularizer`
protocol.

The registry order below is the order of the loss terms, of ``select`` (see ``base.py``: the regularizer that adds rows
deepest in the forward comes first) and of the log entries. A new regularizer is one file and one line here.
"""

from .adapter_noise import NoiseSite, adapter_noise, pace_noise_sites
from .base import (
    BuildContext,
    Regularizer,
    StepContext,
    build_regularizers,
    register_regularizer,
    registered_regularizers,
)
from .blocks import find_blocks, find_head, first_tensor, unwrap_model
from .bss import BSSRegularizer, batch_spectral_shrinkage
from .consistency import FastConsistencyStore, PACERegularizer, consistency_mse, lazy_should_apply
from .shared_dropout import shared_dropout
from .distance import DistanceConstraint, DistanceRegularizer, project_frobenius_, project_inf_op_
from .noise_stability import NoiseStability, TSRSRegularizer, relative_perturbation
from .self_labeling import (
    LabelCorrector,
    SelfLabeling,
    epoch_number,
    reweight_temperature,
    reweighted_loss,
    scheduled_temperature,
)

register_regularizer("tsrs", TSRSRegularizer)
register_regularizer("pace", PACERegularizer)
register_regularizer("distance", DistanceRegularizer)
register_regularizer("self_labeling", SelfLabeling)
register_regularizer("bss", BSSRegularizer)

__all__ = [
    "BSSRegularizer",
    "BuildContext",
    "DistanceConstraint",
    "DistanceRegularizer",
    "FastConsistencyStore",
    "LabelCorrector",
    "NoiseSite",
    "NoiseStability",
    "PACERegularizer",
    "Regularizer",
    "SelfLabeling",
    "StepContext",
    "TSRSRegularizer",
    "adapter_noise",
    "batch_spectral_shrinkage",
    "build_regularizers",
    "consistency_mse",
    "epoch_number",
    "find_blocks",
    "find_head",
    "first_tensor",
    "lazy_should_apply",
    "pace_noise_sites",
    "project_frobenius_",
    "project_inf_op_",
    "register_regularizer",
    "registered_regularizers",
    "relative_perturbation",
    "reweight_temperature",
    "reweighted_loss",
    "scheduled_temperature",
    "shared_dropout",
    "unwrap_model",
]
