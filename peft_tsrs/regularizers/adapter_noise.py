"""PACE's training noise on the adapter branch of LoRA and RLRR layers (Ni et al., NeurIPS 2024).

PACE multiplies the adapter branch by ``z ~ N(1, σ_d²)``: ``h = W0 x + z ⊙ Δ(x)``. The PACE tuner draws it inside its
own layers; for any other adapter the noise belongs to the consistency regularizer, which puts it on

* LoRA ``Linear`` layers: the output of ``lora_B`` (``Δ(x) = B A x · scaling``, the scaling applied after the hook);
* RLRR ``Linear`` layers: their output minus the frozen base layer's (``Δ(x) = x (W0 ⊙ L R)ᵀ + shift``). An RLRR layer
  folds its branch into one weight and runs one matmul; the noise needs the branch apart, so the hook runs the base
  layer once more (``y = base(x) + z ⊙ (y − base(x))``): one extra ``in × out`` matmul per RLRR layer in the forward and
  one for its input gradient in the backward (five matmuls where the layer ran three; no extra stored activation but
  ``z``). Computing ``Δ(x)`` apart costs the same, so there is no cheaper exact way;
* the classification head's logits, as the official code treats the whole head as an adapter branch.

σ_d follows the PACE tuner's depth schedule (:func:`~peft_tsrs.tuners.pace.config.depth_sigma` with its defaults:
linear in depth, block 0 noiseless, the head σ/B), one ``z`` per (sample, channel) shared across tokens (``BC``).
The hooks exist only inside a training step's forward (:func:`adapter_noise`) and act only on modules in training mode
whose adapters run (not disabled, not merged), so evaluation, merged or disabled adapters and a model outside the
trainer carry no noise.

Rows: every input row of the forward draws its own ``z`` (PACE's two copies of a batch get independent noise). A
layer whose output holds ``k`` stacked copies of those rows — a copy made inside the forward, such as TSRS's noisy
copy of a block input — gives all ``k`` copies the same ``z``, so TSRS compares passes that differ by its own noise
only (as dropout is shared, see ``shared_dropout``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional

from peft.tuners.lora.layer import Linear as LoraLinear
from torch import Tensor, nn

from ..tuners.defaults import DEFAULT_HEAD_MODULES
from ..tuners.pace import PACEConfig, PACELayer, depth_sigma, head_sigma
from ..tuners.pace.layer import multiplicative_noise
from ..tuners.rlrr.layer import RLRRLayer
from ..tuners.tuners_utils import block_index, head_in_training, head_modules, schedule_blocks
from .blocks import unwrap_model

__all__ = ["NoiseSite", "adapter_noise", "pace_noise_sites", "row_shared_noise"]

# The PACE tuner's defaults (the official ViT-B setting): σ linear in depth, block 0 without noise.
SCHEDULE, FIRST_BLOCK = "linear", False


@dataclass(frozen=True)
class NoiseSite:
    """A module whose output gets PACE's noise: ``lora_B`` of a LoRA adapter (``"lora"``), an RLRR layer whose
    output minus its base layer's is noised (``"branch"``), or the head (``"head"``); ``name`` is its module name.
    ``layer`` is the tuner layer whose state (adapters disabled / merged) says whether the branch runs; for the head,
    one of the model's LoRA / RLRR layers (PEFT disables and merges all of them together)."""

    name: str
    module: nn.Module
    sigma: float
    kind: Literal["lora", "branch", "head"]
    layer: nn.Module


def row_shared_noise(like: Tensor, sigma: float, rows: int) -> Tensor:
    """``z ~ N(1, σ²)`` for ``like`` (batch first, channels last; 'BC'), one draw per row of ``rows`` rows, repeated
    over the ``k`` stacked copies when ``like`` holds ``k · rows`` rows."""
    n = like.shape[0]
    copies = n // rows if 0 < rows < n and n % rows == 0 else 1
    z = multiplicative_noise(like[: n // copies], sigma, "BC")
    return z.repeat(copies, *([1] * (z.ndim - 1))) if copies > 1 else z


def _tuner_sigmas(model: nn.Module) -> set[float]:
    configs = getattr(model, "peft_config", None)
    return {float(c.sigma) for c in (configs or {}).values() if isinstance(c, PACEConfig)}


def pace_noise_sites(model: nn.Module, sigma: Optional[float]) -> list[NoiseSite]:
    """Where the consistency regularizer puts PACE's noise of scale ``sigma`` (``RegularizerConfig.pace_sigma``) on
    ``model``, with each site's σ_d; sites whose σ_d is 0 are left out. Empty for a PACE tuner model (its layers draw
    the noise) and for ``sigma = 0``. Raises ``ValueError`` saying what to set when there is no noise source: no PACE
    adapter and ``sigma`` unset, ``sigma > 0`` on a model with no LoRA / RLRR linear layer, or a ``sigma`` that
    contradicts the PACE adapter's own σ."""
    if any(isinstance(m, PACELayer) for m in model.modules()):
        own = _tuner_sigmas(model)
        if sigma is not None and own != {float(sigma)}:
            own_text = ", ".join(map(str, sorted(own))) or "unknown"
            raise ValueError(
                f"RegularizerConfig.pace_sigma={sigma} contradicts the PACE adapter's own sigma ({own_text}): a PACE "
                f"adapter draws PACE's noise in its own layers. Leave pace_sigma unset (None) and set the adapter's "
                f"PACEConfig(sigma=...)."
            )
        return []
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (LoraLinear, RLRRLayer))]
    if sigma is None:
        needs = "" if layers else ", with a LoRA or RLRR adapter"
        raise ValueError(
            f"RegularizerConfig: pace_weight > 0 but the model has no source of PACE's noise, so the consistency term "
            f"would compare passes that differ by dropout at most. Set pace_sigma=... (σ of the noise z ~ N(1, σ²) on "
            f"the LoRA / RLRR adapter branches; the paper's grid is 0.1-2{needs}), train a PACE adapter (PACEConfig), "
            f"or set pace_sigma=0 for the term without noise on purpose."
        )
    if sigma > 0 and not layers:
        raise ValueError(
            f"RegularizerConfig.pace_sigma={sigma} puts PACE's noise on the adapter branches of LoRA and RLRR linear "
            f"layers, and {type(unwrap_model(model)).__name__} has none. Wrap the model with a LoRA or RLRR adapter "
            f"(get_peft_model), or train a PACE adapter (PACEConfig) and leave pace_sigma unset."
        )
    if sigma == 0:
        return []
    n_blocks = schedule_blocks(unwrap_model(model), (name for name, _ in layers))
    sites = []
    for name, m in layers:
        sigma_d = depth_sigma(sigma, block_index(name), n_blocks, SCHEDULE, FIRST_BLOCK)
        if isinstance(m, RLRRLayer):
            sites.append(NoiseSite(name, m, sigma_d, "branch", m))
            continue
        variants = sorted(a for a in getattr(m, "lora_variant", {}) if a in m.lora_B)
        if variants:
            raise ValueError(f"PACE noise (pace_sigma) on LoRA variants such as DoRA is not supported: {name} "
                             f"adapter(s) {variants}. Use plain LoRA, or set pace_sigma=0.")
        sites += [NoiseSite(f"{name}.lora_B.{a}", b, sigma_d, "lora", m) for a, b in m.lora_B.items()]
    sigma_head = head_sigma(sigma, n_blocks, SCHEDULE)
    representative = layers[0][1]
    sites += [NoiseSite(name, m, sigma_head, "head", representative)
              for name, m in head_modules(model, DEFAULT_HEAD_MODULES).items()]
    return [s for s in sites if s.sigma > 0]


def _adapters_run(layer: nn.Module) -> bool:
    """Whether a LoRA / RLRR layer's forward runs its adapter branches (not disabled, not merged, an active adapter
    present)."""
    held = layer.lora_B if isinstance(layer, LoraLinear) else layer.available_adapters()
    return not layer.disable_adapters and not layer.merged and any(a in held for a in layer.active_adapters)


@contextlib.contextmanager
def adapter_noise(sites: Sequence[NoiseSite], rows: int) -> Iterator[None]:
    """Within the block, the output of every site in training mode whose adapters run is noised (see the module
    docstring); ``rows`` is the number of input rows of the forward. The hooks are removed on exit, also after an
    exception."""

    def output_noise(site: NoiseSite):
        training = head_in_training if site.kind == "head" else (lambda m: m.training)

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if not (isinstance(output, Tensor) and training(module) and _adapters_run(site.layer)):
                return output
            return output * row_shared_noise(output, site.sigma, rows)
        return hook

    def branch_noise(site: NoiseSite):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if not (isinstance(output, Tensor) and module.training and _adapters_run(module)):
                return output
            base = module.base_layer(*args, **kwargs).to(output.dtype)  # the extra matmul (module docstring)
            return base + row_shared_noise(output, site.sigma, rows) * (output - base)
        return hook

    handles = []
    try:
        for site in sites:
            if site.kind == "branch":
                handles.append(site.module.register_forward_hook(branch_noise(site), with_kwargs=True))
            else:
                handles.append(site.module.register_forward_hook(output_noise(site)))
        yield
    finally:
        for handle in handles:
            handle.remove()
