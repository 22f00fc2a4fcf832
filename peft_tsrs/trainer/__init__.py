"""The ``transformers.Trainer`` side of the library: :class:`RegularizedTrainer` (and its mixin for other Trainer
subclasses), its arguments, the collapse check, the non-finite guard and checkpoint loading."""

from .._deprecation import renamed
from .collapse import CollapseMonitor, CollapseWarning
from .nonfinite import NonFiniteLossError
from .trainer import STATE_FILE, RegularizedTrainer, RegularizedTrainerMixin, recipe_from_model
from .training_args import RegularizedTrainingArguments

__all__ = ["STATE_FILE", "CollapseMonitor", "CollapseWarning", "NonFiniteLossError", "RegularizedTrainer",
           "RegularizedTrainerMixin", "RegularizedTrainingArguments", "recipe_from_model"]

__getattr__ = renamed(__name__, {
    "TSRSTrainer": ("RegularizedTrainer", lambda: RegularizedTrainer),
    "TSRSTrainingArguments": ("RegularizedTrainingArguments", lambda: RegularizedTrainingArguments),
})
