"""Measuring one model: every method's step timed round-robin in one process, its peak memory and op profile, the
distance projection alone, and inference after ``merge_and_unload`` against the plain model."""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Iterable, Optional, Sequence

from ..methods import Method
from ..stats import iqr, median, paired_ratio, ratio_of_medians
from .build import Entry, build_entry, method_recipe, persistent_bytes
from .plan import CHECKS, INFERENCE_TARGET, MB, ModelSetup, verdict


def peak_live_bytes(events: Iterable[tuple[int, int]]) -> int:
    """Peak of the running sum of ``(time, nbytes)`` allocation (+) / free (−) events, in time order, from 0."""
    current = peak = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):
        current += nbytes
        peak = max(peak, current)
    return peak


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


def run_model(setup: ModelSetup, methods: Sequence[Method], steps: int, warmup: int, inference_reps: int,
              profile_steps: int, log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from peft_tsrs.app.tasks import build_model, build_task

    workdir = tempfile.mkdtemp(prefix=f"overhead-{setup.key}-")
    first = method_recipe(setup, methods[0], workdir)
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
        projection = projection_timing(entries["full+distance"].trainer.regularizers["distance"].constraint, steps,
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
        tsrs = e.trainer.regularizers.get("tsrs")
        if tsrs is not None:
            ns = tsrs.stability
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
