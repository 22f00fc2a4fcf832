"""Fast tests of the benchmark harness logic (no model is trained and no timing is asserted)."""

from __future__ import annotations

import json
import math
import os
import shlex
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `benchmarks` without `python -m`

from benchmarks import CONFIGS, RESULTS, ROOT  # noqa: E402
from benchmarks import generalization as gen  # noqa: E402
from benchmarks import methods as registry  # noqa: E402
from benchmarks import run_all  # noqa: E402
from benchmarks import stats  # noqa: E402
from benchmarks.generalization import calls as cli  # noqa: E402
from benchmarks.generalization import grid, running, tables  # noqa: E402
from benchmarks.generalization import report as gen_report  # noqa: E402
from benchmarks.generalization import results as gen_results  # noqa: E402
from benchmarks.overhead import analysis as oh_analysis  # noqa: E402
from benchmarks.overhead import build as oh_build  # noqa: E402
from benchmarks.overhead import measure as oh_measure  # noqa: E402
from benchmarks.overhead import plan as oh_plan  # noqa: E402
from benchmarks.overhead import report as oh_report  # noqa: E402

METHOD = registry.GENERALIZATION_BY_KEY  # the generalization benchmark's methods by key


# ---------------------------------------------------------------------------------------------- overhead helpers
def test_median_iqr_and_ratios():
    assert stats.median([3.0, 1.0, 2.0]) == 2.0
    assert math.isnan(stats.median([]))
    assert stats.iqr([1.0]) == 0.0
    assert stats.iqr([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2.0)
    assert stats.ratio_of_medians([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx(2.0)
    # per-round ratios: a load spike hitting both methods in round 2 cancels out
    assert stats.paired_ratio([1.5, 15.0, 1.5], [1.0, 10.0, 1.0]) == pytest.approx(1.5)


def test_verdict():
    assert oh_plan.verdict(1.59, 1.6) == "pass"
    assert oh_plan.verdict(1.6, 1.6) == "pass"
    assert oh_plan.verdict(1.61, 1.6) == "MISS"
    assert oh_plan.verdict(3.0, None) == "—"


def test_peak_live_bytes_sorts_events_by_time():
    # alloc 8 (t=0), alloc 8 (t=1), free 8 (t=2), alloc 28 (t=3), free 28 (t=4); given out of order
    events = [(3, 28), (0, 8), (4, -28), (1, 8), (2, -8)]
    assert oh_measure.peak_live_bytes(events) == 36
    assert oh_measure.peak_live_bytes([]) == 0
    assert oh_measure.peak_live_bytes([(0, -5), (1, 3)]) == 0  # frees of memory allocated before the window


def test_param_counts_and_roles():
    assert oh_build.lora_params((384, 1536), 2) == 2 * (384 + 1536)
    assert oh_build.rlrr_params((384, 1536)) == 384 + 2 * 1536
    assert oh_build.role_of("bert.encoder.layer.3.attention.self.query") == "bert.encoder.layer.*.attention.self.query"
    assert oh_build.role_of("classifier") == "classifier"


def test_equal_param_ranks_matches_rlrr_exactly_on_minilm_shapes():
    hidden, inter, layers = 384, 1536, 6
    shapes = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "o": (hidden, hidden),
              "fc1": (hidden, inter), "fc2": (inter, hidden)}
    roles = {f"layer.*.{k}": [s] * layers for k, s in shapes.items()}
    target = sum(oh_build.rlrr_params(s) for ss in roles.values() for s in ss)
    ranks, count = oh_build.equal_param_ranks(roles, target)
    assert count == target == layers * 10368
    assert count == sum(oh_build.lora_params(s, ranks[r]) for r, ss in roles.items() for s in ss)
    assert max(ranks.values()) - min(ranks.values()) == 1  # the most uniform of the exact solutions


def test_equal_param_ranks_closest_when_not_exact():
    ranks, count = oh_build.equal_param_ranks({"a": [(10, 10)]}, 45)  # multiples of 20 only
    assert count in (40, 60) and ranks == {"a": 2}


def test_op_diff_orders_by_extra_time():
    method = {"aten::mm": {"ms": 10.0, "calls": 4}, "aten::add": {"ms": 1.0, "calls": 2}}
    base = {"aten::mm": {"ms": 4.0, "calls": 2}, "aten::mul": {"ms": 2.0, "calls": 1}}
    rows = oh_measure.op_diff(method, base, top=2)
    assert [r["op"] for r in rows] == ["aten::mm", "aten::add"]
    assert rows[0]["extra_ms"] == pytest.approx(6.0)


def _overhead_results(ratio_tsrs: float) -> dict:
    def method(label, base, ratio, ms=100.0):
        return {"label": label, "base": base, "trainable_parameters": 1000, "median_step_s": ms / 1000,
                "iqr_step_s": 0.001, "time_ratio": ratio, "time_ratio_paired": ratio, "step_peak_bytes": 2 * oh_plan.MB,
                "memory_ratio": None if base is None else 1.5, "persistent_bytes": oh_plan.MB}

    check = {"key": "tsrs-lora", "what": "TSRS step ≤ 1.6× its adapter (LoRA)", "method": "lora+tsrs",
             "base": "lora", "target": 1.6, "ratio": ratio_tsrs, "ratio_paired": ratio_tsrs,
             "verdict": oh_plan.verdict(ratio_tsrs, 1.6), "memory_ratio": 1.5}
    return {
        "meta": {"date": "d", "machine": "m", "torch_threads": 1, "torch": "t", "transformers": "tr", "peft": "p",
                 "steps": 20, "warmup": 3, "memory_method": "profiler"},
        "models": {"vit": {
            "label": "ViT", "batch_size": 64, "batch_shapes": {"pixel_values": [64, 1, 28, 28]},
            "inject_layer_tsrs": {"inject_layer": 2, "measure_from": 2, "blocks": 4},
            "methods": {"lora": method("LoRA r8", None, None), "lora+tsrs": method("LoRA r8 + TSRS", "lora",
                                                                                   ratio_tsrs)},
            "checks": [check],
            "profiles": {"tsrs-lora": {"method_total_ms": 170.0, "base_total_ms": 100.0, "top_extra_ops": [
                {"op": "aten::mm", "extra_ms": 50.0, "method_ms": 100.0, "base_ms": 50.0, "method_calls": 40,
                 "base_calls": 20}]}},
            "inference": {"batch": 64, "reps": 20, "plain_median_s": 0.01, "models": {"lora merged": {
                "median_s": 0.0101, "ratio": 1.01, "ratio_paired": 1.0, "verdict": "pass",
                "same_class_as_plain": True, "parameters": 5, "plain_parameters": 5,
                "max_abs_logit_diff_vs_unmerged": 1e-6}}},
        }},
    }


def test_overhead_markdown_pass_and_miss():
    text = oh_report.markdown(_overhead_results(1.45), {"TSRS": "explained"})
    assert "| TSRS step ≤ 1.6× its adapter (LoRA) | 1.45× | 1.45× | ≤ 1.60× | pass | 1.50× |" in text
    assert "| LoRA r8 + TSRS | lora | 1,000 | 100.0 |" in text
    assert "| lora merged | 10.1 | 1.01× |" in text
    assert "Profile of the miss" not in text and "**TSRS.** explained" in text
    missed = oh_report.markdown(_overhead_results(1.7))
    assert "| MISS |" in missed and "Profile of the miss" in missed and "`aten::mm` | 50.0" in missed
    assert oh_report.summary_rows(_overhead_results(1.7)) == [("vit", "tsrs-lora", 1.7, 1.6, "MISS")]


def test_projection_timing_reports_ms_and_fraction_of_step():
    import torch
    from torch import nn

    from peft_tsrs.regularizers import DistanceConstraint

    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    constraint = DistanceConstraint(model, norm="frob", ratio=0.05)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    proj = oh_measure.projection_timing(constraint, reps=3, full_step_s=0.5)
    assert proj["weights"] == len(constraint.items) and proj["elements"] > 0
    assert proj["ms"] >= 0 and proj["full_step_ms"] == pytest.approx(500.0)
    assert proj["fraction_of_full_step"] == pytest.approx(proj["ms"] / 500.0)
    assert constraint.max_violation() <= 1e-5  # it did project
    assert oh_measure.projection_timing(constraint, reps=1, full_step_s=None)["fraction_of_full_step"] is None


def test_analysis_notes_describe_the_shipped_code():
    results = _overhead_results(1.45)
    res = results["models"]["vit"]
    for key, ms in (("full", 100.0), ("full+distance", 102.0)):
        res["methods"][key] = {"median_step_s": ms / 1000, "page_faulted_mb_per_step": 0.0}
    res["checks"].append({"key": "distance", "what": "distance", "method": "full+distance", "base": "full",
                          "target": 1.05, "ratio": 1.02, "ratio_paired": 1.02, "verdict": "pass",
                          "memory_ratio": 1.0})
    res["projection"] = {"weights": 8, "elements": 2_000_000, "ms": 1.5, "fraction_of_full_step": 0.015}
    notes = oh_analysis.analysis_notes(results)
    text = notes["Distance projection"]
    assert "vit 1.02× (pass)" in text and "+2 ms" in text and "1.5 ms, 1.5% of a full fine-tuning step" in text
    assert "scratch buffer" in text and "prototype" not in " ".join(notes.values())
    assert "release()" in notes["TSRS"]


def test_notes_are_one_paragraph_a_section(tmp_path, monkeypatch):
    from benchmarks import notes

    sections = notes.sections("overhead")
    assert {"Measured", "TSRS", "Distance projection / load noise", "Memory method"} <= set(sections)
    assert "Protocol / select on clean" in notes.sections("generalization")
    for name in ("overhead", "generalization", "collapse_probe"):
        assert all(text and "\n" not in text and "  " not in text for text in notes.sections(name).values())
    assert notes.note("overhead", "PACE / memory", model="vit", ratio=1.854) == "vit 1.85×"
    (tmp_path / "twice.md").write_text("comment\n## a\none\ntwo\n\n## b\nthree\n## a\nfour\n")
    monkeypatch.setattr(notes, "HERE", str(tmp_path))
    with pytest.raises(ValueError, match="'a' twice"):
        notes.sections("twice")
    (tmp_path / "once.md").write_text("comment\n## a\none\n  two\n\n## b\nthree {x:.1f}\n")
    assert notes.sections("once") == {"a": "one two", "b": "three {x:.1f}"}
    assert notes.note("once", "b", x=2) == "three 2.0"


def test_the_plan_names_registered_methods_only():
    assert registry.cli_methods("lora", "pace") == ("--methods", "lora", "pace")
    with pytest.raises(KeyError, match="nope"):
        registry.cli_methods("lora", "nope")


def test_every_check_names_known_methods():
    keys = {m.key for m in registry.OVERHEAD_METHODS}
    for check in oh_plan.CHECKS:
        assert check.method in keys and check.base in keys
    for m in registry.OVERHEAD_METHODS:
        assert m.counterpart is None or m.counterpart in keys
        for f in m.files:
            assert os.path.isfile(os.path.join(CONFIGS, "methods", f))


# ---------------------------------------------------------------------------------------------- statistics
def test_paired_t_test_hand_numbers():
    t, p = stats.paired_t_test([1.0, 2.0, 3.0, 4.0, 5.0])
    assert t == pytest.approx(3.0 / (math.sqrt(2.5) / math.sqrt(5)))  # 4.2426
    assert p == pytest.approx(0.013236, abs=1e-5)  # scipy.stats.ttest_1samp([1..5], 0).pvalue
    t, p = stats.paired_t_test([0.01, -0.02, 0.03, 0.0])
    assert t == pytest.approx(0.005 / (statistics_stdev([0.01, -0.02, 0.03, 0.0]) / 2))
    assert 0.5 < p < 1.0
    assert stats.paired_t_test([0.0, 0.0, 0.0]) == (0.0, 1.0)
    assert stats.paired_t_test([0.1, 0.1]) == (math.inf, 0.0)
    assert stats.paired_t_test([-0.1, -0.1, -0.1]) == (-math.inf, 0.0)
    t, p = stats.paired_t_test([0.1])
    assert math.isnan(t) and math.isnan(p)


def statistics_stdev(values):
    import statistics

    return statistics.stdev(values)


def test_paired_t_test_is_scipys_paired_test():
    import random

    from scipy.stats import t as t_dist
    from scipy.stats import ttest_rel

    rng = random.Random(0)
    for n in (2, 3, 5, 10, 31):  # 1, 2, 4, 9, 30 degrees of freedom
        for shift in (0.0, 0.01, 0.05, 0.3):
            a = [rng.gauss(0.5, 0.05) for _ in range(n)]
            b = [x - shift + rng.gauss(0.0, 0.03) for x in a]
            t, p = stats.paired_t_test([x - y for x, y in zip(a, b)])
            expected = ttest_rel(a, b)
            assert t == pytest.approx(expected.statistic, rel=1e-12)
            assert p == pytest.approx(expected.pvalue, rel=1e-12, abs=1e-300)
            assert p == pytest.approx(2 * t_dist.sf(abs(t), n - 1), rel=1e-9)  # two-sided Student's t


def test_sign_test_exact():
    assert stats.sign_test([0.1, 0.2, 0.3, 0.4, 0.5]) == (5, 0, pytest.approx(0.0625))
    assert stats.sign_test([0.1, -0.2, 0.3, 0.4, 0.5]) == (4, 1, pytest.approx(0.375))
    assert stats.sign_test([0.0, 0.0]) == (0, 0, 1.0)
    assert stats.sign_test([0.1, 0.0, -0.1]) == (1, 1, 1.0)
    # exact: 2 * P(X <= 2) for X ~ Bin(9, 1/2) = 2 * (1 + 9 + 36) / 512
    assert stats.sign_test([1.0] * 7 + [-1.0] * 2) == (7, 2, pytest.approx(2 * 46 / 512, rel=1e-12))


def _rec(task, method, seed, test, val=None, shots=8, noise=0.0, selected=True, phase="seed", lr=1e-2,
         loss=1.0):
    return {"task": task, "shots": shots, "label_noise": noise, "setting": grid.Setting(shots, noise).key,
            "method": method, "phase": phase, "seed": seed, "lr": lr, "hparams": [], "config": f"lr{lr:.3g}",
            "selected": selected, "validation_accuracy": test if val is None else val, "validation_loss": loss,
            "test_accuracy": test, "train_time_s": 10.0, "train_steps": 5, "trainable_parameters": 1,
            "recipe_method": method, "run_dir": "x", "peft_tsrs_version": "0.2.0"}


def _hand_records():
    lora = [0.50, 0.52, 0.48, 0.51, 0.49]
    tsrs = [0.53, 0.54, 0.49, 0.55, 0.50]  # diffs +3, +2, +1, +4, +1 points
    recs = [_rec("wordnet", "lora", s, a) for s, a in enumerate(lora)]
    recs += [_rec("wordnet", "lora+tsrs", s, a) for s, a in enumerate(tsrs)]
    recs.append(_rec("wordnet", "lora", 0, 0.9, selected=False, phase="select", lr=3e-2))  # not selected
    return recs


def test_aggregate_uses_selected_runs_only():
    rows = tables.aggregate(_hand_records())
    assert [r["method"] for r in rows] == ["lora", "lora+tsrs"]
    lora = rows[0]
    assert lora["n"] == 5 and lora["seeds"] == [0, 1, 2, 3, 4]
    assert lora["test_mean"] == pytest.approx(0.50)
    assert lora["test_std"] == pytest.approx(statistics_stdev([0.50, 0.52, 0.48, 0.51, 0.49]))


def test_paired_comparisons_on_hand_numbers():
    (pair,) = tables.paired_comparisons(_hand_records())
    assert pair["method"] == "lora+tsrs" and pair["counterpart"] == "lora"
    assert pair["diffs"] == pytest.approx([0.03, 0.02, 0.01, 0.04, 0.01])
    assert pair["mean_diff"] == pytest.approx(0.022)
    assert (pair["wins"], pair["losses"]) == (5, 0) and pair["p_sign"] == pytest.approx(0.0625)
    assert pair["p_t"] == pytest.approx(stats.paired_t_test([0.03, 0.02, 0.01, 0.04, 0.01])[1])
    assert pair["p_t"] < 0.05


def test_paired_comparisons_only_on_common_seeds():
    recs = [_rec("fmnist", "rlrr", s, 0.6) for s in range(5)] + [_rec("fmnist", "rlrr+tsrs", s, 0.7)
                                                                 for s in (1, 3)]
    (pair,) = tables.paired_comparisons(recs)
    assert pair["seeds"] == [1, 3] and pair["mean_diff"] == pytest.approx(0.1)


def test_select_best_ties():
    rows = [{"validation_accuracy": 0.5, "validation_loss": 1.0}, {"validation_accuracy": 0.6, "validation_loss": 2.0},
            {"validation_accuracy": 0.6, "validation_loss": 1.5}, {"validation_accuracy": 0.6, "validation_loss": 1.5}]
    assert running.select_best(rows) is rows[2]
    with pytest.raises(ValueError):
        running.select_best([])


def test_markdown_report_formatting():
    text = gen_report.markdown_report(_hand_records(), {"date": "d", "seeds": [0, 1, 2, 3, 4], "lr_multipliers": [1]})
    assert "## WordNet nouns / MiniLM — 8 shots" in text
    assert "| LoRA r8 | 5 | lr0.01 | 50.0 ± 1.6 | 50.0 ± 1.6 |" in text
    assert "| LoRA + TSRS | 5 | lr0.01 |" in text and "+2.2 ± 1.3 vs lora" in text and "| 5/0 | 0.062 |" in text
    assert "QUICK MODE" not in text
    assert "QUICK MODE" in gen_report.markdown_report(_hand_records(), {"quick": True})
    assert "Best method per setting" in text


def test_runs_from_before_a_method_changed_are_marked_stale():
    """A run recorded before 0.2.0 (no version in its record) of a method the fixes changed gets a † and the reason;
    a method that did not change (LoRA) and runs of the current release get none."""
    old = [dict(r, peft_tsrs_version=None) if r["method"] == "lora+tsrs" else r for r in _hand_records()]
    for r in old:
        if r["peft_tsrs_version"] is None:
            del r["peft_tsrs_version"]
    text = gen_report.markdown_report(old, {"date": "d", "seeds": [0, 1, 2, 3, 4], "lr_multipliers": [1]})
    assert "| LoRA + TSRS † | 5 |" in text and "| LoRA r8 | 5 |" in text
    assert "**† Stale rows.**" in text and "LoRA + TSRS — TSRS: the clean and noisy pass now share" in text
    fresh = gen_report.markdown_report(_hand_records(), {"date": "d", "seeds": [0, 1, 2, 3, 4], "lr_multipliers": [1]})
    assert "†" not in fresh
    from peft_tsrs.version import __version__

    assert running._version() == __version__  # new records carry the release that made them


def test_markdown_report_lists_every_selection_run_of_a_searched_group():
    recs = _hand_records()  # lora: one select run only (not searched), listed nowhere
    assert "Selection runs" not in gen_report.markdown_report(recs, {})
    recs += [_rec("wordnet", "lora+tsrs", 0, 0.40, val=0.45, selected=False, phase="select", lr=3e-3),
             _rec("wordnet", "lora+tsrs", 0, 0.60, val=0.55, selected=True, phase="select", lr=1e-2)]
    text = gen_report.markdown_report(recs, {})
    assert "| wordnet | 8 shots | LoRA + TSRS | lr0.003 | 45.0 | 40.0 |  |" in text
    assert "| wordnet | 8 shots | LoRA + TSRS | lr0.01 | 55.0 | 60.0 | yes |" in text
    assert "| wordnet | 8 shots | LoRA r8 | lr0.03 |" not in text


def test_write_outputs(tmp_path):
    gen_results.write_outputs(_hand_records(), {"date": "d"}, str(tmp_path))
    data = json.loads((tmp_path / "generalization.json").read_text())
    assert len(data["runs"]) == 11 and len(data["summary"]) == 2 and len(data["paired"]) == 1
    assert (tmp_path / "generalization.md").read_text().startswith("# Generalization")
    assert (tmp_path / "generalization.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------------- planning / resume
def test_tags_dirs_and_grids(tmp_path):
    assert grid.config_tag(0.01, ()) == "lr0.01"
    assert grid.config_tag(3e-05, ("regularizers.tsrs_weight=0.1",)) == "lr3e-05-tsrs_weight0.1"
    assert grid.lr_grid(1e-2, (0.3, 1.0, 3.0)) == [0.003, 0.01, 0.03]
    assert cli.parse_settings(["8", "32:0.2"]) == [grid.Setting(8), grid.Setting(32, 0.2)]
    assert grid.Setting(32, 0.4).key == "32shot-noise40"
    spec = grid.spec_for(str(tmp_path), grid.TASKS["wordnet"], grid.Setting(8), METHOD["lora+tsrs"], 0.01,
                        ("regularizers.tsrs_weight=0.1",), 3, "seed")
    assert spec.run_dir == os.path.join(str(tmp_path), "wordnet", "8shot-noise0", "lora+tsrs",
                                        "lr0.01-tsrs_weight0.1-s3")
    assert "task.seed=3" in spec.overrides and "training.seed=3" in spec.overrides
    assert spec.overrides[-2:] == (f"output_dir={os.path.dirname(spec.run_dir)}", "name=lr0.01-tsrs_weight0.1-s3")


def test_methods_are_consistent_and_recipes_load():
    from peft_tsrs.app.recipes import load_recipe

    for m in registry.GENERALIZATION_METHODS:
        assert m.counterpart is None or m.counterpart in registry.GENERALIZATION_BY_KEY
        for f in m.files:
            assert os.path.isfile(os.path.join(CONFIGS, "methods", f))
        for task in grid.TASKS.values():
            for hp in m.hparams:
                overrides = [*m.overrides, *m.per_task.get(task.key, ()), *hp]
                recipe = load_recipe(registry.recipe_files(task.file, m), overrides)
                assert recipe.regularizers.is_noop == (m.counterpart is None), m.key
    assert grid.default_lr(grid.TASKS["fmnist"], METHOD["full"]) == pytest.approx(3e-4)
    assert grid.default_lr(grid.TASKS["wordnet"], METHOD["full"]) == pytest.approx(5e-5)


class FakeRunner:
    """Writes a metrics.json like run_recipe's; validation accuracy peaks at lr 0.01."""

    def __init__(self):
        self.calls = []

    def __call__(self, spec):
        self.calls.append(spec.run_dir)
        os.makedirs(spec.run_dir, exist_ok=True)
        val = 0.6 - abs(math.log10(spec.lr) + 2) / 10 + (0.01 if spec.method == "lora+tsrs" else 0.0)
        metrics = {"validation": {"accuracy": val, "loss": 1.0}, "test": {"accuracy": val - 0.05 + spec.seed / 1000},
                   "method": spec.method, "train_time_s": 1.0, "train_steps": 4, "trainable_parameters": 7}
        with open(os.path.join(spec.run_dir, "metrics.json"), "w") as fh:
            json.dump(metrics, fh)
        return metrics


def test_a_run_shared_by_two_processes_is_trained_once(tmp_path):
    """Two calls sharing --runs that need the same run (seed 0 of a --seeds split): the second waits for the first's
    lock, then reads its metrics; it neither trains the run again nor deletes the unfinished folder."""
    import threading

    spec = grid.spec_for(str(tmp_path), grid.TASKS["wordnet"], grid.Setting(8), METHOD["lora"], 0.01, (), 0,
                        "select")
    inner, started, release = FakeRunner(), threading.Event(), threading.Event()

    def slow_runner(s):
        os.makedirs(s.run_dir)  # an unfinished run folder, as a real run leaves while it trains
        started.set()
        assert release.wait(10)
        return inner(s)

    results, logs = {}, []
    first = threading.Thread(
        target=lambda: results.update(first=running.execute(spec, slow_runner, log=logs.append)))
    second = threading.Thread(
        target=lambda: results.update(second=running.execute(spec, FakeRunner(), log=logs.append)))
    first.start()
    assert started.wait(10)
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waiting for the lock, not training and not deleting the folder
    release.set()
    first.join(10)
    second.join(10)
    assert inner.calls == [spec.run_dir]
    assert results["second"] == results["first"] is not None
    assert any("finished by another process" in line for line in logs)


def _grid(tmp_path, runner, seeds=(0, 1, 2)):
    methods = [METHOD["lora"], METHOD["lora+tsrs"]]
    return running.run_grid([grid.TASKS["wordnet"]], [grid.Setting(8)], methods, list(seeds), [], str(tmp_path),
                        runner=runner, log=lambda _: None, lrs_for=lambda t, m: [0.003, 0.01, 0.03])


def test_run_grid_selects_on_validation_and_resumes(tmp_path):
    runner = FakeRunner()
    records = _grid(tmp_path, runner)
    # lora: 3 lrs; lora+tsrs: 3 lrs x 2 TSRS weights; then seeds 1 and 2 for both
    assert len(runner.calls) == 3 + 6 + 2 + 2
    selected = [r for r in records if r["selected"]]
    assert {(r["method"], r["seed"]) for r in selected} == {(m, s) for m in ("lora", "lora+tsrs") for s in range(3)}
    assert all(r["lr"] == 0.01 for r in selected)
    assert {r["config"] for r in selected if r["method"] == "lora+tsrs"} == {"lr0.01-tsrs_weight0.1"}
    # resume: everything finished, nothing runs again, same records
    again = FakeRunner()
    assert _grid(tmp_path, again) == records and again.calls == []
    # an interrupted run (folder without metrics.json) is run again from scratch; a new seed only adds its runs
    interrupted = tmp_path / "wordnet" / "8shot-noise0" / "lora" / "lr0.01-s2"
    (interrupted / "metrics.json").unlink()
    (interrupted / "stale.txt").write_text("x")
    more = FakeRunner()
    records = _grid(tmp_path, more, seeds=(0, 1, 2, 3))
    assert sorted(os.path.relpath(c, tmp_path) for c in more.calls) == sorted([
        os.path.join("wordnet", "8shot-noise0", "lora", "lr0.01-s2"),
        os.path.join("wordnet", "8shot-noise0", "lora", "lr0.01-s3"),
        os.path.join("wordnet", "8shot-noise0", "lora+tsrs", "lr0.01-tsrs_weight0.1-s3")])
    assert not (interrupted / "stale.txt").exists()
    assert len([r for r in records if r["selected"]]) == 8


def test_report_only_leaves_unfinished_out(tmp_path):
    _grid(tmp_path, FakeRunner(), seeds=(0,))
    (tmp_path / "wordnet" / "8shot-noise0" / "lora+tsrs" / "lr0.03-tsrs_weight1.0-s0" / "metrics.json").unlink()
    records = _grid(tmp_path, None, seeds=(0, 1))  # runner None: report only, seed 1 never ran
    assert {r["method"] for r in records} == {"lora"}
    assert [r["seed"] for r in records if r["selected"]] == [0]


def test_seed_zero_excluded_from_final_when_not_requested(tmp_path):
    records = _grid(tmp_path, FakeRunner(), seeds=(1, 2))
    assert sorted({r["seed"] for r in records if r["selected"]}) == [1, 2]


def test_run_all_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(run_all.overhead, "main", lambda argv: calls.append(("overhead", argv)))
    monkeypatch.setattr(run_all.generalization, "main", lambda argv: calls.append(("generalization", argv)))
    assert run_all.main(["--only", "generalization", "--generalization-args", "--tasks wordnet"]) == 0
    assert calls == [("generalization", ["--tasks", "wordnet"])]
    calls.clear()
    run_all.main(["--only", "overhead", "--overhead-args", "--steps 40"])
    assert calls == [("overhead", ["--steps", "40"])]


# ---------------------------------------------------------------------------------------------- CLI plans
class SpecRecorder(FakeRunner):
    """FakeRunner for ``gen.main`` (called as ``default_runner(spec, keep_adapter=...)``), keeping the specs."""

    def __init__(self):
        super().__init__()
        self.specs = []

    def __call__(self, spec, keep_adapter=False):
        self.specs.append(spec)
        return super().__call__(spec)


def test_no_search_runs_each_method_at_its_recipe_configuration(tmp_path, monkeypatch):
    runner = SpecRecorder()
    monkeypatch.setattr(gen, "default_runner", runner)
    gen.main(["--tasks", "wordnet", "--settings", "8", "--no-search", "--methods", "lora+tsrs", "--seeds", "0", "1",
              "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    # lora and lora+tsrs (the counterpart is added), one configuration each, two seeds: no selection runs
    assert sorted((s.method, s.seed) for s in runner.specs) == [("lora", 0), ("lora", 1), ("lora+tsrs", 0),
                                                                 ("lora+tsrs", 1)]
    lora_lr = grid.default_lr(grid.TASKS["wordnet"], METHOD["lora"])
    assert {s.lr for s in runner.specs} == {lora_lr}
    assert {s.hparams for s in runner.specs if s.method == "lora+tsrs"} == {registry.TSRS_GRID[0]}
    assert all("diagnostics=false" in s.overrides for s in runner.specs)
    report = (tmp_path / "out" / "generalization.md").read_text()
    assert "no search" in report and "--no-search" in report
    with pytest.raises(SystemExit):
        gen.main(["--no-search", "--lr-multipliers", "1", "3"])


def test_select_on_clean_reuses_the_clean_selection_for_noisy_settings(tmp_path):
    runner = FakeRunner()
    records = running.run_grid([grid.TASKS["wordnet"]], [grid.Setting(8), grid.Setting(8, 0.4)],
                           [METHOD["lora"]], [0, 1], [], str(tmp_path), runner=runner,
                           log=lambda _: None, lrs_for=lambda t, m: [0.003, 0.01, 0.03], select_on_clean=True)
    noisy = [os.path.relpath(c, tmp_path) for c in runner.calls if "noise40" in c]
    assert sorted(noisy) == [os.path.join("wordnet", "8shot-noise40", "lora", f"lr0.01-s{s}") for s in (0, 1)]
    assert len(runner.calls) == 3 + 1 + 2  # clean: 3 selection runs + seed 1; noisy: seeds 0 and 1 only
    assert {(r["setting"], r["seed"]) for r in records if r["selected"]} == {
        ("8shot-noise0", 0), ("8shot-noise0", 1), ("8shot-noise40", 0), ("8shot-noise40", 1)}
    # without the option the noisy setting selects on its own validation split
    again = FakeRunner()
    running.run_grid([grid.TASKS["wordnet"]], [grid.Setting(8, 0.2)], [METHOD["lora"]], [0], [], str(tmp_path),
                 runner=again, log=lambda _: None, lrs_for=lambda t, m: [0.003, 0.01, 0.03])
    assert len(again.calls) == 3


def test_run_all_default_is_the_committed_cpu_plan(monkeypatch, tmp_path):
    calls = []
    real_main = run_all.generalization.main
    monkeypatch.setattr(run_all.overhead, "main", lambda argv: calls.append(("overhead", argv)))
    monkeypatch.setattr(run_all.generalization, "main", lambda argv: calls.append(("generalization", argv)))
    monkeypatch.setattr(run_all.budget, "main", lambda argv: calls.append(("budget", argv)))
    monkeypatch.setattr(run_all.evidence, "main", lambda argv: calls.append(("evidence", argv)))
    monkeypatch.setattr(run_all.llm, "main", lambda argv: calls.append(("llm", argv)))
    monkeypatch.setattr(run_all.recommend, "main", lambda argv: calls.append(("recommend", argv)))
    monkeypatch.setattr(run_all.vit_backbone, "main", lambda argv: calls.append(("vit_backbone", argv)))
    run_all.main([])
    assert calls == [("overhead", []), ("vit_backbone", []), ("budget", []), ("evidence", []), ("recommend", []),
                     ("llm", [])] + [("generalization", list(p)) for p in run_all.CPU_PLAN]
    for plan in run_all.CPU_PLAN:  # every plan parses (report only, into tmp_path: nothing runs, nothing committed)
        args = list(plan)
        args[args.index("--out") + 1] = str(tmp_path / "out")
        assert real_main([*args, "--runs", str(tmp_path / "runs"), "--report-only"]) == []
    calls.clear()
    run_all.main(["--only", "generalization", "--generalization-args", ""])  # the whole grid
    assert calls == [("generalization", [])]


def test_committed_tables_were_made_by_the_cpu_plan():
    """The calls recorded in each committed generalization.json (earlier calls, then the last) are, in order, the
    CPU_PLAN entries writing to that folder: `make bench` reproduces what is committed, no more and no less."""
    folders = sorted(d for d in os.listdir(RESULTS) if d != "quick"
                     and os.path.isfile(os.path.join(RESULTS, d, "generalization.json")))
    assert {"fmnist", "wordnet"} <= set(folders)
    assert {p[p.index("--out") + 1] for p in run_all.CPU_PLAN} == {os.path.join(RESULTS, d) for d in folders}
    for folder in folders:
        with open(os.path.join(RESULTS, folder, "generalization.json")) as f:
            meta = json.load(f)["meta"]
        recorded = [*(c["command"] for c in meta.get("earlier_calls") or []), meta["command"]]
        recorded = [[a for a in shlex.split(c[len(cli.COMMAND):]) if a != "--report-only"] for c in recorded]
        planned = [[os.path.relpath(a, ROOT) if a.startswith(RESULTS) else a for a in p]
                   for p in run_all.CPU_PLAN if p[p.index("--out") + 1] == os.path.join(RESULTS, folder)]
        assert recorded == planned, folder


def test_no_counterparts_runs_exactly_the_given_methods(tmp_path, monkeypatch):
    runner = SpecRecorder()
    monkeypatch.setattr(gen, "default_runner", runner)
    gen.main(["--tasks", "wordnet", "--settings", "8", "--no-search", "--no-counterparts", "--methods", "lora+tsrs",
              "--seeds", "0", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert [s.method for s in runner.specs] == ["lora+tsrs"]


def test_merge_keeps_other_groups_and_replaces_its_own(tmp_path, monkeypatch):
    out = tmp_path / "out"
    gen_results.write_outputs(_hand_records(), {"date": "d0", "command": "first call"}, str(out))  # lora, lora+tsrs
    monkeypatch.setattr(gen, "default_runner", SpecRecorder())
    common = ["--tasks", "wordnet", "--settings", "8", "--no-search", "--seeds", "0", "1",
              "--runs", str(tmp_path / "runs"), "--out", str(out)]
    gen.main([*common, "--methods", "pace-fast", "lora+tsrs", "--no-counterparts", "--merge"])
    data = json.loads((out / "generalization.json").read_text())
    methods = {r["method"] for r in data["runs"]}
    assert methods == {"lora", "lora+tsrs", "pace-fast"}
    # lora kept from the earlier file (5 seeds + its unselected selection run); lora+tsrs replaced by this call's
    assert sum(r["method"] == "lora" for r in data["runs"]) == 6
    assert sorted(r["seed"] for r in data["runs"] if r["method"] == "lora+tsrs") == [0, 1]
    assert {p["method"] for p in data["paired"]} == {"lora+tsrs"}  # the new runs pair with the kept lora rows
    assert data["meta"]["earlier_calls"] == [{"date": "d0", "command": "first call"}]
    assert "Merged (`--merge`) with the other methods' rows of d0; `first call`." in (out / "generalization.md").read_text()
    # the same call again: nothing new runs, its own groups are replaced, the earlier call is listed once
    again = SpecRecorder()
    monkeypatch.setattr(gen, "default_runner", again)
    gen.main([*common, "--methods", "pace-fast", "lora+tsrs", "--no-counterparts", "--merge"])
    assert again.specs == []
    assert json.loads((out / "generalization.json").read_text())["meta"]["earlier_calls"] == data["meta"]["earlier_calls"]
    assert len(json.loads((out / "generalization.json").read_text())["runs"]) == len(data["runs"])
    # without --merge the file holds this call's rows only
    gen.main([*common, "--methods", "pace-fast", "--no-counterparts"])
    assert {r["method"] for r in json.loads((out / "generalization.json").read_text())["runs"]} == {"pace-fast"}


def test_merge_refuses_a_foreign_json(tmp_path):
    (tmp_path / "generalization.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="drop --merge"):
        gen_results.read_results(str(tmp_path))
    assert gen_results.read_results(str(tmp_path / "missing")) == ([], {})


def test_lr_only_searches_the_learning_rate_at_the_first_grid_point(tmp_path, monkeypatch):
    runner = SpecRecorder()
    monkeypatch.setattr(gen, "default_runner", runner)
    out = tmp_path / "out"
    gen.main(["--tasks", "wordnet", "--settings", "32", "--lr-multipliers", "1", "0.2", "--lr-only", "--methods",
              "lora+tsrs", "--no-counterparts", "--seeds", "0", "1", "--runs", str(tmp_path / "runs"),
              "--out", str(out)])
    base = grid.default_lr(grid.TASKS["wordnet"], METHOD["lora+tsrs"])
    selection = [s for s in runner.specs if s.seed == 0]
    assert sorted(s.lr for s in selection) == sorted([base, 0.2 * base])  # 2 lrs, not 2 lrs x 2 TSRS weights
    assert {s.hparams for s in runner.specs} == {registry.TSRS_GRID[0]}
    # FakeRunner's validation accuracy peaks at lr 1e-2, so the larger rate is chosen and seed 1 runs at it
    assert [s.lr for s in runner.specs if s.seed == 1] == [base]
    report = (out / "generalization.md").read_text()
    assert "`--lr-only`" in report and "chosen per (task, setting, method) on seed 0's validation" in report
    data = json.loads((out / "generalization.json").read_text())
    assert data["meta"]["lr_only"] is True and data["meta"]["search"] is True
    with pytest.raises(SystemExit):
        gen.main(["--no-search", "--lr-only"])


def _two_seed_wordnet_call(tmp_path, monkeypatch, *args: str):
    """``benchmarks.generalization --tasks wordnet --no-counterparts --seeds 0 1 ARGS`` with nothing trained: the
    specs it would train, in order, the written meta and the Markdown report."""
    runner = SpecRecorder()
    monkeypatch.setattr(gen, "default_runner", runner)
    out = tmp_path / "out"
    gen.main(["--tasks", "wordnet", *args, "--no-counterparts", "--seeds", "0", "1",
              "--runs", str(tmp_path / "runs"), "--out", str(out)])
    meta = json.loads((out / "generalization.json").read_text())["meta"]
    return runner.specs, meta, (out / "generalization.md").read_text()


def test_tsrs_weights_set_the_lambda_grid_and_keep_the_run_names(tmp_path, monkeypatch):
    # the default grid's run names are those of the committed runs (tsrs_weight0.1, tsrs_weight1.0)
    assert [grid.config_tag(0.01, h) for h in registry.TSRS_GRID] == ["lr0.01-tsrs_weight0.1", "lr0.01-tsrs_weight1.0"]
    specs, meta, report = _two_seed_wordnet_call(tmp_path, monkeypatch, "--settings", "32", "--lr-multipliers", "0.4",
                                                 "--methods", "lora+tsrs", "--tsrs-weights", "0.1", "0.03", "0.01")
    selection = [s.hparams for s in specs if s.seed == 0]
    assert selection == [(f"regularizers.tsrs_weight={w}",) for w in ("0.1", "0.03", "0.01")]
    assert len(specs) == 4  # 3 selection runs on seed 0, then seed 1 at the chosen λ
    assert "TSRS λ ∈ {0.1, 0.03, 0.01}" in report and meta["tsrs_weights"] == [0.1, 0.03, 0.01]
    cmd = meta["command"]
    assert gen_report.call_protocol(cmd) == " (configuration selected on validation, TSRS λ ∈ {0.1, 0.03, 0.01})"
    lr_only = cmd.replace("--tsrs-weights 0.1 0.03 0.01", "--tsrs-weights 0.03 0.1") + " --lr-only"
    assert gen_report.call_protocol(lr_only) == " (learning rate selected on validation, λ = 0.03)"
    # methods without a TSRS term keep their grid; --no-search takes the first λ given
    plan = cli.plan_call(cli.build_parser().parse_args(["--no-search", "--tsrs-weights", "0.03", "1"]))
    grids = {m.key: m.hparams for m in plan.methods}
    assert grids["lora+tsrs"] == grids["rlrr+tsrs+pacefast"] == (("regularizers.tsrs_weight=0.03",),)
    assert grids["pace"] == ((),)
    with pytest.raises(ValueError, match="--tsrs-weights"):
        cli.plan_call(cli.build_parser().parse_args(["--tsrs-weights", "-1"]))


def test_distance_ratios_set_the_self_labeling_radius_grid(tmp_path, monkeypatch):
    shipped = registry.recipe_distance_ratio()
    assert shipped == 0.05  # configs/methods/self_labeling.yaml
    # the recipe's ratio is the empty point: its runs keep the names of the runs made without the grid
    assert registry.distance_grid([0.05, 0.2]) == ((), ("regularizers.distance_ratio=0.2",))
    specs, meta, report = _two_seed_wordnet_call(tmp_path, monkeypatch, "--settings", "8", "--lr-multipliers", "10",
                                                 "--methods", "full+selflabel", "--distance-ratios", "0.05", "0.1", "0.2")
    selection = [s for s in specs if s.seed == 0]
    assert [s.hparams for s in selection] == [(), ("regularizers.distance_ratio=0.1",),
                                             ("regularizers.distance_ratio=0.2",)]
    assert [os.path.basename(s.run_dir) for s in selection] == [
        "lr0.0005-s0", "lr0.0005-distance_ratio0.1-s0", "lr0.0005-distance_ratio0.2-s0"]
    # the override reaches the recipe the run trains with
    from peft_tsrs.app.recipes import load_recipe
    assert load_recipe(list(selection[2].files), list(selection[2].overrides)).regularizers.distance_ratio == 0.2
    assert len(specs) == 4  # 3 selection runs on seed 0, then seed 1 at the chosen ratio
    assert "self-labeling radius ratio ∈ {0.05, 0.1, 0.2}" in report and meta["distance_ratios"] == [0.05, 0.1, 0.2]
    cmd = meta["command"]
    assert gen_report.call_protocol(cmd) == (
        " (configuration selected on validation, self-labeling radius ratio ∈ {0.05, 0.1, 0.2})")
    assert gen_report.call_protocol(cmd + " --lr-only") == (
        " (learning rate selected on validation, λ = 0.1, self-labeling radius ratio = 0.05)")
    # only the self-labeling method gets the grid; --no-search takes its first ratio
    plan = cli.plan_call(cli.build_parser().parse_args(["--no-search", "--distance-ratios", "0.1", "0.05"]))
    grids = {m.key: m.hparams for m in plan.methods}
    assert grids["full+selflabel"] == (("regularizers.distance_ratio=0.1",),)
    assert grids["full"] == ((),) and grids["lora+tsrs"] == registry.TSRS_GRID[:1]
    with pytest.raises(ValueError, match="--distance-ratios"):
        cli.plan_call(cli.build_parser().parse_args(["--distance-ratios", "0"]))


def test_threads_sets_the_torch_threads_of_the_call(tmp_path, monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    _two_seed_wordnet_call(tmp_path, monkeypatch, "--settings", "8", "--no-search", "--methods", "lora",
                           "--threads", "1")
    assert calls == [1]
    with pytest.raises(SystemExit):
        gen.main(["--threads", "0"])
    assert calls == [1]


def test_command_groups_follow_the_cli():
    cmd = "python -m benchmarks.generalization --tasks wordnet --settings 8:0.4 --no-search --methods lora+tsrs"
    assert cli.command_groups(cmd) == {("wordnet", 8, 0.4, "lora"), ("wordnet", 8, 0.4, "lora+tsrs")}
    assert cli.command_groups(cmd + " --no-counterparts") == {("wordnet", 8, 0.4, "lora+tsrs")}
    assert cli.command_groups("first call") is None
    assert cli.command_groups("python -m benchmarks.generalization --methods nope") is None
    assert gen_report.call_protocol(cmd) == " (no search)"
    assert gen_report.call_protocol(cmd.replace("--no-search", "--lr-only")) == (
        " (learning rate selected on validation, λ = 0.1)")
    assert gen_report.call_protocol("first call") == ""


def test_merged_meta_drops_a_call_once_all_its_groups_were_written_again():
    prefix = "python -m benchmarks.generalization --tasks wordnet --no-search --no-counterparts"
    a = {"date": "d1", "command": f"{prefix} --settings 8 --methods lora lora+tsrs"}
    b = {"date": "d2", "command": f"{prefix} --settings 8 --methods lora"}
    foreign = {"date": "d0", "command": "first call"}
    earlier = {"earlier_calls": [foreign, a], "date": b["date"], "command": b["command"]}
    # b replaced half of a; this call the other half: a and b (all of whose groups are written again) are dropped
    now = {"command": f"{prefix} --settings 8 --methods lora+tsrs lora"}
    groups = {("wordnet", 8, 0.0, "lora+tsrs"), ("wordnet", 8, 0.0, "lora")}
    assert gen_results.merged_meta(now, earlier, groups)["earlier_calls"] == [foreign]
    # a call of other groups keeps every earlier one
    other = gen_results.merged_meta({"command": f"{prefix} --settings 32 --methods lora"}, earlier,
                            {("wordnet", 32, 0.0, "lora")})
    assert other["earlier_calls"] == [foreign, a, b]
    # lora+tsrs only: a is covered by b and this call together and goes, b (its lora rows still in) stays
    assert gen_results.merged_meta(now, earlier, {("wordnet", 8, 0.0, "lora+tsrs")})["earlier_calls"] == [foreign, b]
    # a command that does not parse goes only when this call repeats it
    assert gen_results.merged_meta({"command": "first call"}, earlier, set())["earlier_calls"] == [a, b]


def test_a_run_another_process_trains_is_skipped_without_waiting_when_asked(tmp_path):
    """``wait=False`` (a grid shard looking for work): a locked run gives ``None`` at once, and is not trained."""
    from peft_tsrs.app.locking import LockBusy, exclusive

    spec = grid.spec_for(str(tmp_path), grid.TASKS["wordnet"], grid.Setting(8), METHOD["lora"], 0.01, (), 0,
                         "select")
    runner = FakeRunner()
    with running.run_lock(spec.run_dir):
        with pytest.raises(LockBusy):
            with exclusive(f"{spec.run_dir}.lock", wait=False):
                pass
        assert running.execute(spec, runner, log=lambda _: None, wait=False) is None
    assert runner.calls == []
    assert running.execute(spec, runner, log=lambda _: None, wait=False) is not None  # free now: trained
    assert runner.calls == [spec.run_dir]
