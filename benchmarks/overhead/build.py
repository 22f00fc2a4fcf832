"""Building every method on one model exactly as ``peft_tsrs.app.run.run_recipe`` does (recipe files, ``build_model``,
``apply_adapter``, ``RegularizedTrainer``), and one optimizer step of it as the HF training loop takes it (:class:`Entry`)."""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..methods import Method, recipe_files
from .plan import ModelSetup


def lora_params(shape: tuple[int, int], r: int) -> int:
    """Trainable parameters of a LoRA adapter of rank ``r`` on an ``(in, out)`` linear (no bias)."""
    return r * (shape[0] + shape[1])


def rlrr_params(shape: tuple[int, int], r: int = 1) -> int:
    """RLRR on an ``(in, out)`` linear: ``L (out×r)``, ``R (r×in)``, ``shift (out)``."""
    return r * (shape[0] + shape[1]) + shape[1]


def equal_param_ranks(roles: dict[str, list[tuple[int, int]]], target: int, max_rank: int = 6
                      ) -> tuple[dict[str, int], int]:
    """Per-role LoRA ranks whose total parameter count is closest to ``target``.

    ``roles`` maps a role (module name with the block index wildcarded) to the ``(in, out)`` shapes of its modules.
    Ties go to the most uniform assignment (smallest rank spread), then the smallest total rank.
    """
    names = sorted(roles)
    per_rank = [sum(shape[0] + shape[1] for shape in roles[n]) for n in names]
    best: Optional[tuple[tuple[int, int, int], tuple[int, ...]]] = None
    for ranks in itertools.product(range(1, max_rank + 1), repeat=len(names)):
        count = sum(r * c for r, c in zip(ranks, per_rank))
        key = (abs(count - target), max(ranks) - min(ranks), sum(ranks))
        if best is None or key < best[0]:
            best = (key, ranks)
    assert best is not None
    ranks = dict(zip(names, best[1]))
    return ranks, sum(ranks[n] * c for n, c in zip(names, per_rank))


def role_of(module_name: str) -> str:
    """``bert.encoder.layer.3.attention.self.query`` -> ``bert.encoder.layer.*.attention.self.query``."""
    return re.sub(r"\.\d+\.", ".*.", module_name)


@dataclass
class Entry:
    """One method on one model: its trainer, optimizer and timings."""

    method: Method
    recipe: Any
    trainer: Any
    params: list
    trainable: int
    total: int
    extra: dict[str, Any] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)  # minor page faults of the process during each timed step

    @property
    def model(self):
        return self.trainer.model

    def step(self, batch: dict) -> float:
        """One optimizer step as the HF training loop does it; returns its wall time in seconds."""
        import torch

        t = self.trainer
        start = time.perf_counter()
        t.training_step(t.model, dict(batch))
        if t.args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, t.args.max_grad_norm)
        t.control = t.callback_handler.on_pre_optimizer_step(t.args, t.state, t.control)
        t.optimizer.step()
        t.control = t.callback_handler.on_optimizer_step(t.args, t.state, t.control)
        t.state.global_step += 1
        t.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def quiet_libraries():
    """transformers and datasets without progress bars and below-error logs."""
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:
        pass
    import datasets

    datasets.disable_progress_bars()


def method_recipe(setup: ModelSetup, method: Method, workdir: str, extra: Sequence[str] = ()):
    """The recipe of ``method`` on ``setup``'s task and batch, run folder in ``workdir``, diagnostics off."""
    from peft_tsrs.app.recipes import load_recipe

    files = recipe_files(setup.task_file, method)
    overrides = [*setup.overrides, *method.overrides, f"training.batch_size={setup.batch_size}",
                 f"output_dir={workdir}", f"name={setup.key}-{method.key}", "diagnostics=false", *extra]
    return load_recipe(files, overrides)


def _target_roles(model, model_type: str) -> dict[str, list[tuple[int, int]]]:
    from torch import nn

    from peft_tsrs.tuners.defaults import LINEAR_TARGETS
    from peft_tsrs.tuners.tuners_utils import matches_module_name

    roles: dict[str, list[tuple[int, int]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and matches_module_name(LINEAR_TARGETS[model_type], name):
            roles.setdefault(role_of(name), []).append((module.in_features, module.out_features))
    return roles


def build_entry(setup: ModelSetup, method: Method, data, workdir: str) -> Entry:
    import torch
    from peft_tsrs.app.adapters import apply_adapter
    from peft_tsrs.app.run import training_arguments
    from peft_tsrs.app.tasks import build_model
    from peft_tsrs.trainer import RegularizedTrainer

    recipe = method_recipe(setup, method, workdir)
    torch.manual_seed(0)
    model = build_model(recipe, data)
    model_type = model.config.model_type
    extra: dict[str, Any] = {}
    if method.equal_params_lora:
        roles = _target_roles(model, model_type)
        rlrr_count = sum(rlrr_params(shape) for shapes in roles.values() for shape in shapes)
        ranks, lora_count = equal_param_ranks(roles, rlrr_count)
        modules = [n for n, _ in model.named_modules() if role_of(n) in ranks]
        recipe.adapter.options["rank_pattern"] = {re.escape(n): ranks[role_of(n)] for n in modules}
        recipe.adapter.options["r"] = max(ranks.values())
        recipe.validate()
        extra.update(rank_by_role=ranks, adapter_params_lora=lora_count, adapter_params_rlrr=rlrr_count)
    model = apply_adapter(model, recipe)
    params = [p for p in model.parameters() if p.requires_grad]
    trainer = RegularizedTrainer(
        model=model, args=training_arguments(recipe, recipe.run_dir, progress=False),
        train_dataset=data.splits["train"], eval_dataset=data.splits["validation"], data_collator=data.collator,
        regularizers=recipe.regularizers,
    )
    trainer.create_optimizer()
    trainer.state.epoch = 1.0  # past reweight/label-correction start (both 0 in this benchmark)
    return Entry(method, recipe, trainer, params, sum(p.numel() for p in params),
                 sum(p.numel() for p in model.parameters()), extra)


def persistent_bytes(entry: Entry) -> int:
    """Bytes alive between steps: parameters, buffers, optimizer state and the regularizers' state tensors."""
    import torch

    tensors = list(entry.model.parameters()) + list(entry.model.buffers())
    for state in entry.trainer.optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    regs = entry.trainer.regularizers
    if "distance" in regs:
        tensors += [it.anchor for it in regs["distance"].constraint.items if it.anchor is not None]
    if "pace" in regs and regs["pace"].store is not None:
        tensors.append(regs["pace"].store.stored)
    if "self_labeling" in regs and regs["self_labeling"].corrector is not None:
        tensors += [regs["self_labeling"].corrector.labels, regs["self_labeling"].corrector.original]
    seen: dict[int, int] = {}
    for x in tensors:
        storage = x.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())
