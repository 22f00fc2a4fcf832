"""Rendering the cost tables: ``overhead.md`` and the analysis in ``overhead.json``, from the measured results."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from .analysis import analysis_notes
from .plan import MB, shown_verdict


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
