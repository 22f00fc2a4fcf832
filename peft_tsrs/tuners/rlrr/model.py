"""The RLRR tuner: injects :class:`~peft_tsrs.tuners.rlrr.layer.Linear` (and SSF) layers into a model."""

from __future__ import annotations

from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from ..defaults import SSF_TARGETS, default_targets
from ..tuners_utils import ComposedWeightTuner, matches_module_name
from .config import RLRRConfig
from .layer import Linear, RLRRLayer, ScaleShift


class RLRRModel(ComposedWeightTuner):
    """Residual low-rank rescaling (Dong et al., CVPR 2024) as a PEFT tuner.

    Example::

        >>> import peft_tsrs
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_tsrs.RLRRConfig(modules_to_save=["classifier"]))
    """

    prefix: str = "rlrr_"
    method_name = "RLRR"
    tuner_layer_cls = (RLRRLayer, ScaleShift)

    def _prepare_adapter_config(self, peft_config: RLRRConfig, model_config: dict) -> RLRRConfig:
        """The shared ``target_modules`` defaults, then (with ``ssf=True``) the SSF modules of the model type."""
        peft_config = super()._prepare_adapter_config(peft_config, model_config)
        if peft_config.ssf and peft_config.ssf_modules is None:
            peft_config.ssf_modules = default_targets(
                SSF_TARGETS, model_config.get("model_type"), "ssf_modules", self.method_name
            )
        return peft_config

    @staticmethod
    def _check_target_module_exists(peft_config: RLRRConfig, key: str):
        result = check_target_module_exists(peft_config, key)
        if result or not peft_config.ssf:
            return result
        if matches_module_name(peft_config.exclude_modules, key):
            return result
        return matches_module_name(peft_config.ssf_modules, key)

    def _create_and_replace(self, config: RLRRConfig, adapter_name, target, target_name, parent, current_key,
                            **kwargs) -> None:
        is_ssf = config.ssf and matches_module_name(config.ssf_modules, current_key) and not isinstance(
            target, (nn.Linear, RLRRLayer)
        )
        if isinstance(target, (RLRRLayer, ScaleShift)):
            target.update_layer(adapter_name, config)
            return
        if is_ssf:
            new_module = ScaleShift(target, adapter_name, config)
        elif isinstance(target, nn.Linear):
            new_module = Linear(target, adapter_name, config)
        else:
            raise ValueError(
                f"RLRR: target module {current_key!r} is a {type(target).__name__}; RLRR adapts nn.Linear layers "
                f"(LayerNorm/Conv2d only through `ssf=True, ssf_modules=[...]`). Remove it from `target_modules`."
            )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
