"""The analysis of the cost tables: the prose of ``benchmarks/notes/overhead.md`` picked for what was measured and
filled in with the numbers."""

from __future__ import annotations

from typing import Any, Optional

from ..notes import note
from .plan import BORDERLINE, shown_verdict


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
