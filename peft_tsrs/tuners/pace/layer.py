"""PACE layers: an adapter on a frozen ``nn.Linear`` whose branch is multiplied by ``z ~ N(1, σ²)`` in training.

The variants (as the official ``LoRAmul_VPTadd_Linear``, ``LoRAadd_Linear`` and ``VPTadd_Linear``):

* ``lora_mul_vpt_add``: ``ΔW = W0 ⊙ (A B)``, ``Δb = W0 (P q) + b0 ⊙ δb``;
* ``lora_add``: ``ΔW = A B``, ``Δb = b_lora`` (the LoRA branch's own bias);
* ``vpt_add``: ``ΔW = 0``, ``Δb = W0 (P q)``.

With ``ΔW`` and ``Δb`` the adapter's weight and bias updates (computed from the *original* ``W0, b0``):

* eval, or σ = 0: ``y = x (W0 + ΔW)ᵀ + b0 + Δb`` — one matmul, deterministic, identical to the merged layer;
* training: ``y = base(x) + (x ΔWᵀ + Δb) ⊙ z``, one ``z`` per (sample, channel) (``BC``) or per token (``BTC``).

Paired passes: when a trainer duplicates a batch (``cat([x, x])``) in one forward for the consistency loss, each
of the 2B samples draws its own ``z``, so the two copies get independent noise by construction.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..tuners_utils import ComposedWeightLayer, check_rank
from .config import PACEConfig

MUL, ADD, VPT = "lora_mul_vpt_add", "lora_add", "vpt_add"


def multiplicative_noise(like: torch.Tensor, sigma: float, shape: str) -> torch.Tensor:
    """``z ~ N(1, σ²)`` broadcastable to ``like`` (B, ..., C): per (sample, channel) for 'BC', per element for 'BTC'."""
    if shape == "BC" and like.ndim > 2:
        size = (like.shape[0],) + (1,) * (like.ndim - 2) + (like.shape[-1],)
    else:
        size = like.shape
    return 1.0 + sigma * torch.randn(size, device=like.device, dtype=like.dtype)


class PACELayer(ComposedWeightLayer):
    """Holds the PACE adapters of one linear layer, keyed by adapter name."""

    adapter_layer_names = ("pace_A", "pace_B", "pace_P", "pace_q", "pace_bias_scale", "pace_lora_bias")
    other_param_names = ("r", "variant", "sigma", "noise_shape")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self._init_linear(base_layer, "PACE")
        self.variant: dict[str, str] = {}
        self.sigma: dict[str, float] = {}
        self.noise_shape: dict[str, str] = {}
        self.noise_enabled = True
        self.pace_A = nn.ParameterDict({})
        self.pace_B = nn.ParameterDict({})
        self.pace_P = nn.ParameterDict({})
        self.pace_q = nn.ParameterDict({})
        self.pace_bias_scale = nn.ParameterDict({})
        self.pace_lora_bias = nn.ParameterDict({})

    def available_adapters(self) -> set[str]:
        return set(self.variant)

    def update_layer(self, adapter_name: str, config: PACEConfig, *, sigma: float) -> None:
        """Create (or re-create) the parameters of ``adapter_name``; reads ``r``, ``variant``, ``noise_shape``,
        ``init_weights`` and ``inference_mode`` from ``config``. ``sigma`` is this layer's noise scale, resolved per
        module from ``config.sigma`` by the depth schedule (:func:`~peft_tsrs.tuners.pace.config.depth_sigma`)."""
        r, variant = config.r, config.variant
        check_rank(r, "PACE")
        self.r[adapter_name], self.variant[adapter_name] = r, variant
        self.sigma[adapter_name], self.noise_shape[adapter_name] = float(sigma), config.noise_shape
        if variant in (MUL, ADD):
            self.pace_A[adapter_name] = nn.Parameter(torch.zeros(self.out_features, r))
            self.pace_B[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))
        if variant == ADD:
            self.pace_lora_bias[adapter_name] = nn.Parameter(torch.zeros(self.out_features))
        if variant in (MUL, VPT):
            self.pace_P[adapter_name] = nn.Parameter(torch.zeros(self.in_features, r))
            self.pace_q[adapter_name] = nn.Parameter(torch.empty(r))
        if variant == MUL:
            self.pace_bias_scale[adapter_name] = nn.Parameter(torch.zeros(self.out_features))
        self.reset_pace_parameters(adapter_name, config.init_weights)
        self._adapter_created(adapter_name, config.inference_mode)

    @torch.no_grad()
    def reset_pace_parameters(self, adapter_name: str, init_weights: bool) -> None:
        """The official init: ``A = 0`` with ``B`` (r × in) Xavier-uniform; ``P = 0`` with ``q`` Xavier-uniform as the
        official (r × 1) matrix (fan_in 1, fan_out r: bound ``√(6 / (r + 1))``); ``δb = 0``, ``b_lora = 0``. The
        adapter starts as the identity. ``init_weights=False`` then draws ``A``, ``P``, ``δb`` and ``b_lora`` at random
        (a non-identity adapter, for tests)."""
        if adapter_name in self.pace_B:
            nn.init.xavier_uniform_(self.pace_B[adapter_name])
        if adapter_name in self.pace_q:
            nn.init.xavier_uniform_(self.pace_q[adapter_name].view(-1, 1))  # q stored as a vector of size r
        if not init_weights:
            std = 0.5 / math.sqrt(self.r[adapter_name])
            for table, table_std in ((self.pace_A, std), (self.pace_P, std), (self.pace_bias_scale, 0.1),
                                     (self.pace_lora_bias, 0.1)):
                if adapter_name in table:
                    nn.init.normal_(table[adapter_name], std=table_std)

    # ------------------------------------------------------------------ the parametrization
    def _adapter_dtype(self, adapter: str) -> torch.dtype:
        """The dtype of an adapter's parameters."""
        return next(table[adapter] for table in (getattr(self, n) for n in self.adapter_layer_names)
                    if adapter in table).dtype

    def _deltas(self, adapter: str, w0: torch.Tensor, b0: Optional[torch.Tensor]
                ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(ΔW, Δb) of one adapter from the original weight and bias (in the adapter's dtype)."""
        variant = self.variant[adapter]
        delta_w = delta_b = None
        if variant in (MUL, ADD):
            A, B = self.pace_A[adapter], self.pace_B[adapter]
            delta_w = w0.to(A.dtype) * (A @ B) if variant == MUL else A @ B
        if variant == ADD:
            delta_b = self.pace_lora_bias[adapter]  # LoRA-add's own bias: b' = b0 + b_lora
        if variant in (MUL, VPT):
            P, q = self.pace_P[adapter], self.pace_q[adapter]
            delta_b = w0.to(P.dtype) @ (P @ q)  # VPT-add: W0 (P q)
            if variant == MUL and b0 is not None:
                delta_b = delta_b + b0.to(P.dtype) * self.pace_bias_scale[adapter]  # b0 ⊙ δb
        return delta_w, delta_b

    def compose(self, weight, bias, adapter_names):
        if adapter_names:
            # One dtype for weight and bias: the adapters' (float32 on a half-precision base with PEFT's default
            # autocast_adapter_dtype=True), also when a variant updates only one of the two (vpt_add: only Δb).
            dtype = self._adapter_dtype(adapter_names[0])
            weight = weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        for a in adapter_names:
            delta_w, delta_b = self._deltas(a, self.original_weight(), self.original_bias())
            if delta_w is not None:
                weight = weight.to(delta_w.dtype) + delta_w
            if delta_b is not None:
                bias = delta_b if bias is None else bias.to(delta_b.dtype) + delta_b
        return weight, (None if bias is None else bias.to(weight.dtype))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW of one adapter (zeros for ``vpt_add``), in the weight's dtype."""
        w0 = self.original_weight()
        delta_w, _ = self._deltas(adapter_name, w0, self.original_bias())
        return torch.zeros_like(w0) if delta_w is None else delta_w.to(w0.dtype)

    @torch.no_grad()
    def scale_delta_weight_rows_(self, adapter_name: str, factors: torch.Tensor) -> None:
        """Multiply row ``i`` of ΔW by ``factors[i]`` (through ``A``); a no-op for ``vpt_add``."""
        if adapter_name in self.pace_A:
            A = self.pace_A[adapter_name]
            A.mul_(factors.to(A.dtype).reshape(-1, 1))


class Linear(nn.Module, PACELayer):
    """An ``nn.Linear`` with PACE adapters. ``sigma`` is this layer's noise scale: :class:`PACEModel` passes the
    depth-scheduled value; a layer built on its own has no noise unless ``sigma`` is given (``config.sigma`` is
    not read here, it is the schedule's input)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: PACEConfig, sigma: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__()
        PACELayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, sigma=sigma)
        self._follow_training_flag()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self._base_forward_or_none(x, *args, **kwargs)
        if out is not None:
            return out
        names = [a for a in self.active_adapters if a in self.variant]
        if not (self.training and self.noise_enabled and any(self.sigma[a] > 0 for a in names)):
            weight, bias = self.composed_weight_and_bias(names)
            return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        w0, b0 = self.original_weight(), self.original_bias()
        for a in names:
            delta_w, delta_b = self._deltas(a, w0, b0)
            dtype = (delta_w if delta_w is not None else delta_b).dtype
            xa = x.to(dtype)
            if delta_w is not None:
                branch = F.linear(xa, delta_w, delta_b)
            else:
                branch = delta_b.expand(*xa.shape[:-1], self.out_features)
            if self.sigma[a] > 0:
                branch = branch * multiplicative_noise(branch, self.sigma[a], self.noise_shape[a])
            result = result + branch.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "pace." + super().__repr__()
