"""What the regularizers cost: per-step training time and peak memory of every method relative to its
un-regularized base, and inference after ``merge_and_unload`` relative to the plain model — measured in ONE process.

For each model (MiniLM on a WordNet batch of 16; the Fashion-MNIST ViT on a batch of 64) every method is built
from the recipe files in ``configs/`` exactly as ``peft_tsrs.app.run.run_recipe`` builds it (``build_task``,
``build_model``, ``apply_adapter``, ``TSRSTrainer``), all on the same fixed batch. One
timed step is what the HF training loop does per batch::

    trainer.training_step(model, batch)        # TSRSTrainer.compute_loss (all regularizer terms) + backward
    clip_grad_norm_(params, max_grad_norm)     # as Trainer does (max_grad_norm 1.0)
    optimizer.step()                           # AdamW built by trainer.create_optimizer()
    callback_handler.on_optimizer_step(...)    # the distance projection (_ProjectAfterStep) where on
    optimizer.zero_grad(set_to_none=True)

Timing: warm-up rounds, then ``--steps`` rounds; each round runs one step of every method (round-robin, the
start rotated every round), garbage collection off inside a round. Per method the median step time; the ratio
to its base is the ratio of medians (and, as a check against load drift on a shared machine, the median of the
per-round ratios). Peak memory: one profiled step per method with ``torch.profiler`` (``profile_memory=True``):
the allocation/free events of CPU tensors in time order, cumulated — the peak of live tensor bytes allocated
during the step above what was alive before it (activations, gradients, temporaries); ``persistent`` adds the
bytes alive between steps (parameters, buffers, optimizer state, distance anchors, PACE-fast store, labels).

    python -m benchmarks.overhead                      # both models, writes benchmarks/results/overhead.{json,md}
    python -m benchmarks.overhead --models vit --steps 5 --warmup 1 --out /tmp/oh   # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

from . import RESULTS
from .methods import OVERHEAD_BY_KEY, OVERHEAD_METHODS, Method, recipe_files
from .notes import note
from .stats import iqr, median, paired_ratio, ratio_of_medians

MB = 1024 * 1024


# ---------------------------------------------------------------------------------------------- what is measured
@dataclass(frozen=True)
class Check:
    key: str
    method: str
    base: str
    target: Optional[float]  # upper bound on the time ratio method / base (None: reported only)
    what: str


CHECKS: tuple[Check, ...] = (
    Check("tsrs-lora", "lora+tsrs", "lora", 1.6, "TSRS step ≤ 1.6× its adapter (LoRA)"),
    Check("tsrs-rlrr", "rlrr+tsrs", "rlrr", 1.6, "TSRS step ≤ 1.6× its adapter (RLRR)"),
    Check("pace-fast", "pace-fast", "pace", 1.15, "PACE-fast ≤ 1.15× PACE without consistency"),
    Check("pace-full", "pace-full", "pace", 2.1, "PACE full ≤ 2.1× PACE without consistency"),
    Check("pace-lazy", "pace-lazy", "pace", None, "PACE lazy (every 2nd step on half a batch), reported"),
    Check("distance", "full+distance", "full", 1.05, "distance projection ≤ 1.05× full fine-tuning"),
    Check("self-labeling", "full+selflabel", "full", None,
          "distance + label correction + reweighting vs full fine-tuning, reported"),
    Check("rlrr-vs-lora", "rlrr", "lora-eqp", 1.0, "RLRR step ≤ LoRA step at equal trainable parameters"),
    Check("rlrr-vs-full", "rlrr", "full", None,
          "RLRR vs full fine-tuning (same dense weight-gradient GEMMs), reported"),
)
INFERENCE_TARGET = 1.05  # merged / plain: "should be 1.0"; 5% allowed for timing noise on a shared CPU
# Ratios this close to their target flip between full runs on a shared 2-core machine (run-to-run variation of the
# medians, not sampling noise within a run): marked "borderline" in the report.
BORDERLINE = 0.03


@dataclass(frozen=True)
class ModelSetup:
    key: str
    label: str
    task_file: str  # relative to configs/tasks
    batch_size: int
    overrides: tuple[str, ...] = ()


MODELS: dict[str, ModelSetup] = {
    "minilm": ModelSetup("minilm", "MiniLM-L6 (22.7M), WordNet glosses", "wordnet_minilm.yaml", 16),
    # 16 shots x 5 classes = 80 training images, so a batch of 64 can be drawn
    "vit": ModelSetup("vit", "Fashion-MNIST ViT (0.54M)", "fmnist_vit.yaml", 64, ("task.shots_per_class=16",)),
}


# ---------------------------------------------------------------------------------------------- pure helpers
def verdict(ratio: float, target: Optional[float]) -> str:
    if target is None:
        return "—"
    return "pass" if ratio <= target else "MISS"


def shown_verdict(ratio: float, target: Optional[float]) -> str:
    """``verdict`` with ``, borderline`` when the ratio is within :data:`BORDERLINE` of the target."""
    v = verdict(ratio, target)
    if target is not None and abs(ratio - target) <= BORDERLINE:
        v += ", borderline"
    return v


def peak_live_bytes(events: Iterable[tuple[int, int]]) -> int:
    """Peak of the running sum of ``(time, nbytes)`` allocation (+) / free (−) events, in time order, from 0."""
    current = peak = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):
        current += nbytes
        peak = max(peak, current)
    return peak


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


# ---------------------------------------------------------------------------------------------- building
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


def _quiet():
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:
        pass
    import datasets

    datasets.disable_progress_bars()


def _recipe(setup: ModelSetup, method: Method, workdir: str, extra: Sequence[str] = ()):
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
    from peft_tsrs.trainer import TSRSTrainer

    recipe = _recipe(setup, method, workdir)
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
    trainer = TSRSTrainer(
        model=model, args=training_arguments(recipe, recipe.run_dir, progress=False),
        train_dataset=data.splits["train"], eval_dataset=data.splits["validation"], data_collator=data.collator,
        tsrs=recipe.regularizers,
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
    t = entry.trainer
    if t.distance is not None:
        tensors += [it.anchor for it in t.distance.items if it.anchor is not None]
    if t.fast_store is not None:
        tensors.append(t.fast_store.stored)
    if t.label_corrector is not None:
        tensors += [t.label_corrector.labels, t.label_corrector.original]
    seen: dict[int, int] = {}
    for x in tensors:
        storage = x.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def minor_faults() -> int:
    """Minor page faults of this process so far (fresh memory mapped and zeroed by the kernel)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def profiled_peak(fn: Callable[[], Any]) -> int:
    """Peak live CPU tensor bytes allocated while ``fn`` runs (torch.profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and "CPU" in str(e.device_type())]
    return peak_live_bytes(events)


def op_profile(fn: Callable[[], Any], steps: int) -> dict[str, dict[str, float]]:
    """Self CPU time (ms per step) and calls per step of every op over ``steps`` calls of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    out = {}
    for ev in prof.key_averages():
        out[ev.key] = {"ms": ev.self_cpu_time_total / 1000.0 / steps, "calls": ev.count / steps}
    return out


def op_diff(method: dict[str, dict[str, float]], base: dict[str, dict[str, float]], top: int = 8
            ) -> list[dict[str, Any]]:
    """The ops that take the most extra self CPU time per step in ``method`` compared with ``base``."""
    rows = []
    for key in set(method) | set(base):
        m = method.get(key, {"ms": 0.0, "calls": 0.0})
        b = base.get(key, {"ms": 0.0, "calls": 0.0})
        rows.append({"op": key, "extra_ms": m["ms"] - b["ms"], "method_ms": m["ms"], "base_ms": b["ms"],
                     "method_calls": m["calls"], "base_calls": b["calls"]})
    rows.sort(key=lambda r: -r["extra_ms"])
    return rows[:top]


def _first_batch(entry: Entry) -> dict:
    loader = entry.trainer.get_train_dataloader()
    return next(iter(loader))


def _eval_batch(data, n: int) -> dict:
    val = data.splits["validation"]
    batch = data.collator([val[i] for i in range(min(n, len(val)))])
    return {k: v for k, v in batch.items() if k not in ("labels", "label", "index")}


# ---------------------------------------------------------------------------------------------- the benchmark
def run_model(setup: ModelSetup, methods: Sequence[Method], steps: int, warmup: int, inference_reps: int,
              profile_steps: int, log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from peft_tsrs.app.tasks import build_model, build_task

    workdir = tempfile.mkdtemp(prefix=f"overhead-{setup.key}-")
    first = _recipe(setup, methods[0], workdir)
    data = build_task(first)
    entries: dict[str, Entry] = {}
    for method in methods:
        entries[method.key] = build_entry(setup, method, data, workdir)
        log(f"  built {method.key}: {entries[method.key].trainable:,} trainable parameters")
    batch = _first_batch(next(iter(entries.values())))
    shapes = {k: list(v.shape) for k, v in batch.items() if torch.is_tensor(v)}
    log(f"  batch: {shapes}")

    # ---- time: round-robin, start rotated each round, gc off inside a round
    keys = list(entries)
    for rnd in range(warmup + steps):
        shift = rnd % len(keys)
        order = keys[shift:] + keys[:shift]
        gc.collect()
        gc.disable()
        try:
            for k in order:
                faults = minor_faults()
                elapsed = entries[k].step(batch)
                faults = minor_faults() - faults
                if rnd >= warmup:
                    entries[k].times.append(elapsed)
                    entries[k].faults.append(faults)
        finally:
            gc.enable()
        if rnd == warmup - 1 or (rnd >= warmup and (rnd - warmup + 1) % 5 == 0):
            log(f"  round {rnd + 1}/{warmup + steps}")

    # ---- memory: one profiled step per method (after warm-up, so optimizer state exists)
    memory = {}
    for k, e in entries.items():
        gc.collect()
        peak = max(profiled_peak(lambda: e.step(batch)) for _ in range(2))
        memory[k] = {"step_peak_bytes": peak, "persistent_bytes": persistent_bytes(e)}

    # ---- the distance projection alone (DistanceConstraint.project, as the callback calls it after a step)
    projection = None
    if "full+distance" in entries:
        projection = projection_timing(entries["full+distance"].trainer.distance, steps,
                                       median(entries["full"].times) if "full" in entries else None)
        frac = projection["fraction_of_full_step"]
        log(f"  projection alone: {projection['ms']:.1f} ms"
            + ("" if frac is None else f" ({100 * frac:.1f}% of a full fine-tuning step)"))

    # ---- op profiles of every check (explains the ratios; printed in the .md where a target is missed)
    profiles = {}
    for check in CHECKS:
        if check.method in entries and check.base in entries:
            mp = op_profile(lambda: entries[check.method].step(batch), profile_steps)
            bp = op_profile(lambda: entries[check.base].step(batch), profile_steps)
            profiles[check.key] = {
                "method_total_ms": sum(v["ms"] for v in mp.values()),
                "base_total_ms": sum(v["ms"] for v in bp.values()),
                "top_extra_ops": op_diff(mp, bp),
            }

    methods_out = {}
    for k, e in entries.items():
        base_key = e.method.counterpart
        base = entries.get(base_key) if base_key else None
        methods_out[k] = {
            "label": e.method.label, "method": e.recipe.method, "base": base_key,
            "recipes": list(e.method.files), "overrides": list(e.method.overrides),
            "trainable_parameters": e.trainable, "total_parameters": e.total,
            "step_times_s": [round(t, 6) for t in e.times],
            "median_step_s": median(e.times), "iqr_step_s": iqr(e.times),
            "page_faulted_mb_per_step": median(e.faults) * PAGE / MB,
            "time_ratio": ratio_of_medians(e.times, base.times) if base else None,
            "time_ratio_paired": paired_ratio(e.times, base.times) if base else None,
            **memory[k],
            "memory_ratio": (memory[k]["step_peak_bytes"] / memory[base_key]["step_peak_bytes"]) if base else None,
            "total_memory_ratio": ((memory[k]["step_peak_bytes"] + memory[k]["persistent_bytes"])
                                   / (memory[base_key]["step_peak_bytes"] + memory[base_key]["persistent_bytes"]))
            if base else None,
            **e.extra,
        }
    checks_out = []
    for check in CHECKS:
        if check.method not in entries or check.base not in entries:
            continue
        m, b = entries[check.method], entries[check.base]
        ratio = ratio_of_medians(m.times, b.times)
        checks_out.append({
            "key": check.key, "what": check.what, "method": check.method, "base": check.base,
            "target": check.target, "ratio": ratio, "ratio_paired": paired_ratio(m.times, b.times),
            "verdict": verdict(ratio, check.target),
            "memory_ratio": memory[check.method]["step_peak_bytes"] / memory[check.base]["step_peak_bytes"],
            "trainable_method": m.trainable, "trainable_base": b.trainable,
        })

    inference = run_inference(setup, entries, data, inference_reps, log, build_model)
    shutil.rmtree(workdir, ignore_errors=True)
    return {
        "label": setup.label, "batch_size": setup.batch_size, "batch_shapes": shapes,
        "recipe_overrides": list(setup.overrides), "task_file": setup.task_file,
        "inject_layer_tsrs": _inject_layer(entries), "methods": methods_out, "checks": checks_out,
        "profiles": profiles, "inference": inference, "projection": projection,
    }


def projection_timing(constraint, reps: int, full_step_s: Optional[float], warmup: int = 2) -> dict[str, Any]:
    """Median wall time of ``constraint.project()`` on the current (trained) weights, in ms and as a fraction of
    the median full fine-tuning step (``full_step_s``, seconds; ``None``: not reported)."""
    times = []
    for rnd in range(reps + warmup):
        start = time.perf_counter()
        constraint.project()
        if rnd >= warmup:
            times.append(time.perf_counter() - start)
    ms = 1000 * median(times)
    return {"weights": len(constraint.items),
            "elements": sum(it.param.numel() for it in constraint.items if it.param is not None),
            "ms": ms, "iqr_ms": 1000 * iqr(times),
            "full_step_ms": None if full_step_s is None else 1000 * full_step_s,
            "fraction_of_full_step": ms / (1000 * full_step_s) if full_step_s else None}


def _inject_layer(entries: dict[str, Entry]) -> Optional[dict[str, int]]:
    for e in entries.values():
        ns = e.trainer.noise_stability
        if ns is not None:
            return {"inject_layer": ns.inject_layer, "measure_from": ns.measure_from, "blocks": len(ns.blocks)}
    return None


def run_inference(setup: ModelSetup, entries: dict[str, Entry], data, reps: int, log, build_model
                  ) -> dict[str, Any]:
    """Eval forward of each adapter after ``merge_and_unload`` vs the plain pretrained model (same head size)."""
    import torch

    batch = _eval_batch(data, 64)
    torch.manual_seed(0)
    plain = build_model(entries[next(iter(entries))].recipe, data).eval()
    models: dict[str, Any] = {"plain": plain}
    checks: dict[str, Any] = {}
    for key in ("lora", "rlrr", "pace"):
        if key not in entries:
            continue
        peft_model = entries[key].model.eval()
        with torch.inference_mode():
            before = peft_model(**batch).logits
        merged = peft_model.merge_and_unload().eval()
        with torch.inference_mode():
            after = merged(**batch).logits
        models[f"{key} merged"] = merged
        checks[f"{key} merged"] = {
            "same_class_as_plain": type(merged) is type(plain),
            "parameters": sum(p.numel() for p in merged.parameters()),
            "plain_parameters": sum(p.numel() for p in plain.parameters()),
            "max_abs_logit_diff_vs_unmerged": float((before - after).abs().max()),
        }
    times: dict[str, list[float]] = {k: [] for k in models}
    keys = list(models)
    with torch.inference_mode():
        for rnd in range(reps + 2):
            order = keys[rnd % len(keys):] + keys[:rnd % len(keys)]
            for k in order:
                start = time.perf_counter()
                models[k](**batch)
                if rnd >= 2:
                    times[k].append(time.perf_counter() - start)
    out = {"batch": int(next(iter(batch.values())).shape[0]), "reps": reps, "plain_median_s": median(times["plain"]),
           "models": {}}
    for k in keys:
        if k == "plain":
            continue
        ratio = ratio_of_medians(times[k], times["plain"])
        out["models"][k] = {"median_s": median(times[k]), "ratio": ratio,
                            "ratio_paired": paired_ratio(times[k], times["plain"]),
                            "verdict": verdict(ratio, INFERENCE_TARGET), **checks[k]}
        log(f"  inference {k}: {ratio:.3f}x plain")
    return out


# ---------------------------------------------------------------------------------------------- report
def _fmt_ratio(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.2f}×"


def _load_line(meta: dict[str, Any]) -> str:
    start, end = meta.get("load_average_start"), meta.get("load_average_end")
    if not start:
        return ""
    text = f" Machine load average (1/5/15 min) at the start {'/'.join(f'{x:.1f}' for x in start)}"
    if end:
        text += f", at the end {'/'.join(f'{x:.1f}' for x in end)}"
    return text + f" (on {meta['machine'].split(', ')[-1]})."


def markdown(results: dict[str, Any], notes: Optional[dict[str, str]] = None) -> str:
    """The Markdown report of an overhead results dict."""
    meta = results["meta"]
    lines = [
        "# Cost of the regularizers (`python -m benchmarks.overhead`)",
        "",
        f"Measured {meta['date']} on {meta['machine']} ({meta['torch_threads']} torch "
        f"thread{'' if meta['torch_threads'] == 1 else 's'}; the load average below says what else ran), "
        f"torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}. "
        f"{meta['steps']} timed steps per method after {meta['warmup']} warm-up steps, interleaved round-robin "
        f"in one process; times are medians. Ratio = median / median of the un-regularized base; "
        f"\"paired\" = median over rounds of the per-round ratio (robust to load drift).{_load_line(meta)}",
        "",
        f"Peak memory: {meta['memory_method']}",
        "",
    ]
    for model_key, res in results["models"].items():
        lines += [f"## {res['label']} — batch {res['batch_size']} (inputs {res['batch_shapes']})", ""]
        if res.get("inject_layer_tsrs"):
            inj = res["inject_layer_tsrs"]
            lines += [f"TSRS injects noise before block {inj['inject_layer']} of {inj['blocks']} (blocks below run "
                      f"once, blocks from it on run on [clean; noisy]).", ""]
        lines += ["| method | base | trainable | step (ms) | IQR (ms) | time ratio | paired | step peak (MB) | "
                  "mem ratio | persistent (MB) | page-faulted (MB/step) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key, m in res["methods"].items():
            lines.append(
                f"| {m['label']} | {m['base'] or ''} | {m['trainable_parameters']:,} | "
                f"{1000 * m['median_step_s']:.1f} | {1000 * m['iqr_step_s']:.1f} | {_fmt_ratio(m['time_ratio'])} | "
                f"{_fmt_ratio(m['time_ratio_paired'])} | {m['step_peak_bytes'] / MB:.1f} | "
                f"{_fmt_ratio(m['memory_ratio'])} | {m['persistent_bytes'] / MB:.1f} | "
                f"{m.get('page_faulted_mb_per_step', float('nan')):.0f} |")
        eq = res["methods"].get("lora-eqp")
        if eq and "rank_by_role" in eq:
            ranks = ", ".join(f"{k.split('*.')[-1]}: {v}" for k, v in eq["rank_by_role"].items())
            rlrr = res["methods"].get("rlrr", {})
            lines += ["", f"Equal parameters: LoRA ranks per module ({ranks}) give {eq['adapter_params_lora']:,} "
                          f"adapter parameters vs RLRR r1's {eq['adapter_params_rlrr']:,}; trainable in all "
                          f"(with the head): LoRA {eq['trainable_parameters']:,}, RLRR "
                          f"{rlrr.get('trainable_parameters', 0):,}."]
        lines += ["", "| target | ratio | paired | target | result | mem ratio |", "|---|---:|---:|---:|---|---:|"]
        for c in res["checks"]:
            target = "" if c["target"] is None else f"≤ {c['target']:.2f}×"
            lines.append(f"| {c['what']} | {c['ratio']:.2f}× | {c['ratio_paired']:.2f}× | {target} | "
                         f"{shown_verdict(c['ratio'], c['target'])} | {c['memory_ratio']:.2f}× |")
        inf = res["inference"]
        lines += ["", f"Inference (eval forward, batch {inf['batch']}, {inf['reps']} interleaved reps): plain "
                      f"model {1000 * inf['plain_median_s']:.1f} ms.", "",
                  "| model | ms | ratio to plain | paired | result (≤ 1.05×) | same class / #params as plain | "
                  "max |Δlogit| vs unmerged |", "|---|---:|---:|---:|---|---|---:|"]
        for k, m in inf["models"].items():
            same = "yes" if m["same_class_as_plain"] and m["parameters"] == m["plain_parameters"] else "NO"
            lines.append(f"| {k} | {1000 * m['median_s']:.1f} | {m['ratio']:.2f}× | {m['ratio_paired']:.2f}× | "
                         f"{m['verdict']} | {same} | {m['max_abs_logit_diff_vs_unmerged']:.1e} |")
        shown = [c for c in res["checks"] if c["verdict"] == "MISS" or shown_verdict(c["ratio"], c["target"]) !=
                 c["verdict"]]
        for c in shown:
            prof = res["profiles"].get(c["key"])
            if not prof:
                continue
            kind = "the miss" if c["verdict"] == "MISS" else "the borderline pass"
            lines += ["", f"Profile of {kind} \"{c['what']}\" (torch.profiler, self CPU time per step; "
                          f"{prof['method_total_ms']:.0f} ms vs {prof['base_total_ms']:.0f} ms in all):", "",
                      "| op | extra ms/step | method ms | base ms | calls method / base |", "|---|---:|---:|---:|---|"]
            for r in prof["top_extra_ops"]:
                lines.append(f"| `{r['op']}` | {r['extra_ms']:.1f} | {r['method_ms']:.1f} | {r['base_ms']:.1f} | "
                             f"{r['method_calls']:.0f} / {r['base_calls']:.0f} |")
        lines.append("")
    if notes:
        lines += ["## Analysis", ""]
        for title, text in notes.items():
            lines += [f"**{title}.** {text}", ""]
    return "\n".join(lines).rstrip() + "\n"


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, float, Optional[float], str]]:
    """(model, check, ratio, target, verdict) for every check of every model."""
    return [(model, c["key"], c["ratio"], c["target"], c["verdict"])
            for model, res in results["models"].items() for c in res["checks"]]


def _loadavg() -> Optional[list[float]]:
    """1/5/15-minute load averages of the machine (other jobs included), where the OS reports them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _meta(args) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    return {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "torch_threads": torch.get_num_threads(), "steps": args.steps,
        "warmup": args.warmup, "inference_reps": args.inference_reps,
        "load_average_start": _loadavg(),
        "memory_method": "torch.profiler(profile_memory=True) over one training step (max of 2): the [memory] "
                         "allocation/free events of CPU tensors cumulated in time order; the peak of live bytes "
                         "allocated during the step above those alive before it (activations, gradients, temporaries,"
                         " first-step optimizer state excluded by warm-up). 'persistent' = parameters + buffers + "
                         "optimizer state + regularizer state (distance anchors, PACE-fast store, labels), alive "
                         "between steps. RSS (resource.getrusage) is not used: the allocator caches freed memory. "
                         "'page-faulted' = minor page faults of the process during a timed step (median) × page size: "
                         "memory the kernel had to map and zero for fresh allocations.",
        "command": " ".join(["python -m benchmarks.overhead", *sys.argv[1:]]),
    }


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=None, help="method keys (default: all)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method (>= 20 for the report)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--inference-reps", type=int, default=30)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a CPU shared with other jobs, 2 OpenMP threads "
                             "stall for seconds whenever a core is taken; 1 thread gives stable ratios)")
    parser.add_argument("--out", default=RESULTS, help="folder for overhead.json and overhead.md")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite overhead.md (and the analysis in overhead.json) from an existing overhead.json")
    args = parser.parse_args(argv)
    if args.report_only:
        with open(os.path.join(args.out, "overhead.json")) as fh:
            results = json.load(fh)
        return write_report(results, args.out)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet()
    methods = OVERHEAD_METHODS if not args.methods else tuple(OVERHEAD_BY_KEY[k] for k in args.methods)
    needed = ({m.counterpart for m in methods if m.counterpart}
              | {c.base for c in CHECKS if c.method in {m.key for m in methods}})
    methods = tuple(m for m in OVERHEAD_METHODS if m in methods or m.key in needed)

    def log(msg: str) -> None:
        print(msg, flush=True)

    results: dict[str, Any] = {"meta": _meta(args), "models": {}}
    for key in args.models:
        log(f"== {key}")
        start = time.perf_counter()
        results["models"][key] = run_model(MODELS[key], methods, args.steps, args.warmup, args.inference_reps,
                                           args.profile_steps, log)
        results["models"][key]["wall_s"] = round(time.perf_counter() - start, 1)
    results["meta"]["load_average_end"] = _loadavg()
    write_report(results, args.out)
    for row in summary_rows(results):
        target = "" if row[3] is None else f"(target ≤ {row[3]:.2f})"
        log(f"{row[0]:8s} {row[1]:15s} {row[2]:.2f}x {target} {row[4]}")
    return results


def _check(res: dict[str, Any], key: str) -> Optional[dict[str, Any]]:
    return next((c for c in res["checks"] if c["key"] == key), None)


def _op_ms(res: dict[str, Any], check: str, *ops: str) -> float:
    prof = res["profiles"].get(check)
    if not prof:
        return float("nan")
    return sum(r["extra_ms"] for r in prof["top_extra_ops"] if r["op"] in ops)


def _ratios(results: dict[str, Any], key: str, field: str = "ratio") -> str:
    parts = []
    for model, res in results["models"].items():
        c = _check(res, key)
        if c is not None:
            parts.append(f"{model} {c[field]:.2f}×" + (f" ({shown_verdict(c['ratio'], c['target'])})"
                                                       if c["verdict"] != "—" else ""))
    return ", ".join(parts)


def write_report(results: dict[str, Any], out: str) -> dict[str, Any]:
    """Write overhead.json (with the analysis) and overhead.md into ``out``."""
    notes = analysis_notes(results)
    results["analysis"] = notes
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "overhead.json"), "w") as fh:
        json.dump(results, fh, indent=1, default=float)
    with open(os.path.join(out, "overhead.md"), "w") as fh:
        fh.write(markdown(results, notes))
    return results


def _note(key: str, **values: Any) -> str:
    return note("overhead", key, **values)


def analysis_notes(results: dict[str, Any]) -> dict[str, str]:
    """Explanations of the measured ratios: the prose of ``benchmarks/notes/overhead.md``, with the numbers filled
    in from ``results``."""
    notes: dict[str, str] = {}
    models = results["models"]
    if any(_check(r, "tsrs-lora") or _check(r, "tsrs-rlrr") for r in models.values()):
        expected = []
        for model, res in models.items():
            inj = res.get("inject_layer_tsrs")
            if inj:
                n, i = inj["blocks"], inj["inject_layer"]
                expected.append(_note("TSRS / expected", model=model, inject=i, last=n - 1, blocks=n,
                                      factor=(i + 2 * (n - i)) / n))
        gemms = [_note("TSRS / GEMMs", model=m, ms=_op_ms(r, "tsrs-lora", "aten::mm", "aten::addmm", "aten::bmm"))
                 for m, r in models.items() if _check(r, "tsrs-lora")]
        pairs = [(_check(r, "tsrs-lora"), _check(r, "tsrs-rlrr")) for r in models.values()]
        above = bool(pairs) and all(a and b and a["ratio"] > b["ratio"] for a, b in pairs)
        notes["TSRS"] = _note("TSRS", lora=_ratios(results, "tsrs-lora"), rlrr=_ratios(results, "tsrs-rlrr"),
                              expected="; ".join(expected), gemms=", ".join(gemms),
                              lora_above_rlrr=" " + _note("TSRS / LoRA above RLRR") if above else "")
    if any(_check(r, "pace-full") for r in models.values()):
        memory = ", ".join(_note("PACE / memory", model=m, ratio=_check(r, "pace-full")["memory_ratio"])
                           for m, r in models.items() if _check(r, "pace-full"))
        notes["PACE"] = _note("PACE", full=_ratios(results, "pace-full"), memory=memory,
                              fast=_ratios(results, "pace-fast"), lazy=_ratios(results, "pace-lazy"))
    dist = [(m, r) for m, r in models.items() if _check(r, "distance")]
    if dist:
        parts = [_distance_part(m, r) for m, r in dist if all(k in r["methods"] for k in ("full", "full+distance"))]
        notes["Distance projection"] = _note("Distance projection", ratios=_ratios(results, "distance"),
                                             parts="; ".join(parts))
    if any(_check(r, "self-labeling") for r in models.values()):
        notes["Self-labeling"] = _note("Self-labeling", ratios=_ratios(results, "self-labeling"))
    if any(_check(r, "rlrr-vs-lora") for r in models.values()):
        key = "RLRR vs LoRA at equal parameters"
        gemms = [_note(f"{key} / GEMMs", model=m, ms=_op_ms(r, "rlrr-vs-lora", "aten::mm", "aten::addmm"))
                 for m, r in models.items() if _check(r, "rlrr-vs-lora")]
        missed = [m for m, r in models.items() if (_check(r, "rlrr-vs-lora") or {}).get("verdict") == "MISS"
                  and _check(r, "rlrr-vs-lora")["ratio"] > _check(r, "rlrr-vs-lora")["target"] + BORDERLINE]
        cause = _note(f"{key} / missed", models=", ".join(missed)) if missed else _note(f"{key} / met")
        notes[key] = _note(key, ratios=_ratios(results, "rlrr-vs-lora"), vs_full=_ratios(results, "rlrr-vs-full"),
                           cause=cause, gemms="; ".join(gemms))
    infer = [_note("Inference / model", model=m, merged=k, ratio=v["ratio"])
             for m, r in models.items() for k, v in r["inference"]["models"].items()]
    if infer:
        notes["Inference"] = _note("Inference", models=", ".join(infer))
    return notes


def _distance_part(model: str, res: dict[str, Any]) -> str:
    """The distance projection on one model: its size, the step and page faults it adds, its time alone."""
    full, dist = res["methods"]["full"], res["methods"]["full+distance"]
    extra = 1000 * (dist["median_step_s"] - full["median_step_s"])
    faults = dist.get("page_faulted_mb_per_step", float("nan")) - full.get("page_faulted_mb_per_step", float("nan"))
    proj = res.get("projection") or {}
    alone = load_noise = ""
    if proj.get("ms") is not None:
        frac = proj.get("fraction_of_full_step")
        alone = _note("Distance projection / alone", ms=proj["ms"]) + (
            "" if frac is None else _note("Distance projection / alone, share of a step", percent=100 * frac))
    spread = 1000 * max(full.get("iqr_step_s", 0.0), dist.get("iqr_step_s", 0.0))
    if proj.get("ms") is not None and extra > 2 * proj["ms"] and extra <= spread:
        paired = dist.get("time_ratio_paired")
        load_noise = " " + _note("Distance projection / load noise", ms=proj["ms"], spread_ms=spread) + (
            "" if paired is None else " " + _note("Distance projection / load noise, paired", paired=paired))
    return _note("Distance projection / model", model=model, elements_m=proj.get("elements", 0) / 1e6,
                 weights=proj.get("weights", 0), extra_ms=extra, faulted_mb=faults,
                 ops_ms=_op_ms(res, "distance", "aten::sub", "aten::add", "aten::linalg_vector_norm"), alone=alone,
                 load_noise=load_noise)


if __name__ == "__main__":
    main()
