"""The PACE tuner: injects :class:`~peft_tsrs.tuners.pace.layer.Linear` layers with a depth-dependent noise scale
and noises the classification head's logits in training."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator, Optional

from torch import nn

from ..tuners_utils import ComposedWeightTuner, block_index, head_in_training, head_modules, schedule_blocks
from .config import PACEConfig, depth_sigma, head_sigma
from .layer import Linear, PACELayer, multiplicative_noise


class PACEModel(ComposedWeightTuner):
    """PACE (Ni et al., NeurIPS 2024) as a PEFT tuner.

    Example::

        >>> import peft_tsrs
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_tsrs.PACEConfig(r=10, sigma=1.0, modules_to_save=["classifier"]))
    """

    prefix: str = "pace_"
    method_name = "PACE"
    tuner_layer_cls = PACELayer

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self._head_hooks: dict[str, tuple[nn.Module, Any]] = {}
        self._head_warned = False
        self._adapters_on = True
        self._noise_on = True
        self._head_pre_hook = None
        self._n_blocks: dict[str, int] = {}
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # ------------------------------------------------------------------ injection
    def _num_blocks(self, adapter_name: str) -> int:
        """B of the depth schedule: the model config's ``num_hidden_layers``, else 1 + the largest block index among
        the modules the adapter targets (computed once per adapter)."""
        if adapter_name not in self._n_blocks:
            config = self.peft_config[adapter_name]
            targets = (key for key, _ in self.model.named_modules() if self._check_target_module_exists(config, key))
            self._n_blocks[adapter_name] = schedule_blocks(self.model, targets)
        return self._n_blocks[adapter_name]

    def _create_and_replace(self, config: PACEConfig, adapter_name, target, target_name, parent, current_key,
                            **kwargs) -> None:
        sigma = depth_sigma(config.sigma, block_index(current_key), self._num_blocks(adapter_name),
                            config.noise_schedule, config.noise_first_block)
        if isinstance(target, PACELayer):
            target.update_layer(adapter_name, config, sigma=sigma)
            return
        if not isinstance(target, nn.Linear):
            raise ValueError(
                f"PACE: target module {current_key!r} is a {type(target).__name__}; PACE adapts nn.Linear layers. "
                f"Remove it from `target_modules`."
            )
        new_module = Linear(target, adapter_name, config, sigma=sigma)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # ------------------------------------------------------------------ noise control
    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._adapters_on = enabled

    def _pace_layers(self) -> Iterator[tuple[str, PACELayer]]:
        return ((n, m) for n, m in self.model.named_modules() if isinstance(m, PACELayer))

    @contextlib.contextmanager
    def noise_disabled(self) -> Iterator["PACEModel"]:
        """Switch the multiplicative noise off (also the head's) inside the block, e.g. for a clean training pass."""
        layers = [m for _, m in self._pace_layers()]
        previous = [m.noise_enabled for m in layers], self._noise_on
        for m in layers:
            m.noise_enabled = False
        self._noise_on = False
        try:
            yield self
        finally:
            for m, state in zip(layers, previous[0]):
                m.noise_enabled = state
            self._noise_on = previous[1]

    def sigmas(self, adapter_name: Optional[str] = None) -> dict[str, float]:
        """σ of every PACE layer (and ``"<head>"`` entries for the head) for one adapter (default: active)."""
        adapter = adapter_name or self.active_adapters[0]
        out = {name: m.sigma[adapter] for name, m in self._pace_layers() if adapter in m.sigma}
        config = self.peft_config[adapter]
        if config.noise_head:
            found = head_modules(self.model, config.heads)  # the default names list heads a model may not have
            for head in config.heads:
                if head in found or any(name.endswith("." + head) for name in found):
                    out[head] = head_sigma(config.sigma, self._num_blocks(adapter), config.noise_schedule)
        return out

    # ------------------------------------------------------------------ head noise
    def _layer_state(self) -> tuple[Optional[str], bool]:
        """(active adapter, adapters and noise on) as the PACE layers hold them, together with this tuner's flags.

        Read from the layers: transformers' adapter API (``model.add_adapter`` / ``set_adapter`` /
        ``disable_adapters``, no ``PeftModel``) switches the layers only and keeps no tuner (the tuner of each
        ``add_adapter`` call lives on through its hook), so the tuner's own ``active_adapters`` can be stale there.
        Through ``PeftModel`` both always agree."""
        layer = next((m for _, m in self._pace_layers()), None)
        if layer is None:
            return None, False
        active = [a for a in layer.active_adapters if a in self.peft_config]
        on = self._adapters_on and self._noise_on and not layer.disable_adapters and layer.noise_enabled
        return (active[0] if active else None), on

    def _head_noise(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not head_in_training(module):
            return output
        adapter, on = self._layer_state()
        if not (on and adapter is not None):
            return output
        config = self.peft_config[adapter]
        sigma = head_sigma(config.sigma, self._num_blocks(adapter), config.noise_schedule)
        if not config.noise_head or sigma <= 0 or not hasattr(output, "dtype"):
            return output
        return output * multiplicative_noise(output, sigma, config.noise_shape)

    def _ensure_head_hooks(self) -> None:
        """Hook the module currently at each head path (PEFT wraps the head in ModulesToSaveWrapper after
        injection, so this runs at forward time and re-hooks when the module at a path changed)."""
        adapter, _ = self._layer_state()
        if adapter is None:
            return
        config = self.peft_config[adapter]
        if not config.noise_head:
            return
        found = head_modules(self.model, config.heads)
        if not found:
            if config.explicit_head:
                raise ValueError(f"PACE: head module(s) {config.heads} not found in the model; fix `head_modules` "
                                 f"or set `noise_head=False`.")
            if not self._head_warned:
                warnings.warn(f"PACE: no head module named {config.heads}; the head's logits are not noised.")
                self._head_warned = True
            return
        for name in set(self._head_hooks) - set(found):  # a head of another adapter
            self._head_hooks.pop(name)[1].remove()
        for name, module in found.items():
            hooked = self._head_hooks.get(name)
            if hooked is not None and hooked[0] is module:
                continue
            if hooked is not None:
                hooked[1].remove()
            self._head_hooks[name] = (module, module.register_forward_hook(self._head_noise))

    def _before_forward(self, module: nn.Module, args: tuple) -> None:
        self._ensure_head_hooks()

    def _post_injection_hook(self, model: nn.Module, config: PACEConfig, adapter_name: str) -> None:
        # PeftModel calls the wrapped model directly (not this module), so the head hooks are (re)installed from a
        # pre-hook on the wrapped model, once per forward. A bound method (not a closure) so that deepcopy and
        # pickling of the model keep working and a copy's hook refers to the copy.
        # One such hook per model: transformers' ``model.add_adapter`` creates a new tuner for every adapter, and the
        # hook of the first one serves all of them (it reads the active adapter from the layers), so the head's
        # logits are noised once.
        if getattr(self, "_head_pre_hook", None) is None and not any(
            isinstance(getattr(hook, "__self__", None), PACEModel) for hook in model._forward_pre_hooks.values()
        ):
            self._head_pre_hook = model.register_forward_pre_hook(self._before_forward)

    def _remove_head_hooks(self) -> None:
        for _, handle in self._head_hooks.values():
            handle.remove()
        self._head_hooks.clear()
        if self._head_pre_hook is not None:
            self._head_pre_hook.remove()
            self._head_pre_hook = None

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        """``merge_and_unload`` / ``unload``: the plain model returned carries no PACE hook (no head noise)."""
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        self._remove_head_hooks()
        return model

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._n_blocks.pop(adapter_name, None)
