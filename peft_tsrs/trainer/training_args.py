"""`RegularizedTrainingArguments`: ``transformers.TrainingArguments`` plus every :class:`RegularizerConfig` field, so an
HF training script gets each regularizer option as a command-line flag through ``HfArgumentParser``, and the
trainer's policy for non-finite losses (``on_nonfinite``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments

from ..config import RegularizerConfig
from .nonfinite import ON_NONFINITE


@dataclass
class RegularizedTrainingArguments(TrainingArguments, RegularizerConfig):
    """``TrainingArguments`` with the fields of :class:`RegularizerConfig` (``--tsrs_weight 1.0`` ...).

    on_nonfinite (`str`, *optional*, defaults to `"stop"`):
        What the trainer does when a loss term or the gradients become NaN/inf: ``"stop"`` raises
        :class:`~peft_tsrs.trainer.NonFiniteLossError` naming the term and the step before the weights change;
        ``"skip"`` leaves that batch (or optimizer step) out of the update and counts it in the logs.
    """

    on_nonfinite: str = field(
        default="stop", metadata={"help": "On a NaN/inf loss or gradient: 'stop' with an error, or 'skip' the step.",
                                  "choices": list(ON_NONFINITE)}
    )

    def __post_init__(self) -> None:
        TrainingArguments.__post_init__(self)
        RegularizerConfig.validate(self)
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"RegularizedTrainingArguments.on_nonfinite must be one of {ON_NONFINITE}, "
                             f"got {self.on_nonfinite!r}.")

    def regularizer_config(self) -> Optional[RegularizerConfig]:
        """The recipe given on the command line, or ``None`` when every field is at its default."""
        cfg = RegularizerConfig.from_object(self)
        return None if cfg == RegularizerConfig() else cfg

    tsrs_config = regularizer_config  # the name of earlier releases
