"""The one place that knows how PEFT is extended.

PEFT keeps its method types in a closed ``str`` enum (:class:`peft.PeftType`) and four lookup tables
(config class, tuner class, prefix, mixed-model class). This module adds members to the enum and fills the
tables. It is idempotent: importing twice, reloading a module or unpickling a config in a fresh process
(which imports ``peft_tsrs`` through the config's class) leaves exactly one consistent registration.

The enum *value* of each new type is what ``save_pretrained`` writes into ``adapter_config.json``. It carries
an install hint, so a user who loads such a folder with plain PEFT gets ``KeyError: 'RLRR (pip install
peft-tsrs; import peft_tsrs)'`` instead of an unexplained ``KeyError: 'RLRR'``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

import peft
from packaging.version import Version
from peft.utils import PeftType

# PEFT versions whose tuner internals (BaseTuner / BaseTunerLayer) this package was written and tested against.
SUPPORTED_PEFT = (Version("0.21.0"), Version("0.22.0"))  # [min, max)

IMPORT_HINT = "pip install peft-tsrs; import peft_tsrs"


class UnsupportedPeftVersionError(ImportError):
    """Raised when the installed ``peft`` is outside the supported range."""


def check_peft_version(version: Optional[str] = None) -> None:
    """Fail with an actionable message when the installed peft is not supported."""
    found = Version(version or peft.__version__)
    low, high = SUPPORTED_PEFT
    if not (low <= found < high):
        raise UnsupportedPeftVersionError(
            f"peft_tsrs supports peft>={low},<{high} but peft {found} is installed. "
            f"Install a supported release: pip install 'peft>={low},<{high}'."
        )


def peft_type_value(name: str) -> str:
    """The enum value (and the ``peft_type`` stored in ``adapter_config.json``) for a new method name."""
    return f"{name.upper()} ({IMPORT_HINT})"


def _extend_enum(enum_cls: type[enum.Enum], name: str, value: str) -> enum.Enum:
    """Add ``name = value`` to a closed ``str`` enum, or return the member if it is already there."""
    existing = enum_cls.__members__.get(name)
    if existing is not None:
        if existing.value != value:
            raise RuntimeError(
                f"{enum_cls.__name__}.{name} already exists with value {existing.value!r}; another package "
                f"registered a PEFT method of the same name."
            )
        return existing
    if value in enum_cls._value2member_map_:
        raise RuntimeError(f"{enum_cls.__name__} already has a member with value {value!r}.")
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    if hasattr(member, "_sort_order_"):
        member._sort_order_ = len(enum_cls._member_names_)
    # type.__setattr__ bypasses EnumType.__setattr__, which forbids touching members.
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return member


@dataclass(frozen=True)
class Registration:
    """What is registered for one method."""

    name: str
    peft_type: PeftType
    prefix: str


def register(name: str, config_cls: type, model_cls: type, prefix: Optional[str] = None) -> Registration:
    """Register a PEFT method (idempotent).

    Equivalent to :func:`peft.utils.register_peft_method`, which cannot be used directly because it requires the
    enum member to exist already and refuses a second registration (which a module reload performs).
    """
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    check_peft_version()
    if not name.islower() or name.endswith("_"):
        raise ValueError(f"method name must be lower case without a trailing '_', got {name!r}")
    prefix = prefix or f"{name}_"
    if getattr(model_cls, "prefix", prefix) != prefix:
        raise ValueError(f"{model_cls.__name__}.prefix is {model_cls.prefix!r}, expected {prefix!r}")

    peft_type = _extend_enum(PeftType, name.upper(), peft_type_value(name))
    for table, cls in ((PEFT_TYPE_TO_CONFIG_MAPPING, config_cls), (PEFT_TYPE_TO_TUNER_MAPPING, model_cls)):
        current = table.get(peft_type)
        if current is not None and current.__qualname__ != cls.__qualname__:
            raise RuntimeError(f"PeftType.{peft_type.name} is already registered to {current!r}")
        table[peft_type] = cls  # a reload replaces the class object by its new version
    owner = next((t for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == prefix and t != peft_type), None)
    if owner is not None:
        raise RuntimeError(f"prefix {prefix!r} is already used by PeftType.{owner}")
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING.pop(peft_type, None)  # not mixed-compatible
    return Registration(name=name, peft_type=peft_type, prefix=prefix)


def register_all(tuners: dict[str, tuple[type, type]]) -> None:
    """Register every ``name -> (config class, tuner class)`` of ``tuners`` (``import peft_tsrs`` passes
    :data:`peft_tsrs.tuners.TUNERS`)."""
    for name, (config_cls, model_cls) in tuners.items():
        register(name, config_cls, model_cls)


def ensure_peft_type(name: str) -> PeftType:
    """Create the enum member of method ``name`` early, so its config module can refer to ``PeftType.<NAME>`` at
    class creation."""
    check_peft_version()
    return _extend_enum(PeftType, name.upper(), peft_type_value(name))
