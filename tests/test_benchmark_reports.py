"""Every committed benchmark report regenerates byte-identical from its committed JSON (no model is trained)."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `benchmarks` without `python -m`

from benchmarks import RESULTS  # noqa: E402
from benchmarks import budget, collapse_probe, evidence, llm, vit_backbone  # noqa: E402
from benchmarks.generalization import results as gen_results  # noqa: E402
from benchmarks.overhead import report as oh_report  # noqa: E402

GENERALIZATION_FOLDERS = sorted(d for d in os.listdir(RESULTS)
                                if os.path.isfile(os.path.join(RESULTS, d, "generalization.json")))
# The paired t-test is scipy's since the committed tables were written: its t and p differ from the hand-written
# incomplete beta function's in the last bits (relative 1e-14 at most), never in the digits the reports print.
T_TEST_FIELDS = ("t", "p_t")
# Markdown files older than the report code (none since 0.2.0 rewrote every report with its stale-row marks).
STALE_MARKDOWN: set[str] = set()


def _committed(*parts: str) -> bytes:
    with open(os.path.join(RESULTS, *parts), "rb") as fh:
        return fh.read()


@pytest.mark.parametrize("folder", GENERALIZATION_FOLDERS)
def test_generalization_report_regenerates_byte_identical(folder, tmp_path, monkeypatch):
    runs, meta = gen_results.read_results(os.path.join(RESULTS, folder))
    monkeypatch.setattr(gen_results, "plot", lambda records, path: None)  # the PNG depends on the matplotlib build
    gen_results.write_outputs(runs, meta, str(tmp_path))
    written = json.loads((tmp_path / "generalization.json").read_text())
    committed = json.loads(_committed(folder, "generalization.json"))
    assert len(written["paired"]) == len(committed["paired"])
    for new, old in zip(written["paired"], committed["paired"]):
        for key in T_TEST_FIELDS:
            assert new[key] == pytest.approx(old[key], rel=1e-14, abs=0.0, nan_ok=True), (new["method"], key)
            new[key] = old[key]
    assert json.dumps(written, indent=1).encode() == _committed(folder, "generalization.json")
    if folder not in STALE_MARKDOWN:
        assert (tmp_path / "generalization.md").read_bytes() == _committed(folder, "generalization.md")


def test_overhead_report_regenerates_byte_identical(tmp_path):
    results = json.loads(_committed("overhead.json"))
    oh_report.write_report(results, str(tmp_path))  # the analysis in overhead.json is rewritten from the numbers too
    assert (tmp_path / "overhead.json").read_bytes() == _committed("overhead.json")
    assert (tmp_path / "overhead.md").read_bytes() == _committed("overhead.md")


def test_collapse_probe_report_regenerates_byte_identical():
    data = json.loads(_committed("collapse_probe.json"))
    assert collapse_probe.markdown(data["rows"], data["meta"]).encode() == _committed("collapse_probe.md")


def test_budget_report_regenerates_byte_identical(tmp_path):
    data = json.loads(_committed("v2", "budget.json"))
    assert data["ladder"] == list(budget.LADDER)
    budget.write(data["runs"], data["target_train_accuracy"], out=str(tmp_path))
    assert (tmp_path / "budget.json").read_bytes() == _committed("v2", "budget.json")
    assert (tmp_path / "budget.md").read_bytes() == _committed("v2", "budget.md")


def test_vit_backbone_report_regenerates_byte_identical():
    rows = json.loads(_committed("v2", "vit_backbone.json"))["candidates"]
    assert [r["key"] for r in rows] == [c["key"] for c in vit_backbone.CANDIDATES]
    assert vit_backbone.markdown(rows).encode() == _committed("v2", "vit_backbone.md")


def test_llm_report_regenerates_byte_identical(tmp_path):
    llm.write(json.loads(_committed("v2", "llm.json"))["groups"], str(tmp_path))
    assert (tmp_path / "llm.json").read_bytes() == _committed("v2", "llm.json")
    assert (tmp_path / "llm.md").read_bytes() == _committed("v2", "llm.md")


def test_evidence_report_regenerates_byte_identical(tmp_path):
    evidence.write(json.loads(_committed("v2", "evidence.json"))["groups"], str(tmp_path))
    assert (tmp_path / "evidence.json").read_bytes() == _committed("v2", "evidence.json")
    assert (tmp_path / "evidence.md").read_bytes() == _committed("v2", "evidence.md")
    assert (tmp_path / "evidence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the plot of the paired differences


def test_every_committed_report_is_covered():
    reports = {os.path.relpath(os.path.join(d, f), RESULTS) for d, _, files in os.walk(RESULTS) for f in files
               if f.endswith(".md")}
    covered = {"overhead.md", "collapse_probe.md", os.path.join("v2", "budget.md"),
               os.path.join("v2", "vit_backbone.md"), os.path.join("v2", "llm.md"),
               os.path.join("v2", "evidence.md")} | {
        os.path.join(d, "generalization.md") for d in GENERALIZATION_FOLDERS if d not in STALE_MARKDOWN}
    assert reports - covered == {os.path.join(d, "generalization.md") for d in STALE_MARKDOWN}


def test_recommended_recipes_regenerate_byte_identical(tmp_path):
    from benchmarks import recommend

    written = recommend.write(json.loads(_committed("v2", "evidence.json")), str(tmp_path))
    committed = sorted(os.path.relpath(os.path.join(d, f), recommend.RECOMMENDED)
                       for d, _, files in os.walk(recommend.RECOMMENDED) for f in files)
    assert sorted(os.path.relpath(p, tmp_path) for p in written) == committed and committed
    for name in committed:
        with open(os.path.join(recommend.RECOMMENDED, name), "rb") as fh:
            assert (tmp_path / name).read_bytes() == fh.read(), name


def test_every_recommended_recipe_loads_with_its_task_file():
    from benchmarks import recommend
    from benchmarks.budget import V2_TASKS
    from benchmarks.methods import recipe_files
    from peft_tsrs.app.recipes import load_recipe

    tasks = [t for t in os.listdir(recommend.RECOMMENDED) if os.path.isdir(os.path.join(recommend.RECOMMENDED, t))]
    assert tasks and os.path.isfile(os.path.join(recommend.RECOMMENDED, "README.md"))
    for task in tasks:
        spec = V2_TASKS[task]
        for name in os.listdir(os.path.join(recommend.RECOMMENDED, task)):
            task_file = recipe_files(spec.file, recommend.EVIDENCE_BY_KEY["full"])[0]
            recipe = load_recipe([task_file, os.path.join(recommend.RECOMMENDED, task, name)], list(spec.overrides))
            assert recipe.name.endswith("-recommended") and recipe.training.lr_scheduler == "cosine"
