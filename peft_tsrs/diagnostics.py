"""Diagnostics the regularization papers use to explain generalization, for plain and PEFT-wrapped models.

* stable rank ``‖W‖_F² / ‖W‖₂²`` of the weights actually used in the forward (TSRS),
* noise sensitivity of the logits to Gaussian noise injected at a block's input (TSRS, PACE),
* distance travelled from the pretrained weights (regularized self-labeling),
* gradient norm and a 1-D filter-normalised loss-landscape probe (PACE's flatness argument).

Everything is pure torch. Layer names are those of the underlying ``transformers`` model (a ``PeftModel`` is seen
through ``get_base_model()``, tuner layers are named without ``.base_layer``), so a PEFT model can be compared with
the plain pretrained model it came from.
"""

from __future__ import annotations

import math
import re
import statistics
import warnings
from typing import Any, Callable, Mapping, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .regularizers.blocks import block_input, find_blocks, first_tensor, replace_block_input, unwrap_model

try:  # peft >= 0.15
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
except ImportError:  # pragma: no cover - older peft
    from peft.utils.other import ModulesToSaveWrapper

    AuxiliaryTrainingWrapper = ModulesToSaveWrapper

try:
    from transformers.pytorch_utils import Conv1D as _HFConv1D
except ImportError:  # pragma: no cover
    _HFConv1D = nn.Linear

_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, _HFConv1D)

__all__ = [
    "distance_travelled",
    "effective_weights",
    "gradient_norm",
    "noise_sensitivity",
    "sharpness_1d",
    "snapshot_effective_weights",
    "stable_rank",
    "stable_ranks",
    "summarize",
]


# --------------------------------------------------------------------------------------------- stable rank
def stable_rank(weight: torch.Tensor) -> float:
    """``‖W‖_F² / ‖W‖₂²`` in float32 (conv kernels flattened to ``out × rest``); 0.0 for a zero matrix."""
    if weight.ndim < 2:
        raise ValueError(f"stable_rank needs a matrix or a conv kernel, got a tensor of shape {tuple(weight.shape)}.")
    w = weight.detach().to(torch.float32).reshape(weight.shape[0], -1)
    frobenius_sq = w.square().sum()
    if frobenius_sq == 0:
        return 0.0
    if not torch.isfinite(frobenius_sq):
        return float("nan")
    spectral = torch.linalg.matrix_norm(w, ord=2)
    return float(frobenius_sq / spectral.square())


# --------------------------------------------------------------------------------------------- effective weights
def _additive_delta(layer: BaseTunerLayer, adapter: str, weight: torch.Tensor) -> Optional[torch.Tensor]:
    """``layer.get_delta_weight(adapter)`` when it is an additive update of ``weight``'s shape, else ``None``."""
    get_delta = getattr(layer, "get_delta_weight", None)
    if get_delta is None or getattr(layer, "use_dora", {}).get(adapter, False):  # DoRA rescales: not additive
        return None
    delta = get_delta(adapter)
    if not isinstance(delta, torch.Tensor) or delta.shape != weight.shape:
        return None
    return delta.to(weight.dtype)


def _probe_linear(layer: nn.Module, base: nn.Linear) -> torch.Tensor:
    """Weight of an affine tuner layer read off its eval-mode forward: ``W = (f(I) − f(0))ᵀ``."""
    modes = {m: m.training for m in layer.modules()}
    layer.eval()
    try:
        eye = torch.eye(base.in_features, dtype=base.weight.dtype, device=base.weight.device)
        out = layer(eye) - layer(torch.zeros_like(eye[:1]))
    finally:
        for module, mode in modes.items():
            module.training = mode
    return out.T


def _tuner_weight(layer: BaseTunerLayer, base: nn.Module) -> torch.Tensor:
    """The weight a tuner layer applies in its forward (see :func:`effective_weights`)."""
    weight = base.weight
    if hasattr(layer, "composed_weight_and_bias"):  # peft_tsrs tuners (RLRR, PACE): composed from the originals
        return layer.original_weight() if layer.disable_adapters else layer.composed_weight_and_bias()[0]
    if layer.merged and not layer.disable_adapters:
        return weight
    if layer.merged:  # a disabled layer unmerges before its forward
        names, sign = list(layer.merged_adapters), -1.0
    elif layer.disable_adapters:
        return weight
    else:
        held = getattr(layer, layer.adapter_layer_names[0], {}) if layer.adapter_layer_names else {}
        names, sign = [a for a in layer.active_adapters if a in held], 1.0
    if not names:
        return weight
    deltas = [_additive_delta(layer, name, weight) for name in names]
    if all(d is not None for d in deltas):
        return weight + sign * sum(deltas)
    if sign > 0 and isinstance(base, nn.Linear):
        return _probe_linear(layer, base)
    warnings.warn(
        f"effective_weights: cannot compute the adapted weight of a {type(layer).__name__} around a "
        f"{type(base).__name__}; using its base weight.",
        stacklevel=3,
    )
    return weight


def _collect(module: nn.Module, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(module, BaseTunerLayer):
        base = module.get_base_layer()
        if isinstance(base, _WEIGHT_LAYERS):
            out[prefix] = _tuner_weight(module, base).detach()
        return
    if isinstance(module, AuxiliaryTrainingWrapper):  # modules_to_save: only the copy the forward uses
        target = module.original_module
        if isinstance(module, ModulesToSaveWrapper) and not module.disable_adapters:
            active = [a for a in module.active_adapters if a in module.modules_to_save]
            target = module.modules_to_save[active[0]] if active else target
        _collect(target, prefix, out)
        return
    if isinstance(module, _WEIGHT_LAYERS):
        out[prefix] = module.weight.detach()
        return
    for name, child in module.named_children():
        _collect(child, f"{prefix}.{name}" if prefix else name, out)


def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weight every ``nn.Linear`` / conv layer uses in the forward, adapters folded in, detached.

    For a PEFT tuner layer that is the base weight plus ``get_delta_weight`` of each active adapter (LoRA, VeRA, ...),
    the composed weight for peft_tsrs tuners, or the weight read off the layer's forward for other affine tuners
    (IA3, DoRA). Of ``modules_to_save`` only the active copy is reported, under the wrapped module's name.
    The tensors may share storage with the model; use :func:`snapshot_effective_weights` to keep a copy.
    """
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        _collect(unwrap_model(model), "", out)
    return out


def snapshot_effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of :func:`effective_weights`, the reference for :func:`distance_travelled`."""
    return {name: w.detach().to("cpu", copy=True) for name, w in effective_weights(model).items()}


def _filtered(weights: Mapping[str, torch.Tensor], include: Optional[str]) -> dict[str, torch.Tensor]:
    if include is None:
        return dict(weights)
    pattern = re.compile(include)
    return {name: w for name, w in weights.items() if pattern.search(name)}


def stable_ranks(model: nn.Module, include: Optional[str] = None) -> dict[str, float]:
    """Stable rank of each layer's effective weight; ``include`` is a regex searched in the layer names
    (e.g. ``r"attention"`` or ``r"layers\\.\\d+\\."`` to leave out the patch embedding and the head)."""
    return {name: stable_rank(w) for name, w in _filtered(effective_weights(model), include).items()}


# --------------------------------------------------------------------------------------------- distance
def _distances(
    current: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    out: dict[str, float] = {}
    skipped = []
    for name, weight in current.items():
        ref = reference.get(name)
        if ref is None:
            continue
        if ref.shape != weight.shape:
            skipped.append(f"{name} {tuple(ref.shape)} -> {tuple(weight.shape)}")
            continue
        diff = weight.to(torch.float32) - ref.to(device=weight.device, dtype=torch.float32)
        out[name] = float(torch.linalg.vector_norm(diff))
    if skipped:
        warnings.warn(f"distance_travelled: shapes differ, layers skipped: {', '.join(skipped)}", stacklevel=3)
    if not out:
        raise ValueError(
            "distance_travelled: the reference shares no layer (with equal shape) with the model. Take it with "
            "snapshot_effective_weights(model) before training, or pass the model it was fine-tuned from."
        )
    return out


def distance_travelled(
    model: nn.Module, reference: Union[Mapping[str, torch.Tensor], nn.Module], include: Optional[str] = None
) -> dict[str, float]:
    """Per-layer ``‖W − W0‖_F`` of the effective weights against ``reference`` (a
    :func:`snapshot_effective_weights` dict or another model). Layers absent from the reference are left out."""
    ref = effective_weights(reference) if isinstance(reference, nn.Module) else reference
    with torch.no_grad():
        return _distances(_filtered(effective_weights(model), include), ref)


# --------------------------------------------------------------------------------------------- gradients
def gradient_norm(model: nn.Module) -> float:
    """Global L2 norm of the gradients of the trainable parameters (call after ``loss.backward()``)."""
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        raise ValueError(
            "gradient_norm: no trainable parameter has a gradient; call loss.backward() first and read the norm "
            "before optimizer.zero_grad()."
        )
    total = torch.zeros((), dtype=torch.float64)
    for g in grads:
        g = g.coalesce().values() if g.is_sparse else g
        total += g.detach().to(torch.float64).square().sum().cpu()
    return float(total.sqrt())


# --------------------------------------------------------------------------------------------- noise sensitivity
def _save_modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore_modes(modes: Mapping[nn.Module, bool]) -> None:
    for module, mode in modes.items():
        module.training = mode


def noise_sensitivity(
    model: nn.Module,
    inputs: Mapping[str, Any],
    noise_std: float = 0.2,
    layer: int = 0,
    n_samples: int = 4,
    block_path: Optional[str] = None,
    seed: int = 0,
) -> float:
    """Mean relative change ``‖f(x̃) − f(x)‖ / ‖f(x)‖`` of the logits (norms over the whole batch) when
    Gaussian noise of std ``noise_std · RMS(h)`` is added to the hidden states ``h`` entering block ``layer``.

    Runs in eval mode without gradients over ``n_samples`` noise draws; the training mode is restored afterwards.
    """
    if noise_std < 0 or n_samples < 1:
        raise ValueError(f"noise_sensitivity: need noise_std >= 0 and n_samples >= 1, got {noise_std}, {n_samples}.")
    _, blocks = find_blocks(model, block_path)
    if not -len(blocks) <= layer < len(blocks):
        raise ValueError(f"noise_sensitivity: layer={layer} but the model has {len(blocks)} blocks.")
    generator = torch.Generator().manual_seed(seed)
    active = {"on": False}

    def add_noise(module: nn.Module, args: tuple, kwargs: dict):
        if not active["on"]:
            return None
        hidden = block_input(args, kwargs)
        scale = noise_std * hidden.detach().float().norm() / math.sqrt(max(1, hidden.numel()))
        noise = torch.randn(hidden.shape, generator=generator).to(hidden.device, hidden.dtype)
        return replace_block_input(args, kwargs, hidden + noise * scale.to(hidden.dtype))

    modes = _save_modes(model)
    handle = blocks[layer].register_forward_pre_hook(add_noise, with_kwargs=True)
    model.eval()
    try:
        with torch.no_grad():
            clean = first_tensor(model(**inputs)).float()
            reference = clean.norm().clamp_min(torch.finfo(torch.float32).tiny)
            active["on"] = True
            changes = [float((first_tensor(model(**inputs)).float() - clean).norm() / reference) for _ in range(n_samples)]
    finally:
        handle.remove()
        _restore_modes(modes)
    return sum(changes) / len(changes)


# --------------------------------------------------------------------------------------------- sharpness
def _trainable(model: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def _filter_normalised(param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A Gaussian direction rescaled to ``param``'s norm, per row (output unit / filter) for ≥2-D tensors."""
    d = torch.randn(param.shape, generator=generator, dtype=torch.float32)
    w = param.detach().to("cpu", torch.float32)
    if param.ndim >= 2:
        d2, w2 = d.reshape(d.shape[0], -1), w.reshape(w.shape[0], -1)
        d = (d2 * (w2.norm(dim=1, keepdim=True) / d2.norm(dim=1, keepdim=True).clamp_min(1e-12))).reshape(param.shape)
    else:
        d = d * (w.norm() / d.norm().clamp_min(1e-12))
    return d.to(param.device, param.dtype)


def sharpness_1d(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], torch.Tensor],
    radius: float = 0.05,
    n_points: int = 11,
    seed: int = 0,
) -> dict[str, Any]:
    """1-D loss landscape along a random filter-normalised direction ``d`` in the trainable parameters.

    Evaluates ``loss_fn(model)`` at ``θ + α d`` for ``n_points`` values of ``α`` in ``[−radius, radius]`` (eval
    mode, no gradients). Rows of zero norm (e.g. a zero-initialised LoRA factor) get a zero direction, as in filter
    normalisation. Returns ``alphas``, ``losses``, ``loss_at_zero`` and ``sharpness`` = max loss − loss at 0. The
    parameters are restored bit for bit and the training mode is restored.
    """
    if radius <= 0 or n_points < 2:
        raise ValueError(f"sharpness_1d: need radius > 0 and n_points >= 2, got {radius}, {n_points}.")
    params = _trainable(model)
    if not params:
        raise ValueError("sharpness_1d: the model has no trainable parameter (requires_grad=True) to probe.")
    generator = torch.Generator().manual_seed(seed)
    directions = [_filter_normalised(p, generator) for p in params]
    originals = [p.detach().clone() for p in params]
    alphas = torch.linspace(-radius, radius, n_points, dtype=torch.float64).tolist()
    modes = _save_modes(model)
    model.eval()
    losses: list[float] = []
    try:
        with torch.no_grad():
            loss_at_zero = float(loss_fn(model))
            for alpha in alphas:
                for p, w0, d in zip(params, originals, directions):
                    p.copy_(w0 + alpha * d)
                losses.append(float(loss_fn(model)))
    finally:
        with torch.no_grad():
            for p, w0 in zip(params, originals):
                p.copy_(w0)
        _restore_modes(modes)
    return {
        "alphas": alphas,
        "losses": losses,
        "loss_at_zero": loss_at_zero,
        "sharpness": max(losses + [loss_at_zero]) - loss_at_zero,
    }


# --------------------------------------------------------------------------------------------- summary
def summarize(
    model: nn.Module,
    reference: Union[Mapping[str, torch.Tensor], nn.Module, None] = None,
    include: Optional[str] = None,
    per_layer: bool = False,
) -> dict[str, Any]:
    """JSON-serialisable summary: mean / median stable rank over the layers matched by ``include`` and, with a
    ``reference``, the total (sum over layers) and mean distance travelled; ``per_layer=True`` adds the dicts."""
    weights = _filtered(effective_weights(model), include)
    if not weights:
        raise ValueError(f"summarize: no Linear/conv layer matches include={include!r}.")
    ranks = {name: stable_rank(w) for name, w in weights.items()}
    values = list(ranks.values())
    out: dict[str, Any] = {
        "num_layers": len(values),
        "stable_rank_mean": float(sum(values) / len(values)),
        "stable_rank_median": float(statistics.median(values)),
    }
    if per_layer:
        out["stable_ranks"] = ranks
    if reference is not None:
        ref = effective_weights(reference) if isinstance(reference, nn.Module) else reference
        with torch.no_grad():
            distances = _distances(weights, ref)
        out["distance_total"] = float(sum(distances.values()))
        out["distance_mean"] = float(sum(distances.values()) / len(distances))
        if per_layer:
            out["distances"] = distances
    return out
