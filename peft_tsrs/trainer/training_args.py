"""`TSRSTrainingArguments`: ``transformers.TrainingArguments`` plus every :class:`TSRSConfig` field, so an HF
training script gets each regularizer option as a command-line flag through ``HfArgumentParser``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from transformers import TrainingArguments

from ..config import TSRSConfig


@dataclass
class TSRSTrainingArguments(TrainingArguments, TSRSConfig):
    """``TrainingArguments`` with the regularizer fields of :class:`TSRSConfig` (``--tsrs_weight 1.0`` ...)."""

    def __post_init__(self) -> None:
        TrainingArguments.__post_init__(self)
        TSRSConfig.validate(self)

    def tsrs_config(self) -> Optional[TSRSConfig]:
        """The recipe given on the command line, or ``None`` when every field is at its default."""
        cfg = TSRSConfig.from_object(self)
        return None if cfg == TSRSConfig() else cfg
