"""The results folder of a call: ``generalization.json`` read, merged with a new call's rows (``--merge``) and written
with its report."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from .calls import command_groups
from .grid import Group
from .report import markdown_report, plot
from .tables import aggregate, group_key, paired_comparisons


def read_results(out: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(runs, meta)`` of ``<out>/generalization.json``; ``([], {})`` when there is none yet."""
    path = os.path.join(out, "generalization.json")
    if not os.path.exists(path):
        return [], {}
    with open(path) as fh:
        payload = json.load(fh)
    if not isinstance(payload, dict) or "runs" not in payload:
        raise ValueError(f"{path} is not a generalization.json (no 'runs' list); move it away or drop --merge")
    return payload["runs"], payload.get("meta", {})


def merge_records(earlier: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]],
                  groups: set[Group]) -> list[dict[str, Any]]:
    """The rows of ``earlier`` outside ``groups`` (the (task, shots, noise, method) of this call's grid), then
    ``records``: a table extended method by method keeps its other lines, a group run again replaces its own."""
    return [r for r in earlier if group_key(r) not in groups] + list(records)


def merged_meta(meta: dict[str, Any], earlier: dict[str, Any], groups: set[Group]) -> dict[str, Any]:
    """``meta`` with ``earlier_calls``: the (date, command) of the earlier calls that still contribute rows.

    The calls are in the order they ran. One is dropped when every (task, setting, method) group of its grid was
    written again by a later call or by this one (``groups``); a command that does not parse is dropped only when it
    is this call's command."""
    calls = [*earlier.get("earlier_calls", [])]
    if earlier.get("command"):
        calls.append({"date": earlier.get("date", ""), "command": earlier["command"]})
    later = set(groups)
    kept = []
    for call in reversed(calls):
        own = command_groups(call["command"])
        if own is None:
            replaced = call["command"] == meta.get("command")
        else:
            replaced = own <= later
            later |= own
        if not replaced:
            kept.append(call)
    return {**meta, "earlier_calls": kept[::-1]}


def write_outputs(records: list[dict[str, Any]], meta: dict[str, Any], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    payload = {"meta": meta, "summary": aggregate(records), "paired": paired_comparisons(records), "runs": records}
    with open(os.path.join(out, "generalization.json"), "w") as fh:
        json.dump(payload, fh, indent=1, default=float)
    with open(os.path.join(out, "generalization.md"), "w") as fh:
        fh.write(markdown_report(records, meta))
    plot(records, os.path.join(out, "generalization.png"))
