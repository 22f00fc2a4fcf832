"""RLRR layers: residual low-rank rescaling of a frozen ``nn.Linear`` and optional SSF scale/shift."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..tuners_utils import ComposedWeightLayer, check_rank
from .config import RLRRConfig


class RLRRLayer(ComposedWeightLayer):
    """``W' = W0 + Σ_a W0 ⊙ (L_a R_a)``, ``b' = b0 + Σ_a shift_a`` over the active adapters ``a``."""

    adapter_layer_names = ("rlrr_L", "rlrr_R", "rlrr_shift")
    other_param_names = ("r",)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self._init_linear(base_layer, "RLRR")
        self.rlrr_L = nn.ParameterDict({})
        self.rlrr_R = nn.ParameterDict({})
        self.rlrr_shift = nn.ParameterDict({})

    def update_layer(self, adapter_name: str, config: RLRRConfig) -> None:
        """Create (or re-create) the parameters of ``adapter_name``; reads ``r``, ``init_mode`` and
        ``inference_mode`` from ``config``."""
        r = config.r
        check_rank(r, "RLRR")
        self.r[adapter_name] = r
        self.rlrr_L[adapter_name] = nn.Parameter(torch.empty(self.out_features, r))
        self.rlrr_R[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))
        self.rlrr_shift[adapter_name] = nn.Parameter(torch.zeros(self.out_features))
        self.reset_rlrr_parameters(adapter_name, config.init_mode)
        self._adapter_created(adapter_name, config.inference_mode)

    @torch.no_grad()
    def reset_rlrr_parameters(self, adapter_name: str, init_mode: str) -> None:
        """``kaiming`` (official): ``L`` and ``R`` both ``kaiming_uniform_(a=0)`` (gain √2, bound ``√(6 / fan_in)``:
        fan_in is ``r`` for ``L``, ``in_features`` for ``R``), ``shift = 0``. ``identity``: ``L = 0``, ``R``
        ``kaiming_uniform_(a=√5)`` (nn.Linear's init, bound ``1 / √in_features``), ``shift = 0``. ``random``: ``R`` as
        for identity, ``L`` and ``shift`` normal (a non-identity adapter for tests)."""
        L, R, shift = self.rlrr_L[adapter_name], self.rlrr_R[adapter_name], self.rlrr_shift[adapter_name]
        official = init_mode == "kaiming"
        nn.init.kaiming_uniform_(R, a=0.0 if official else math.sqrt(5))
        shift.zero_()
        if init_mode == "identity":
            L.zero_()
        elif official:
            nn.init.kaiming_uniform_(L, a=0.0)
        elif init_mode == "random":
            nn.init.normal_(L, std=0.5)
            nn.init.normal_(shift, std=0.02)
        else:
            raise ValueError(f"unknown RLRR init {init_mode!r}")

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``W0 ⊙ (L R)`` for one adapter, in the weight's dtype."""
        w0 = self.original_weight()
        scale = self.rlrr_L[adapter_name] @ self.rlrr_R[adapter_name]
        return (w0.to(scale.dtype) * scale).to(w0.dtype)

    @torch.no_grad()
    def scale_delta_weight_rows_(self, adapter_name: str, factors: torch.Tensor) -> None:
        """Multiply row ``i`` of ``W0 ⊙ (L R)`` by ``factors[i]`` (through ``L``); used by distance constraints."""
        L = self.rlrr_L[adapter_name]
        L.mul_(factors.to(L.dtype).reshape(-1, 1))

    def compose(self, weight, bias, adapter_names):
        if not adapter_names:
            return weight, bias
        dtype = self.rlrr_L[adapter_names[0]].dtype
        w0 = weight.to(dtype)
        scale = self.rlrr_L[adapter_names[0]] @ self.rlrr_R[adapter_names[0]]
        shift = self.rlrr_shift[adapter_names[0]]
        for a in adapter_names[1:]:
            scale = scale + self.rlrr_L[a] @ self.rlrr_R[a]
            shift = shift + self.rlrr_shift[a]
        new_weight = torch.addcmul(w0, w0, scale)  # W0 + W0 ⊙ (L R), one fused op
        new_bias = shift if bias is None else bias.to(dtype) + shift
        return new_weight, new_bias


class Linear(nn.Module, RLRRLayer):
    """An ``nn.Linear`` with RLRR adapters."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: RLRRConfig, **kwargs: Any) -> None:
        super().__init__()
        RLRRLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)
        self._follow_training_flag()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self._base_forward_or_none(x, *args, **kwargs)
        if out is not None:
            return out
        # One matmul with the composed weight: cheaper than base + adapter branches.
        weight, bias = self.composed_weight_and_bias()
        result = F.linear(x.to(weight.dtype), weight, bias)
        return result.to(x.dtype)

    def __repr__(self) -> str:
        return "rlrr." + super().__repr__()


class ScaleShift(nn.Module, ComposedWeightLayer):
    """SSF: ``y = base(x) * γ + β`` per output channel (last dim for LayerNorm, dim 1 for Conv2d)."""

    adapter_layer_names = ("rlrr_ssf_scale", "rlrr_ssf_shift")
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: RLRRConfig, **kwargs: Any) -> None:
        super().__init__()
        self._init_composed(base_layer)
        base = self.get_base_layer()
        if isinstance(base, nn.LayerNorm):
            if not base.elementwise_affine:
                raise TypeError("SSF needs a LayerNorm with elementwise_affine=True to merge into.")
            self.channels, self.channel_dim = base.normalized_shape[-1], -1
        elif isinstance(base, nn.Conv2d):
            self.channels, self.channel_dim = base.out_channels, 1
        else:
            raise TypeError(f"SSF applies to nn.LayerNorm and nn.Conv2d modules, got {type(base).__name__}.")
        self.rlrr_ssf_scale = nn.ParameterDict({})
        self.rlrr_ssf_shift = nn.ParameterDict({})
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)
        self._follow_training_flag()

    def update_layer(self, adapter_name: str, config: RLRRConfig) -> None:
        """Create the scale/shift vectors of ``adapter_name``; reads ``init_mode`` and ``inference_mode`` from
        ``config``."""
        init_mode = config.init_mode
        self.rlrr_ssf_scale[adapter_name] = nn.Parameter(torch.ones(self.channels))
        self.rlrr_ssf_shift[adapter_name] = nn.Parameter(torch.zeros(self.channels))
        if init_mode in ("kaiming", "random"):  # official SSF init: γ ~ N(1, .02), β ~ N(0, .02)
            with torch.no_grad():
                std = 0.02 if init_mode == "kaiming" else 0.2
                nn.init.normal_(self.rlrr_ssf_scale[adapter_name], mean=1.0, std=std)
                nn.init.normal_(self.rlrr_ssf_shift[adapter_name], mean=0.0, std=std)
        self._adapter_created(adapter_name, config.inference_mode)

    def _channel_view(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        if self.channel_dim == -1:
            return v
        shape = [1] * ndim
        shape[1] = -1
        return v.reshape(shape)

    def compose(self, weight, bias, adapter_names):
        for a in adapter_names:
            scale, shift = self.rlrr_ssf_scale[a], self.rlrr_ssf_shift[a]
            # output channels are the first dim of both a LayerNorm weight (C,) and a conv weight (C, in, kh, kw)
            weight = weight.to(scale.dtype) * scale.reshape([-1] + [1] * (weight.ndim - 1))
            bias = shift if bias is None else bias.to(scale.dtype) * scale + shift
        return weight, bias

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self._base_forward_or_none(x, *args, **kwargs)
        if out is not None:
            return out
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        for a in self.active_adapters:
            if a not in self.rlrr_ssf_scale:
                continue
            scale, shift = self.rlrr_ssf_scale[a], self.rlrr_ssf_shift[a]
            result = result.to(scale.dtype) * self._channel_view(scale, result.ndim) + self._channel_view(
                shift, result.ndim
            )
        return result.to(dtype)

    def __repr__(self) -> str:
        return "rlrr_ssf." + super().__repr__()
