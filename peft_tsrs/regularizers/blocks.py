"""Locate the list of blocks and the classification head of a (possibly PEFT-wrapped) model, and read or replace what
flows through a block."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["HEAD_NAMES", "block_input", "blocks_path", "find_blocks", "find_head", "first_tensor", "paired_stack",
           "replace_block_input", "unwrap_model"]

# Attribute names of the classification head in transformers' models (``classifier``: BERT, ViT, DeiT, ...; ``score``:
# decoders' sequence classification; ``head`` / ``fc``: timm-style vision models), in the order they are looked up.
HEAD_NAMES: tuple[str, ...] = ("classifier", "score", "head", "fc")


def first_tensor(output: Any) -> Tensor:
    """The main tensor of a block or model output: a tensor itself, ``output.logits`` when present, else the first
    value of a ``ModelOutput`` / tuple / list."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, dict):  # ModelOutput is an OrderedDict
        output = tuple(output.values())
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot read a tensor from an output of type {type(output).__name__}")


def block_input(args: tuple, kwargs: dict) -> Tensor | None:
    """The hidden states a block is called with: its first positional argument or ``hidden_states=``."""
    if args and isinstance(args[0], Tensor):
        return args[0]
    hidden = kwargs.get("hidden_states")
    return hidden if isinstance(hidden, Tensor) else None


def replace_block_input(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a block call with its hidden states (as found by :func:`block_input`) replaced."""
    if args and isinstance(args[0], Tensor):
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}

# Exact paths of the models this package is tested on (transformers 5.x names).
_KNOWN_PATHS = ("vit.layers", "bert.encoder.layer")
# Generic paths, tried as-is and below any single attribute (``roberta.``, ``deit.``, ...). An encoder path of an
# encoder-decoder model is replaced by its decoder twin (see ``paired_stack``).
_GENERIC_PATHS = (
    "encoder.layer",
    "encoder.layers",
    "encoder.block",
    "layers",
    "blocks",
    "h",
    "transformer.h",
    "model.layers",
    "decoder.layers",
    "decoder.block",
)


def _is_peft_wrapper(module: nn.Module) -> bool:
    return any(c.__module__.split(".")[0] == "peft" for c in type(module).__mro__ if c is not nn.Module)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip PEFT wrappers (``PeftModel`` via ``get_base_model()``, tuner models via ``.model``), DDP/DataParallel
    and ``torch.compile`` wrappers.

    Only classes defined in the ``peft`` package (or subclassing them) are unwrapped, so a
    transformers model's own ``.model`` / ``.base_model`` attributes are never followed.
    """
    for _ in range(8):
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
            continue
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
            continue
        if not _is_peft_wrapper(model):
            break
        get_base = getattr(model, "get_base_model", None)
        if callable(get_base):
            inner = get_base()
        elif isinstance(getattr(model, "model", None), nn.Module):
            inner = model.model  # a BaseTuner (LoraModel, RLRRModel, ...) used directly
        elif isinstance(getattr(model, "base_model", None), nn.Module):
            inner = model.base_model
        else:
            break
        if not isinstance(inner, nn.Module) or inner is model:
            break
        model = inner
    return model


def _resolve(root: nn.Module, path: str) -> nn.Module | None:
    module: object = root
    for part in path.split("."):
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and part.isdigit():
            idx = int(part)
            module = module[idx] if idx < len(module) else None
        else:
            module = getattr(module, part, None) if isinstance(module, nn.Module) else None
        if module is None:
            return None
    return module if isinstance(module, nn.Module) else None


def _module_lists(root: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [(name, mod) for name, mod in root.named_modules() if isinstance(mod, nn.ModuleList) and name]


def _homogeneous(mods: nn.ModuleList) -> bool:
    return len(mods) >= 2 and len({type(m) for m in mods}) == 1


def paired_stack(model: nn.Module, path: str) -> str | None:
    """For the blocks at ``path`` (relative to the unwrapped model) of an encoder-decoder model, the path of the other
    stack: ``'model.encoder.layers'`` ↔ ``'model.decoder.layers'``; ``None`` when there is no such twin."""
    parts = path.split(".")
    for side, other in (("encoder", "decoder"), ("decoder", "encoder")):
        if side in parts:
            i = len(parts) - 1 - parts[::-1].index(side)
            twin = ".".join([*parts[:i], other, *parts[i + 1:]])
            found = _resolve(unwrap_model(model), twin)
            if isinstance(found, nn.ModuleList) and len(found) > 0:
                return twin
    return None


def blocks_path(model: nn.Module, blocks: nn.ModuleList) -> str:
    """The dotted path of ``blocks`` inside the unwrapped ``model`` (``''`` if they are not part of it)."""
    return next((name for name, mod in unwrap_model(model).named_modules() if mod is blocks), "")


def _prefer_decoder(base: nn.Module, path: str) -> str:
    """The decoder twin of an encoder path (the decoder's output is what the head reads), else ``path``."""
    twin = paired_stack(base, path)
    return twin if twin is not None and "decoder" in twin.split(".") else path


def find_blocks(model: nn.Module, block_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return ``(path, blocks)``: the ``nn.ModuleList`` of the blocks whose output the head reads — the encoder's
    blocks of an encoder (BERT, ViT), the decoder's blocks of a decoder-only or an encoder-decoder model (BART, T5).

    ``path`` is relative to the unwrapped base model (PEFT wrappers are seen through). A given
    ``block_path`` may be relative to the base model or to ``model`` itself and is returned as given.
    """
    base = unwrap_model(model)
    if block_path is not None:
        for root in (base, model):
            found = _resolve(root, block_path)
            if isinstance(found, nn.ModuleList):
                return block_path, found
        candidates = [name for name, _ in _module_lists(base)]
        shown = ", ".join(repr(c) for c in candidates[:10]) or "none"
        more = f" (and {len(candidates) - 10} more)" if len(candidates) > 10 else ""
        raise ValueError(
            f"block_path={block_path!r} does not resolve to an nn.ModuleList in {type(base).__name__}. "
            f"ModuleList paths in the model: {shown}{more}."
        )

    prefixes = [""] + [f"{name}." for name, _ in base.named_children()]
    candidates = list(_KNOWN_PATHS)
    candidates += [p + g for p in prefixes for g in _GENERIC_PATHS]
    for path in candidates:
        found = _resolve(base, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            path = _prefer_decoder(base, path)
            return path, _resolve(base, path)

    best: tuple[str, nn.ModuleList] | None = None
    for name, mods in _module_lists(base):
        if _homogeneous(mods) and (best is None or len(mods) > len(best[1])):
            best = (name, mods)
    if best is not None:
        path = _prefer_decoder(base, best[0])
        return path, _resolve(base, path)
    raise ValueError(
        f"Could not locate the list of blocks in {type(base).__name__}. Pass block_path='...', the "
        "dotted path of the nn.ModuleList holding the blocks (e.g. 'bert.encoder.layer')."
    )


def find_head(model: nn.Module, names: tuple[str, ...] = HEAD_NAMES) -> tuple[str, nn.Module]:
    """Return ``(name, head)``: the first attribute of the unwrapped base model named in ``names`` that is a module.

    The module is returned as the model holds it: a PEFT ``ModulesToSaveWrapper`` (``modules_to_save=["classifier"]``)
    or a tuner layer wrapping the head is returned itself, so a hook on it sees what the head is called with.
    """
    base = unwrap_model(model)
    for name in names:
        head = getattr(base, name, None)
        if isinstance(head, nn.Module):
            return name, head
    raise ValueError(
        f"Could not find the classification head of {type(base).__name__}: none of the attributes "
        f"{', '.join(repr(n) for n in names)} is a module."
    )
