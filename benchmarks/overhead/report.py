"""Rendering the cost tables: ``overhead.md`` and the analysis in ``overhead.json``, from the measured results; the
prose is ``benchmarks/notes/overhead.md``."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from ..notes import note
from .analysis import analysis_notes
from .plan import MB, shown_verdict


def _fmt_ratio(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.2f}×"


def _note(key: str, **values: Any) -> str:
    return note("overhead", key, **values)


def _load_line(meta: dict[str, Any]) -> str:
    start, end = meta.get("load_average_start"), meta.get("load_average_end")
    if not start:
        return ""
    end_text = _note("Measured / load average at the end", end="/".join(f"{x:.1f}" for x in end)) if end else ""
    return " " + _note("Measured / load average", start="/".join(f"{x:.1f}" for x in start), end=end_text,
                       cores=meta["machine"].split(", ")[-1])


def markdown(results: dict[str, Any], notes: Optional[dict[str, str]] = None) -> str:
    """The Markdown report of an overhead results dict."""
    meta = results["meta"]
    lines = [
        "# Cost of the regularizers (`python -m benchmarks.overhead`)",
        "",
        _note("Measured", date=meta["date"], machine=meta["machine"], threads=meta["torch_threads"],
              plural="" if meta["torch_threads"] == 1 else "s", torch=meta["torch"], transformers=meta["transformers"],
              peft=meta["peft"], steps=meta["steps"], warmup=meta["warmup"], load_average=_load_line(meta)),
        "",
        f"Peak memory: {meta['memory_method']}",
        "",
    ]
    for model_key, res in results["models"].items():
        lines += [f"## {res['label']} — batch {res['batch_size']} (inputs {res['batch_shapes']})", ""]
        if res.get("inject_layer_tsrs"):
            inj = res["inject_layer_tsrs"]
            lines += [_note("TSRS injection", inject=inj["inject_layer"], blocks=inj["blocks"]), ""]
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
            lines += ["", _note("Equal parameters", ranks=ranks, lora=eq["adapter_params_lora"],
                                rlrr=eq["adapter_params_rlrr"], lora_trainable=eq["trainable_parameters"],
                                rlrr_trainable=rlrr.get("trainable_parameters", 0))]
        lines += ["", "| target | ratio | paired | target | result | mem ratio |", "|---|---:|---:|---:|---|---:|"]
        for c in res["checks"]:
            target = "" if c["target"] is None else f"≤ {c['target']:.2f}×"
            lines.append(f"| {c['what']} | {c['ratio']:.2f}× | {c['ratio_paired']:.2f}× | {target} | "
                         f"{shown_verdict(c['ratio'], c['target'])} | {c['memory_ratio']:.2f}× |")
        inf = res["inference"]
        lines += ["", _note("Inference timing", batch=inf["batch"], reps=inf["reps"],
                            plain_ms=1000 * inf["plain_median_s"]), "",
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
            kind = _note("Profile / missed") if c["verdict"] == "MISS" else _note("Profile / borderline")
            lines += ["", _note("Profile", kind=kind, what=c["what"], method_ms=prof["method_total_ms"],
                                base_ms=prof["base_total_ms"]), "",
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
