"""peft_tsrs: regularized fine-tuning for HuggingFace PEFT.

Importing the package registers the ``RLRR`` and ``PACE`` PEFT types, so ``get_peft_model`` and
``PeftModel.from_pretrained`` work with them like with any built-in PEFT method.
"""

from .registration import ensure_peft_types, register_all

ensure_peft_types()

from .tuners.pace import PACEConfig, PACEModel  # noqa: E402
from .tuners.rlrr import RLRRConfig, RLRRModel  # noqa: E402

register_all()

from .trainer import CollapseWarning, TSRSTrainer, TSRSTrainingArguments  # noqa: E402
from .config import TSRSConfig  # noqa: E402

from .version import __version__  # noqa: E402

__all__ = [
    "CollapseWarning",
    "PACEConfig",
    "PACEModel",
    "RLRRConfig",
    "RLRRModel",
    "TSRSConfig",
    "TSRSTrainer",
    "TSRSTrainingArguments",
    "__version__",
]
