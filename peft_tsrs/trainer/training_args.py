"""`RegularizedTrainingArguments`: ``transformers.TrainingArguments`` plus every :class:`RegularizerConfig` field, so an
HF training script gets each regularizer option as a command-line flag through ``HfArgumentParser``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from transformers import TrainingArguments

from ..config import RegularizerConfig


@dataclass
class RegularizedTrainingArguments(TrainingArguments, RegularizerConfig):
    """``TrainingArguments`` with the fields of :class:`RegularizerConfig` (``--tsrs_weight 1.0`` ...)."""

    def __post_init__(self) -> None:
        TrainingArguments.__post_init__(self)
        RegularizerConfig.validate(self)

    def regularizer_config(self) -> Optional[RegularizerConfig]:
        """The recipe given on the command line, or ``None`` when every field is at its default."""
        cfg = RegularizerConfig.from_object(self)
        return None if cfg == RegularizerConfig() else cfg

    tsrs_config = regularizer_config  # the name of earlier releases
