"""Shared machinery of the RLRR and PACE tuners.

Both methods re-parametrize a frozen module's weight and bias as a function of the *original* weight
(``W0 ⊙ (L R)`` for RLRR, ``W0 ⊙ (A B)`` for PACE). Merging therefore cannot be undone by subtracting a delta computed
from the merged weight. :class:`ComposedWeightLayer` keeps a copy of the original tensors while an adapter is merged,
so ``unmerge`` restores them bit for bit, and every merge recomputes the weight from the original.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
from abc import abstractmethod
from typing import Iterable, Optional, Union

import torch
from packaging.version import InvalidVersion, Version
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from safetensors import SafetensorError
from safetensors.torch import load_file as safetensors_load_file
from torch import nn

from ..version import __version__
from .defaults import LINEAR_TARGETS, default_targets

WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"  # written by save_pretrained(safe_serialization=False)

Patterns = Optional[Union[str, Iterable[str]]]


def matches_module_name(patterns: Patterns, key: str) -> bool:
    """PEFT's matching rule: a string is a full regex match, a list matches a name exactly or as a dotted suffix."""
    if not patterns:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, key) is not None
    return any(key == p or key.endswith(f".{p}") for p in patterns)


def block_index(key: str) -> Optional[int]:
    """The index of the transformer block a module name lives in (``...layer.3.attention...`` -> 3), if any."""
    found = re.search(r"\.(\d+)\.", f".{key}.")
    return int(found.group(1)) if found else None


def schedule_blocks(model: nn.Module, keys: Iterable[str]) -> int:
    """B of PACE's depth schedule: the model config's ``num_hidden_layers``, else 1 + the largest block index among the
    module names ``keys`` (read only when the config has no block count)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not n:
        n = 1 + max((d for d in map(block_index, keys) if d is not None), default=0)
    return int(n)


def head_modules(model: nn.Module, heads: Patterns) -> dict[str, nn.Module]:
    """The modules at the head paths ``heads``, by name: PEFT's ``ModulesToSaveWrapper`` of a trained head, never the
    copies inside it."""
    return {name: m for name, m in model.named_modules() if matches_module_name(heads, name)
            and not any(p in name.split(".") for p in ("modules_to_save", "original_module"))}


def head_in_training(module: nn.Module) -> bool:
    """The training flag of the module that computes a head's output. PEFT wraps a ``modules_to_save`` head in a
    ``ModulesToSaveWrapper``, which starts in train mode even on a model in eval mode; the copy it runs (or the original
    module, when no adapter of it is active) carries the model's flag."""
    copies = module._modules.get("modules_to_save")
    if isinstance(copies, nn.ModuleDict) and "original_module" in module._modules:
        active = [a for a in module.active_adapters if a in copies] if not module.disable_adapters else []
        return (copies[active[0]] if active else module._modules["original_module"]).training
    return module.training


def check_rank(r: int, method: str) -> None:
    """Reject a rank that is not a positive integer with a message that says what to change."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{method}: `r` must be a positive integer (rank of the adapter), got {r!r}.")


def check_saved_version(saved: Optional[str], method: str) -> str:
    """The version stored with an adapter, refused when it is not a version or newer than the installed package."""
    if saved is None:
        return __version__
    try:
        found = Version(str(saved))
    except InvalidVersion:
        raise ValueError(f"{method}: adapter_config.json has peft_tsrs_version {saved!r}, which is not a version; "
                         f"the folder was not written by peft-tsrs or is damaged.") from None
    installed = Version(__version__)
    if (found.major, found.minor) > (installed.major, installed.minor):
        raise ValueError(f"{method}: this adapter was saved by peft-tsrs {found}, newer than the installed "
                         f"{installed}. Upgrade: pip install -U 'peft-tsrs>={found.major}.{found.minor}'.")
    return str(saved)


def _weights_file(folder: str) -> Optional[str]:
    """The weights file PEFT will read from a local adapter folder (safetensors first, as PEFT), else ``None``."""
    for name in (WEIGHTS_NAME, BIN_WEIGHTS_NAME):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a weights file; a file that does not parse is reported as corrupted (ValueError)."""
    try:
        if path.endswith(".safetensors"):
            return safetensors_load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path} is corrupted or truncated ({err}). Save the adapter again with "
                         f"`model.save_pretrained(...)` or copy/download the folder again.") from None


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A content hash of adapter tensors: sha256 over name, dtype, shape and bytes of each, in name order (the same
    for the safetensors and the .bin format, independent of the file's header layout)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weights_digest(folder: str) -> Optional[str]:
    """:func:`tensors_digest` of a folder's weights file (what ``save_pretrained`` records), ``None`` if it has none."""
    path = _weights_file(folder)
    return None if path is None else tensors_digest(_read_tensors(path))


def check_adapter_folder(folder: str, expected_digest: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Before PEFT touches the model: a local adapter folder must hold a weights file that parses, whose tensors match
    the content hash recorded in adapter_config.json at save time (``weights_sha256``; folders written before it
    existed have none) and are all finite. Returns the tensors (for method-specific checks)."""
    path = _weights_file(folder)
    if path is None:
        raise FileNotFoundError(
            f"{os.path.join(folder, WEIGHTS_NAME)} not found: the adapter folder {folder} has adapter_config.json but "
            f"no weights file ({WEIGHTS_NAME} or {BIN_WEIGHTS_NAME}). Copy the complete folder, or save the adapter "
            f"again with `model.save_pretrained({folder!r})`, which writes both. Nothing was loaded into the model."
        )
    tensors = _read_tensors(path)
    if expected_digest is not None and tensors_digest(tensors) != expected_digest:
        raise ValueError(
            f"{path} does not match the content hash recorded in adapter_config.json when it was saved "
            f"(weights_sha256): its tensor data is corrupted or the file was replaced. Save the adapter again with "
            f"`model.save_pretrained(...)` or copy/download the folder again. Nothing was loaded into the model."
        )
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise ValueError(
            f"{path} holds NaN/inf values (tensor {min(bad)!r}{more}): the adapter diverged in training or the "
            f"file is damaged. Use an earlier checkpoint or train again. Nothing was loaded into the model."
        )
    return tensors


class ComposedWeightTuner(BaseTuner):
    """The model side shared by the RLRR and PACE tuners: the one place default ``target_modules`` are resolved.

    PEFT's own ``_prepare_adapter_config`` reads ``target_module_mapping`` too, but answers an unknown model type
    with a bare "Please specify `target_modules`"; this one uses the same mapping and says which model types have
    defaults and how to pass the names. Subclasses set :attr:`method_name` (used in messages) and may extend
    :meth:`_prepare_adapter_config` for defaults of their own fields.
    """

    target_module_mapping: dict[str, list[str]] = LINEAR_TARGETS
    method_name: str = ""

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = default_targets(
                self.target_module_mapping, model_config.get("model_type"), "target_modules", self.method_name
            )
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """PEFT's injection, undone when it fails part-way (e.g. a target that is not an ``nn.Linear``, met after
        other targets were already replaced): layers created by this call are replaced by the modules they wrap
        again, and layers that existed before lose the half-added adapter, so the model is as it was."""
        existing = {id(m) for m in model.modules() if isinstance(m, ComposedWeightLayer)}
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except BaseException:
            for name, module in list(model.named_modules()):
                if not isinstance(module, ComposedWeightLayer):
                    continue
                if id(module) in existing:
                    if adapter_name in module.available_adapters():
                        module.delete_adapter(adapter_name)
                else:
                    parent_name, _, child_name = name.rpartition(".")
                    parent = model.get_submodule(parent_name) if parent_name else model
                    setattr(parent, child_name, module.get_base_layer())
            raise

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Put ``new_module`` in place of ``child`` (as LoRA's override of PEFT's method).

        PEFT's ``BaseTuner._replace_module`` copies ``child.weight`` (and ``bias``) onto a new module without a
        ``base_layer``. ``merge_and_unload`` / ``unload`` pass through it for a ``modules_to_save`` wrapper too, and a
        head without a ``weight`` of its own (e.g. ``RobertaClassificationHead``: dense + out_proj) then raised
        AttributeError. Nothing needs copying here: an injected layer wraps ``child`` itself, and an unloaded module is
        the wrapped module or PEFT's trained copy, which carries its own weights. New adapter parameters go to the
        device of the wrapped module (the layers also move them in ``update_layer``).
        """
        setattr(parent, child_name, new_module)
        if hasattr(child, "base_layer"):
            child = child.base_layer
        reference = next(child.parameters(), None)
        if reference is None:
            return
        meta = torch.device("meta")
        for name, module in new_module.named_modules():
            if self.prefix in name and not any(p.device == meta for p in module.parameters()):
                module.to(reference.device)


class ComposedWeightLayer(BaseTunerLayer):
    """A tuner layer whose adapters act by rewriting the wrapped module's ``weight`` and ``bias``.

    Subclasses implement :meth:`compose`, which maps the original ``(weight, bias)`` and a list of adapter names to the
    effective ``(weight, bias)``. Merging writes the composition into the base module (keeping the originals);
    unmerging restores the originals exactly.

    ``get_delta_weight`` (read by the distance constraints and diagnostics) is deliberately not derived here as
    ``compose(...) - original``: in floating point that differs from the directly computed ``ΔW`` in the last bits,
    so each layer with an additive weight update computes it from its own parameters. A layer that only rescales
    (SSF's ``ScaleShift``) has none.
    """

    def _init_composed(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters = []
        # Originals kept only while merged; non-persistent, so they never enter a state dict.
        self.register_buffer("_original_weight", None, persistent=False)
        self.register_buffer("_original_bias", None, persistent=False)
        self._had_bias = getattr(base_layer, "bias", None) is not None

    def _init_linear(self, base_layer: nn.Module, method: str) -> None:
        """The shared start of a layer adapting an ``nn.Linear``: the composed-weight state, an empty rank table
        ``r`` (adapter name -> rank) and ``in_features`` / ``out_features``; any other base module is refused."""
        self._init_composed(base_layer)
        self.r: dict[str, int] = {}
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{method} adapts nn.Linear layers, got {type(base).__name__}.")
        self.in_features, self.out_features = base.in_features, base.out_features

    # ------------------------------------------------------------------ the method-specific part
    @abstractmethod
    def compose(
        self, weight: torch.Tensor, bias: Optional[torch.Tensor], adapter_names: list[str]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Effective ``(weight, bias)`` of the given adapters applied to the original ``(weight, bias)``.

        Abstract: a subclass without it cannot be instantiated (``BaseTunerLayer`` is an ``ABC``, so a layer class
        ``Linear(nn.Module, SomeLayer)`` gets ``ABCMeta`` as its metaclass and the check applies).
        """

    def _follow_training_flag(self) -> None:
        """A new tuner layer takes the ``training`` flag of the module it wraps (``nn.Module`` starts in train mode,
        so a layer added to a model in eval mode would otherwise run its training-only behaviour, e.g. PACE's
        noise). Called once at the end of a layer's ``__init__``."""
        self.train(self.get_base_layer().training)

    def _adapter_created(self, adapter_name: str, inference_mode: bool) -> None:
        """The end of every ``update_layer``: move the new parameters to the base layer's device and re-activate the
        active adapters (which sets ``requires_grad``: off for inactive adapters and in inference mode)."""
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def available_adapters(self) -> set[str]:
        """Names of the adapters this layer holds."""
        return set(getattr(self, self.adapter_layer_names[0]).keys())

    # ------------------------------------------------------------------ originals
    def original_weight(self) -> torch.Tensor:
        """The frozen pretrained weight, also while adapters are merged into the base module."""
        return self._original_weight if self.merged else self.get_base_layer().weight

    def original_bias(self) -> Optional[torch.Tensor]:
        """The frozen pretrained bias (``None`` if the base module has none)."""
        if self.merged:
            return self._original_bias
        return getattr(self.get_base_layer(), "bias", None)

    def composed_weight_and_bias(
        self, adapter_names: Optional[list[str]] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Effective weight and bias for ``adapter_names`` (default: the active adapters) from the originals."""
        names = [a for a in (adapter_names or self.active_adapters) if a in self.available_adapters()]
        return self.compose(self.original_weight(), self.original_bias(), names)

    # ------------------------------------------------------------------ merge / unmerge
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the adapters into the base module's weight and bias (exactly reversible by :meth:`unmerge`)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [a for a in adapter_names if a in self.available_adapters()]
        if not adapter_names:
            return
        base = self.get_base_layer()
        names = list(self.merged_adapters) + adapter_names
        with torch.no_grad():
            weight, bias = self.compose(self.original_weight(), self.original_bias(), names)
            if safe_merge and not (
                torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())
            ):
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter(s) {adapter_names} seem to be broken."
                )
            if not self.merged:
                self._original_weight = base.weight.detach().clone()
                self._original_bias = None if base.bias is None else base.bias.detach().clone()
            base.weight.data = weight.to(base.weight.dtype)
            if bias is not None:
                if base.bias is None:
                    base.bias = nn.Parameter(bias.to(base.weight.dtype), requires_grad=False)
                else:
                    base.bias.data = bias.to(base.bias.dtype)
        self.merged_adapters = names

    def unmerge(self) -> None:
        """Restore the original weight and bias bit for bit."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        with torch.no_grad():
            base.weight.data = self._original_weight
            if self._original_bias is None:
                if base.bias is not None:
                    base.bias = None
            else:
                base.bias.data = self._original_bias
        self._original_weight = None
        self._original_bias = None
        self.merged_adapters = []

    # ------------------------------------------------------------------ helpers for subclasses
    def _base_forward_or_none(self, x: torch.Tensor, *args, **kwargs) -> Optional[torch.Tensor]:
        """The base module's output when adapters are off or merged; ``None`` when the adapters must run."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if not any(a in self.available_adapters() for a in self.active_adapters):
            return self.base_layer(x, *args, **kwargs)
        return None
