"""peft_tsrs: regularized fine-tuning for HuggingFace PEFT.

Importing the package registers the ``RLRR`` and ``PACE`` PEFT types, so ``get_peft_model`` and
``PeftModel.from_pretrained`` work with them like with any built-in PEFT method, and so does transformers'
adapter API (``model.add_adapter``, ``load_adapter``, ``set_adapter``, ...). The library is this package without
``peft_tsrs.app`` (the experiment app: CLI, recipes, tasks, reports), which it never imports.
"""

from ._deprecation import renamed
from .registration import install_transformers_compat, register_all
from .tuners import TUNERS, PACEConfig, PACEModel, RLRRConfig, RLRRModel

register_all(TUNERS)
install_transformers_compat()  # model.add_adapter(...) with the pinned peft; see registration.py

from .config import RegularizerConfig  # noqa: E402
from .trainer import (  # noqa: E402
    CollapseWarning,
    NonFiniteLossError,
    RegularizedTrainer,
    RegularizedTrainerMixin,
    RegularizedTrainingArguments,
)
from .version import __version__  # noqa: E402

__all__ = [
    "CollapseWarning",
    "NonFiniteLossError",
    "PACEConfig",
    "PACEModel",
    "RLRRConfig",
    "RLRRModel",
    "RegularizedTrainer",
    "RegularizedTrainerMixin",
    "RegularizedTrainingArguments",
    "RegularizerConfig",
    "__version__",
]

__getattr__ = renamed(__name__, {
    "TSRSConfig": ("RegularizerConfig", lambda: RegularizerConfig),
    "TSRSTrainer": ("RegularizedTrainer", lambda: RegularizedTrainer),
    "TSRSTrainingArguments": ("RegularizedTrainingArguments", lambda: RegularizedTrainingArguments),
})
