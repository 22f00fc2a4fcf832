"""The one place that knows how PEFT is extended.

PEFT keeps its method types in a closed ``str`` enum (:class:`peft.PeftType`) and four lookup tables
(config class, tuner class, prefix, mixed-model class). This module adds members to the enum and fills the
tables. It is idempotent: importing twice, reloading a module or unpickling a config in a fresh process
(which imports ``peft_tsrs`` through the config's class) leaves exactly one consistent registration.

The enum *value* of each new type is what ``save_pretrained`` writes into ``adapter_config.json``. It carries
an install hint, so a user who loads such a folder with plain PEFT gets ``KeyError: 'RLRR (pip install
peft-tsrs; import peft_tsrs)'`` instead of an unexplained ``KeyError: 'RLRR'``.

It also holds the version-specific glue between the pinned ``transformers`` and ``peft``
(:func:`install_transformers_compat`).
"""

from __future__ import annotations

import enum
import importlib.metadata
import importlib.util
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


# --- transformers integration (``model.add_adapter`` & co.) ---------------------------------------------------------
#
# transformers 5.25's PeftAdapterMixin (``transformers/integrations/peft.py``) gates ``add_adapter``, ``set_adapter``,
# ``enable_adapters``/``disable_adapters``, ``active_adapters``, ``get_adapter_state_dict`` and ``delete_adapter`` on
# ``check_peft_version(min_version=MIN_PEFT_VERSION)`` with ``MIN_PEFT_VERSION = "0.22.0"``, an unreleased peft. That
# gate is the only thing in the way with peft 0.21.x: every peft function and attribute the mixin calls exists in
# 0.21.x (``load_adapter``, which is not gated, already uses them all). It blocks LoRA exactly like RLRR and PACE, and
# ``save_pretrained`` of a model with an adapter calls ``active_adapters()``, so such a model could not be saved.
#
# REMOVE when the supported peft range starts at 0.22 (``SUPPORTED_PEFT``): the shim is then a no-op, because
# the installed peft satisfies the gate.

# The peft API that transformers' PeftAdapterMixin imports or calls: the shim lowers the gate only when all of it is
# present in the installed peft (a peft lacking any of it keeps transformers' own error).
TRANSFORMERS_PEFT_API = (
    ("peft", "PeftConfig"),
    ("peft", "PeftType"),
    ("peft", "inject_adapter_in_model"),
    ("peft", "get_peft_model_state_dict"),
    ("peft.functional", "delete_adapter"),
    ("peft.tuners.tuners_utils", "BaseTunerLayer"),
    ("peft.utils", "ModulesToSaveWrapper"),
    ("peft.utils.other", "AuxiliaryTrainingWrapper"),
    ("peft.utils.other", "AuxiliaryTrainingWrapper.adapter_state_dict_load_map"),
    ("peft.utils.transformers_weight_conversion", "build_peft_weight_mapping"),
)


def _has_api(module_name: str, attr_path: str) -> bool:
    try:
        obj = importlib.import_module(module_name)
        for part in attr_path.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return False
    return True


def install_transformers_compat() -> bool:
    """Let transformers' ``model.add_adapter(...)`` API run on the supported peft (see the comment above).

    Lowers ``transformers.integrations.peft.MIN_PEFT_VERSION`` (read at each call of the mixin's methods) to the
    installed peft version, and only when all of this holds: transformers asks for a newer peft than installed, but
    for no more than the first release after :data:`SUPPORTED_PEFT` (the gap this package was tested across), the
    installed peft is supported, and it has every piece of :data:`TRANSFORMERS_PEFT_API`. Nothing else of
    transformers or peft is touched. Idempotent; returns whether the gate was lowered by this call.
    """
    if importlib.util.find_spec("transformers") is None:
        return False
    try:
        import transformers.integrations.peft as hf_peft
    except ImportError:
        return False
    required = getattr(hf_peft, "MIN_PEFT_VERSION", None)
    if required is None:
        return False
    installed = importlib.metadata.version("peft")  # what transformers' check_peft_version compares
    low, high = SUPPORTED_PEFT
    if Version(installed) >= Version(required) or Version(required) > high or not (low <= Version(installed) < high):
        return False
    if not all(_has_api(module, attr) for module, attr in TRANSFORMERS_PEFT_API):
        return False
    hf_peft.MIN_PEFT_VERSION = installed
    return True
