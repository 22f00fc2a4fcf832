"""PEFT tuner types added by peft_tsrs, laid out like PEFT's own tuners."""

from .pace import PACEConfig, PACEModel
from .rlrr import RLRRConfig, RLRRModel

#: The tuners this package ships: method name -> (config class, tuner class); ``import peft_tsrs`` registers them.
TUNERS: dict[str, tuple[type, type]] = {"rlrr": (RLRRConfig, RLRRModel), "pace": (PACEConfig, PACEModel)}

__all__ = ["TUNERS", "PACEConfig", "PACEModel", "RLRRConfig", "RLRRModel"]
