"""The ``transformers.Trainer`` side of the library: :class:`RegularizedTrainer` (and its mixin for other Trainer
subclasses), its arguments, the collapse check and checkpoint loading."""

from .._deprecation import renamed
from .collapse import CollapseMonitor, CollapseWarning
from .trainer import STATE_FILE, RegularizedTrainer, RegularizedTrainerMixin, recipe_from_model
from .training_args import RegularizedTrainingArguments

__all__ = ["STATE_FILE", "CollapseMonitor", "CollapseWarning", "RegularizedTrainer", "RegularizedTrainerMixin",
           "RegularizedTrainingArguments", "recipe_from_model"]

__getattr__ = renamed(__name__, {
    "TSRSTrainer": ("RegularizedTrainer", lambda: RegularizedTrainer),
    "TSRSTrainingArguments": ("RegularizedTrainingArguments", lambda: RegularizedTrainingArguments),
})
