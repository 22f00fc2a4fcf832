"""The ``transformers.Trainer`` side of the library: :class:`TSRSTrainer`, its arguments, the collapse check and
checkpoint loading."""

from .collapse import CollapseMonitor, CollapseWarning
from .trainer import STATE_FILE, TSRSTrainer, recipe_from_model
from .training_args import TSRSTrainingArguments

__all__ = ["STATE_FILE", "CollapseMonitor", "CollapseWarning", "TSRSTrainer", "TSRSTrainingArguments",
           "recipe_from_model"]
