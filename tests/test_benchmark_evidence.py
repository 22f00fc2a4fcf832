"""benchmarks.evidence (evidence v2, step 2): equal tuning budget, selection on the mean of two seeds, fresh final
seeds, paired comparisons, resume and sharing between processes."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `benchmarks` without `python -m`

from benchmarks import evidence  # noqa: E402
from benchmarks.ledger import _OPEN, ledger_for  # noqa: E402
from benchmarks.generalization import running  # noqa: E402
from benchmarks.generalization.grid import Setting  # noqa: E402
from benchmarks.methods import EVIDENCE_BY_KEY, EVIDENCE_METHODS  # noqa: E402

CLEAN, NOISY = Setting(8), Setting(8, 0.4)


@pytest.mark.parametrize("method", EVIDENCE_METHODS, ids=lambda m: m.key)
def test_every_method_gets_the_same_number_of_configurations_over_the_same_lr_range(method):
    configs = evidence.configs("wordnet", method)
    assert len(configs) == len(set(configs)) == evidence.CONFIGS_PER_METHOD
    lrs = sorted({c.lr for c in configs})
    centre = evidence.centre_lr("wordnet", method)
    assert lrs[0] == pytest.approx(0.3 * centre, rel=1e-2) and lrs[-1] == pytest.approx(3 * centre, rel=1e-2)
    if method.counterpart:  # 3 learning rates x 3 points of its own knob, centred where its counterpart is
        assert len(lrs) == 3 and centre == evidence.centre_lr("wordnet", EVIDENCE_BY_KEY[method.counterpart])
    else:
        assert len(lrs) == 9


def _recipe(task, setting, key, config, seed=0, epochs=20):
    from peft_tsrs.app.recipes import load_recipe

    s = evidence.spec(task, setting, EVIDENCE_BY_KEY[key], config, seed, epochs, runs="/tmp/unused")
    return s, load_recipe(list(s.files), list(s.overrides))


def test_runs_use_the_budget_the_cosine_schedule_the_official_noise_and_the_knob_point():
    configs = evidence.configs("wordnet", EVIDENCE_BY_KEY["lora+pace"])
    s, r = _recipe("wordnet", NOISY, "lora+pace", configs[0], seed=11)
    assert r.training.epochs == 20 and r.training.lr_scheduler == "cosine" and r.training.warmup_ratio == 0.1
    assert r.task.label_noise == 0.4 and r.task.label_noise_type == "symmetric" and r.task.seed == 11
    assert r.adapter.type == "lora" and r.regularizers.pace_sigma == 0.1 and r.regularizers.pace_weight == 0.02
    assert r.training.learning_rate == configs[0].lr and s.phase == "final"
    _, r = _recipe("wordnet", CLEAN, "pace", evidence.configs("wordnet", EVIDENCE_BY_KEY["pace"])[-1])
    assert r.adapter.type == "pace" and r.adapter.options["sigma"] == 1.0 and r.regularizers.pace_weight == 0.5


@pytest.mark.parametrize("task", ["wordnet", "fmnist"])
def test_low_rank_loras_keep_loras_scaling_and_learning_rates_and_are_compared_with_rlrr(task):
    lora = evidence.configs(task, EVIDENCE_BY_KEY["lora"])
    for r in (1, 2):
        assert evidence.configs(task, EVIDENCE_BY_KEY[f"lora-r{r}"]) == lora
        _, recipe = _recipe(task, CLEAN, f"lora-r{r}", lora[4])
        assert recipe.adapter.type == "lora" and recipe.training.learning_rate == lora[4].lr
        assert (recipe.adapter.options["r"], recipe.adapter.options["lora_alpha"]) == (r, 2 * r)
        assert ("rlrr", f"lora-r{r}") in evidence.BASE_COMPARISONS
        assert all((task, s, f"lora-r{r}") in evidence.PLAN for s in evidence.SETTINGS[task])


def test_full_tsrs_is_the_official_recipe_and_self_labeling_starts_scale_with_the_budget():
    _, r = _recipe("wordnet", CLEAN, "full+tsrs", evidence.configs("wordnet", EVIDENCE_BY_KEY["full+tsrs"])[3])
    assert r.adapter.type == "full" and r.regularizers.tsrs_weight == 0.3
    assert r.regularizers.tsrs_noise_std == 0.2 and r.regularizers.bss_weight == 1e-3 and r.regularizers.bss_k == 1
    last = evidence.configs("wordnet", EVIDENCE_BY_KEY["full+selflabel"])[-1]
    _, r = _recipe("wordnet", NOISY, "full+selflabel", last, epochs=20)
    assert r.regularizers.distance_ratio == 0.2 and r.regularizers.label_correction_threshold == 0.7
    assert (r.regularizers.label_correction_start_epoch, r.regularizers.reweight_start_epoch) == (7, 3)
    _, r = _recipe("wordnet", NOISY, "full+selflabel", last, epochs=80)
    assert (r.regularizers.label_correction_start_epoch, r.regularizers.reweight_start_epoch) == (27, 13)


def _metrics(val, test, val_loss=1.0):
    return {"validation": {"accuracy": val, "loss": val_loss}, "test": {"accuracy": test},
            "train_end": {"accuracy": 1.0, "loss": 0.01}, "generalization_gap": 1.0 - test,
            "seconds_per_step": 0.5, "train_steps": 10, "peak_memory_mb": 100.0}


class Runner:
    """Writes a metrics.json as a finished run would; validation accuracy from ``val(spec)``."""

    def __init__(self, val):
        self.val, self.calls = val, []

    def __call__(self, spec):
        self.calls.append(spec)
        metrics = _metrics(self.val(spec), 0.5 + 0.01 * spec.seed)
        os.makedirs(spec.run_dir, exist_ok=True)
        path = os.path.join(spec.run_dir, "metrics.json")
        with open(f"{path}.tmp", "w") as fh:  # whole or absent, as a real run folder appears (renamed when done)
            json.dump(metrics, fh)
        os.replace(f"{path}.tmp", path)
        return metrics


def test_selection_uses_the_mean_of_both_seeds_then_trains_the_fresh_seeds_once(tmp_path):
    method = EVIDENCE_BY_KEY["lora"]
    configs = evidence.configs("wordnet", method)
    best_seed0, best_mean = configs[2].lr, configs[5].lr
    table = {(best_seed0, 0): 0.9, (best_seed0, 1): 0.1, (best_mean, 0): 0.6, (best_mean, 1): 0.6}
    runner = Runner(lambda s: table.get((s.lr, s.seed), 0.3))
    group = evidence.run_group("wordnet", CLEAN, method, 20, runner=runner, runs=str(tmp_path))
    assert group["selected"] == {"lr": best_mean, "hparams": []}
    assert len(runner.calls) == 9 * 2 + 5
    assert [r["seed"] for r in group["final"]] == list(evidence.FINAL_SEEDS)
    assert all(r["lr"] == best_mean and r["phase"] == "final" for r in group["final"])
    # resume: everything is read back, nothing trains again
    again = evidence.run_group("wordnet", CLEAN, method, 20, runner=Runner(lambda s: pytest.fail("retrained")),
                               runs=str(tmp_path))
    assert again == group


def test_two_shards_split_the_runs_and_a_read_only_call_waits_for_none(tmp_path):
    method = EVIDENCE_BY_KEY["rlrr+tsrs"]
    assert evidence.run_group("wordnet", CLEAN, method, 20, runner=None, runs=str(tmp_path)) is None
    first = Runner(lambda s: 0.6 if s.lr == evidence.centre_lr("wordnet", method) else 0.5)  # no edge check
    evidence._run_all([evidence.spec("wordnet", CLEAN, method, c, seed, 20, str(tmp_path))
                       for c in evidence.configs("wordnet", method) for seed in evidence.SELECT_SEEDS], (0, 2), None,
                      str(tmp_path))
    assert first.calls == []  # read only: trains nothing
    evidence.run_group("wordnet", CLEAN, method, 20, shard=(0, 2), runner=first, runs=str(tmp_path))
    # the first shard trained its own half first, then the rest nobody else had started
    assert len(first.calls) == 23 and [s.seed for s in first.calls[:9]] == [0] * 9


def test_a_shard_trains_the_runs_nobody_holds_before_waiting_for_a_held_one(tmp_path):
    """The other shard still trains one selection run: this shard starts every other run of the group first, and
    waits for the held one only at the end (then reads it, not trains it)."""
    import threading

    method = EVIDENCE_BY_KEY["lora"]
    specs = [evidence.spec("wordnet", CLEAN, method, c, seed, 20, str(tmp_path))
             for c in evidence.configs("wordnet", method) for seed in evidence.SELECT_SEEDS]
    held, other = specs[1], Runner(lambda s: 0.5)
    holding, release = threading.Event(), threading.Event()

    def other_shard():
        with running.run_lock(held.run_dir):
            holding.set()
            assert release.wait(20)
            other(held)  # writes its metrics.json
    thread = threading.Thread(target=other_shard)
    thread.start()
    assert holding.wait(10)
    mine = Runner(lambda s: 0.4)

    def train(s):  # the other shard finishes once this one has started every run nobody held
        metrics = mine(s)
        if len(mine.calls) == len(specs) - 1:
            release.set()
        return metrics
    result = evidence._run_all(specs, (0, 2), train, str(tmp_path))
    thread.join(10)
    assert held.run_dir not in [s.run_dir for s in mine.calls] and len(mine.calls) == len(specs) - 1
    assert result[1]["validation"]["accuracy"] == 0.5


def _wipe_run_folders(runs):
    """What a new machine sees: the committed ledger, no ``runs/`` folders."""
    import shutil

    for entry in os.listdir(runs):
        if os.path.isdir(os.path.join(runs, entry)):
            shutil.rmtree(os.path.join(runs, entry))


def test_a_new_machine_resumes_the_grid_from_the_ledger_without_the_run_folders(tmp_path):
    method = EVIDENCE_BY_KEY["lora"]
    group = evidence.run_group("wordnet", CLEAN, method, 20, runner=Runner(lambda s: 0.1 * (s.lr > 0.01)),
                               runs=str(tmp_path))
    assert len(ledger_for(str(tmp_path))) == 9 * 2 + 5
    _wipe_run_folders(tmp_path)
    again = evidence.run_group("wordnet", CLEAN, method, 20, runner=Runner(lambda s: pytest.fail("retrained")),
                               runs=str(tmp_path))
    assert again == group and evidence.run_group("wordnet", CLEAN, method, 20, runner=None, runs=str(tmp_path)) == group


def test_the_ledger_is_restored_from_a_written_report_and_resumes_it(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    method = EVIDENCE_BY_KEY["lora"]
    group = evidence.run_group("wordnet", CLEAN, method, 20, runner=Runner(lambda s: s.lr), runs=str(runs))
    evidence.write([group], out=str(out))
    _wipe_run_folders(runs)
    os.remove(runs / "ledger.jsonl")
    _OPEN.clear()
    assert evidence.run_group("wordnet", CLEAN, method, 20, runner=None, runs=str(runs)) is None
    assert evidence.restore_ledger(str(out / "evidence.json"), runs=str(runs)) == 23
    assert evidence.restore_ledger(str(out / "evidence.json"), runs=str(runs)) == 0  # once
    # a report keeps only an edge check's means: its two runs train again, nothing else does
    assert "edge_check" in group
    restored = evidence.run_group("wordnet", CLEAN, method, 20, runner=None, runs=str(runs))
    assert restored == {k: v for k, v in group.items() if k != "edge_check"}
    runner = Runner(lambda s: s.lr)
    assert evidence.run_group("wordnet", CLEAN, method, 20, runner=runner, runs=str(runs)) == group
    assert [(s.lr, s.seed) for s in runner.calls] == [(group["edge_check"]["lr"], seed) for seed in (0, 1)]


def test_a_line_cut_by_a_killed_process_only_reruns_that_run(tmp_path):
    from benchmarks.ledger import Ledger

    path = tmp_path / "l.jsonl"
    ledger = Ledger(str(path), root=str(tmp_path))
    ledger.add(str(tmp_path / "a"), _metrics(0.5, 0.4))
    with open(path, "a") as fh:
        fh.write('{"run": "b", "metrics": {"vali')  # killed mid-write
    fresh = Ledger(str(path), root=str(tmp_path))
    with pytest.warns(UserWarning, match="l.jsonl:2: not a JSON line"):
        assert fresh.get(str(tmp_path / "a"))["validation"]["accuracy"] == 0.5
    assert fresh.get(str(tmp_path / "b")) is None
    fresh.add(str(tmp_path / "b"), _metrics(0.7, 0.6))  # starts a line of its own
    with pytest.warns(UserWarning):
        again = Ledger(str(path), root=str(tmp_path))
        assert again.get(str(tmp_path / "b"))["validation"]["accuracy"] == 0.7 and len(again) == 2


def _group(method, counterpart, tests, lr=0.01):
    return {"task": "wordnet", "setting": "8shot-noise0", "method": method, "counterpart": counterpart, "epochs": 20,
            "selected": {"lr": lr, "hparams": []}, "selection": [{"lr": x} for x in (0.005, 0.01, 0.02)],
            "final": [{"seed": seed, "config": f"lr{lr}", "test_accuracy": t, "train_accuracy": 1.0,
                       "validation_accuracy": 0.5, "generalization_gap": 1.0 - t, "seconds_per_step": 0.5,
                       "peak_memory_mb": 100.0, "trainable_parameters": 1000} for seed, t in zip(evidence.FINAL_SEEDS, tests)]}


def test_comparison_is_paired_by_seed_with_scipys_tests(tmp_path):
    from scipy import stats

    base, method = [0.50, 0.52, 0.54, 0.56, 0.58], [0.52, 0.53, 0.57, 0.55, 0.61]
    c = evidence.compare(_group("lora+pace", "lora", method), _group("lora", None, base))
    diffs = [m - b for m, b in zip(method, base)]
    assert c["diff_mean"] == pytest.approx(sum(diffs) / 5) and (c["wins"], c["losses"]) == (4, 1)
    assert c["p_t"] == pytest.approx(stats.ttest_rel(method, base).pvalue)
    assert c["p_sign"] == pytest.approx(stats.binomtest(4, 5, 0.5).pvalue)
    evidence.write([_group("lora", None, base), _group("lora+pace", "lora", method)], out=str(tmp_path))
    md = (tmp_path / "evidence.md").read_text()
    assert "| wordnet | 8shot-noise0 | lora+pace | lora | +1.6 ± 1.7 |" in md
    assert "| wordnet | 8shot-noise0 | 20 | lora | 1000 | lr0.01 | 100.0 ± 0.0 | 50.0 ± 0.0 | 54.0 ± 3.2 |" in md
    data = json.loads((tmp_path / "evidence.json").read_text())
    assert [s["method"] for s in data["summaries"]] == ["lora", "lora+pace"] and len(data["comparisons"]) == 1


def test_the_bases_are_compared_with_each_other(tmp_path):
    evidence.write([_group("full", None, [0.5] * 5), _group("lora", None, [0.6] * 5), _group("rlrr", None, [0.7] * 5)],
                   out=str(tmp_path))
    pairs = {(c["method"], c["counterpart"]): round(c["diff_mean"], 6)
             for c in json.loads((tmp_path / "evidence.json").read_text())["comparisons"]}
    assert pairs == {("rlrr", "lora"): 0.1, ("rlrr", "full"): 0.2, ("lora", "full"): 0.1}


def test_llm_track_runs_three_seeds_of_each_method_on_the_task_files_budget(tmp_path):
    from benchmarks import llm
    from peft_tsrs.app.recipes import load_recipe

    specs = llm.specs(str(tmp_path))
    assert [(s.method, s.seed) for s in specs[:3]] == [("lora", 0), ("lora+pace", 0), ("lora+tsrs", 0)]
    assert len(specs) == 9 and {s.seed for s in specs} == {0, 1, 2}
    recipes = {s.method: load_recipe(list(s.files), list(s.overrides)) for s in specs if s.seed == 2}
    assert all(r.task.name == "wordnet_chat" and r.task.seed == 2 and r.training.epochs == 2 for r in recipes.values())
    assert (recipes["lora+pace"].regularizers.pace_sigma, recipes["lora+pace"].regularizers.pace_weight) == (0.1, 1e-3)
    assert recipes["lora+tsrs"].regularizers.tsrs_weight == 1.0 and recipes["lora"].regularizers.pace_weight == 0


def test_llm_report_pairs_each_method_with_lora_by_seed(tmp_path):
    from benchmarks import llm

    def group(method, counterpart, em):
        return {"task": "wordnet_chat", "setting": "4shot-noise0", "method": method, "counterpart": counterpart,
                "epochs": None, "selected": {"lr": 1e-3, "hparams": []},
                "final": [{"seed": s, "config": "lr0.001", "test_accuracy": e, "validation_accuracy": e,
                           "train_accuracy": None, "generalization_gap": None, "seconds_per_step": 5.0,
                           "peak_memory_mb": None, "trainable_parameters": 10} for s, e in zip(llm.SEEDS, em)]}

    llm.write([group("lora", None, [0.3, 0.35, 0.4]), group("lora+pace", "lora", [0.32, 0.34, 0.45])], str(tmp_path))
    md = (tmp_path / "llm.md").read_text()
    assert "| lora | 3 | 35.0 ± 5.0 | 35.0 ± 5.0 | 5.0 |" in md
    assert "| lora+pace | lora | +2.0 ± 3.0 |" in md and "| 2 / 1 |" in md


def test_a_generative_run_is_logged_and_reported_by_its_exact_match(tmp_path):
    from benchmarks import llm
    from benchmarks.generalization.running import execute

    def runner(spec):
        metrics = {"metric": "exact_match", "validation": {"exact_match": 0.25, "loss": 1.0},
                   "test": {"exact_match": 0.3 + 0.01 * spec.seed}, "seconds_per_step": 5.0, "train_steps": 24}
        os.makedirs(spec.run_dir, exist_ok=True)
        with open(os.path.join(spec.run_dir, "metrics.json"), "w") as fh:
            json.dump(metrics, fh)
        return metrics

    lines = []
    spec = llm.specs(str(tmp_path))[0]
    execute(spec, runner, log=lines.append)
    assert lines == [f"    ran wordnet_chat/4shot-noise0/lora/lr0.001-s0: val 0.2500 test 0.3000 ({lines[0].split('(')[1]}"]
    found = llm.groups(runner=runner, runs=str(tmp_path))
    assert [g["method"] for g in found] == ["lora", "lora+pace", "lora+tsrs"]
    assert [r["test_accuracy"] for r in found[0]["final"]] == [0.3, 0.31, 0.32]


def test_a_learning_rate_selected_at_the_edge_of_its_grid_is_marked(tmp_path):
    groups = [_group("lora", None, [0.5] * 5, lr=0.02), _group("rlrr", None, [0.5] * 5, lr=0.005),
              _group("full", None, [0.5] * 5)]
    assert [evidence.lr_edge(g) for g in groups] == ["high", "low", None]
    evidence.write(groups, out=str(tmp_path))
    md = (tmp_path / "evidence.md").read_text()
    assert "| lora | 1000 | lr0.02 ↑ |" in md and "| rlrr | 1000 | lr0.005 ↓ |" in md and "| full | 1000 | lr0.01 |" in md


def test_each_ablation_follows_its_method_in_the_plan_where_the_method_runs():
    for task, setting, key in evidence.PLAN:
        if key in evidence.ABLATION_BY_KEY:
            parent = evidence.ABLATION_BY_KEY[key].parent
            before = [k for t, s, k in evidence.PLAN[:evidence.PLAN.index((task, setting, key))] if (t, s) == (task, setting)]
            assert parent in before
    noisy = {k for t, s, k in evidence.PLAN if t == "wordnet" and s.noise}
    clean = {k for t, s, k in evidence.PLAN if t == "wordnet" and not s.noise}
    assert "full+selflabel-no-correction" in noisy and "full+selflabel-no-correction" not in clean
    assert {"pace-no-consistency", "lora+pace-no-consistency", "full+tsrs-no-bss", "full+tsrs-bss-only"} <= clean & noisy


@pytest.mark.parametrize("key", [a.key for a in evidence.ABLATIONS])
def test_an_ablation_trains_the_final_seeds_at_its_methods_choice_with_one_term_off(tmp_path, key):
    from peft_tsrs.app.recipes import load_recipe

    ablation = evidence.ABLATION_BY_KEY[key]
    setting = NOISY
    assert evidence.run_ablation("wordnet", setting, ablation, 30, runner=None, runs=str(tmp_path)) is None
    parent = EVIDENCE_BY_KEY[ablation.parent]
    chosen = evidence.configs("wordnet", parent)[4]
    evidence.run_group("wordnet", setting, parent, 30, runs=str(tmp_path),
                       runner=Runner(lambda s: 0.9 if (s.lr, s.hparams) == (chosen.lr, chosen.hparams) else 0.3))
    runner = Runner(lambda s: 0.5)
    group = evidence.run_ablation("wordnet", setting, ablation, 30, runner=runner, runs=str(tmp_path))
    assert [s.seed for s in runner.calls] == list(evidence.FINAL_SEEDS)
    assert group["selected"] == {"lr": chosen.lr, "hparams": list(chosen.hparams)} and group["counterpart"] == parent.key
    parent_spec = evidence.spec("wordnet", setting, parent, chosen, 10, 30)
    full = load_recipe(list(parent_spec.files), list(parent_spec.overrides))
    off = load_recipe(list(runner.calls[0].files), list(runner.calls[0].overrides))
    full, off = full.regularizers, off.regularizers
    changed = {f for f in vars(full) if getattr(full, f) != getattr(off, f)}
    assert changed == {o.split("=")[0].split(".")[1] for o in ablation.overrides}
    assert all(getattr(off, f) in (0, None) for f in changed) and all(getattr(full, f) not in (0, None) for f in changed)
    assert evidence.run_any("wordnet", setting, key, 30, runner=None, runs=str(tmp_path)) == group


def test_an_ablation_is_compared_with_its_method_and_the_methods_counterpart(tmp_path):
    groups = [_group("full", None, [0.5] * 5), _group("full+tsrs", "full", [0.6] * 5),
              _group("full+tsrs-no-bss", "full+tsrs", [0.55] * 5)]
    evidence.write(groups, out=str(tmp_path))
    pairs = {(c["method"], c["counterpart"]): round(c["diff_mean"], 6)
             for c in json.loads((tmp_path / "evidence.json").read_text())["comparisons"]}
    assert pairs == {("full+tsrs", "full"): 0.1, ("full+tsrs-no-bss", "full+tsrs"): -0.05,
                     ("full+tsrs-no-bss", "full"): 0.05}


def test_rlrr_as_the_official_vit_code_runs_it_is_searched_like_a_base_and_compared_with_rlrr_and_lora(tmp_path):
    from peft_tsrs.app.recipes import load_recipe

    official = [(t, s.key, k) for t, s, k in evidence.PLAN if k in ("rlrr+ssf", "rlrr-kaiming")]
    assert official == [("wordnet", "8shot-noise0", "rlrr-kaiming")] + [
        ("fmnist", s, k) for s in ("8shot-noise0", "32shot-noise0") for k in ("rlrr+ssf", "rlrr-kaiming")]
    rlrr, ssf, kaiming = (EVIDENCE_BY_KEY[k] for k in ("rlrr", "rlrr+ssf", "rlrr-kaiming"))
    assert evidence.configs("fmnist", ssf) == evidence.configs("fmnist", rlrr)  # the same 9 learning rates
    for method, option in ((ssf, {"ssf": True}), (kaiming, {"init_weights": "kaiming"})):
        s = evidence.spec("fmnist", CLEAN, method, evidence.configs("fmnist", method)[0], 10, 40)
        plain = evidence.spec("fmnist", CLEAN, rlrr, evidence.configs("fmnist", rlrr)[0], 10, 40)
        options, base = (load_recipe(list(x.files), list(x.overrides)).adapter.options for x in (s, plain))
        assert {k: v for k, v in options.items() if base.get(k) != v} == option
    groups = [_group("lora", None, [0.6] * 5), _group("lora-r1", None, [0.58] * 5), _group("rlrr", None, [0.5] * 5),
              _group("rlrr+ssf", None, [0.55] * 5)]
    evidence.write(groups, out=str(tmp_path))
    pairs = {(c["method"], c["counterpart"]): round(c["diff_mean"], 6)
             for c in json.loads((tmp_path / "evidence.json").read_text())["comparisons"]}
    assert pairs[("rlrr+ssf", "rlrr")] == 0.05 and pairs[("rlrr+ssf", "lora")] == -0.05
    assert pairs[("rlrr+ssf", "lora-r1")] == -0.03


def test_an_edge_choice_is_checked_one_grid_step_further_without_changing_the_selection(tmp_path):
    method = EVIDENCE_BY_KEY["rlrr+tsrs"]
    candidates = evidence.configs("wordnet", method)
    top = max(c.lr for c in candidates)
    knob = candidates[0].hparams
    runner = Runner(lambda s: 0.8 if (s.lr, s.hparams) == (top, knob) else 0.95 if s.lr > top else 0.3)
    group = evidence.run_group("wordnet", CLEAN, method, 20, runner=runner, runs=str(tmp_path))
    assert group["selected"] == {"lr": top, "hparams": list(knob)}  # the check does not change the choice
    assert len(runner.calls) == 9 * 2 + 5 + 2 and all(s.seed in evidence.SELECT_SEEDS for s in runner.calls[-2:])
    beyond = group["edge_check"]["lr"]
    assert beyond == pytest.approx(3 * top, rel=1e-2) and all(s.hparams == knob for s in runner.calls[-2:])
    assert group["edge_check"]["validation_accuracy"] == pytest.approx(0.95)
    assert group["edge_check"]["selected_validation_accuracy"] == pytest.approx(0.8)
    evidence.write([group], out=str(tmp_path / "out"))
    assert f"| wordnet | 8shot-noise0 | rlrr+tsrs | {top:.3g} | 80.0 | {beyond:.3g} | 95.0 |" in \
        (tmp_path / "out" / "evidence.md").read_text()
    # a bottom-edge choice is checked one step further down
    low = Runner(lambda s: 0.9 if s.lr == min(c.lr for c in candidates) else 0.3)
    group = evidence.run_group("wordnet", CLEAN, method, 20, runner=low, runs=str(tmp_path / "low"))
    lrs = sorted({c.lr for c in candidates})
    assert group["edge_check"]["lr"] == pytest.approx(lrs[0] * lrs[0] / lrs[1], rel=1e-2)
    assert len(low.calls) == 23 + 2
    # an interior choice is not checked
    inner = Runner(lambda s: 0.9 if s.lr == candidates[1].lr else 0.3)
    assert "edge_check" not in evidence.run_group("wordnet", CLEAN, method, 20, runner=inner, runs=str(tmp_path / "b"))
    assert len(inner.calls) == 23


def _finished(method, lr_val):
    """A finished group of ``method`` on wordnet, 8 shots clean, whose selection runs score ``lr_val(config)``."""
    return {"task": "wordnet", "setting": "8shot-noise0", "method": method.key, "counterpart": method.counterpart,
            "epochs": 20, "selection": [{"lr": c.lr, "hparams": list(c.hparams), "validation_accuracy": lr_val(c)}
                          for c in evidence.configs("wordnet", method) for _ in evidence.SELECT_SEEDS]}


def test_the_recommended_recipe_is_the_best_mean_validation_over_settings_and_reproduces_its_runs(tmp_path):
    from benchmarks import recommend
    from peft_tsrs.app.recipes import load_recipe

    method = EVIDENCE_BY_KEY["full+tsrs"]
    configs = evidence.configs("wordnet", method)
    a, b = configs[1], configs[7]
    first = _finished(method, lambda c: {a: 0.9, b: 0.8}.get(c, 0.1))
    second = dict(_finished(method, lambda c: {a: 0.5, b: 0.8}.get(c, 0.1)), setting="8shot-noise40")
    assert recommend.best_config([first])[:2] == (a.lr, a.hparams)
    assert recommend.best_config([first, second]) == (b.lr, b.hparams, pytest.approx(0.8))  # mean 0.8 > 0.7
    folder = tmp_path / "recommended" / "wordnet"
    folder.mkdir(parents=True)
    path = folder / "full_tsrs.yaml"
    path.write_text(recommend.render("wordnet", method, [first, second], {
        "select_seeds": [0, 1], "summaries": [], "comparisons": []}))
    # the file stands in for the method's files: same adapter, regularizers, learning rate and schedule as the grid
    # run at that configuration (its base path resolves from configs/methods/recommended/<task>/)
    assert "--override training.epochs=20" in path.read_text()  # the task's budget, not another task's
    text = path.read_text().replace("base: ../../", f"base: {os.path.join(evidence.ROOT, 'configs', 'methods')}/")
    path.write_text(text)
    s = evidence.spec("wordnet", CLEAN, method, b, 10, 20, runs="/tmp/unused")
    grid = load_recipe(list(s.files), list(s.overrides))
    mine = load_recipe([s.files[0], str(path)], [o for o in s.overrides if o.startswith(("task.", "training.epochs",
                                                                                         "output_dir", "name"))])
    assert mine.adapter == grid.adapter and mine.regularizers == grid.regularizers
    for key in ("learning_rate", "lr_scheduler", "warmup_ratio"):
        assert getattr(mine.training, key) == getattr(grid.training, key)


def test_what_to_expect_lists_each_method_against_its_counterpart_with_gain_regime_and_cost(tmp_path):
    from benchmarks import recommend

    base, method = _group("lora", None, [0.50, 0.52, 0.54, 0.56, 0.58]), _group("lora+pace", "lora", [0.52] * 5)
    method["final"] = [dict(r, seconds_per_step=0.75, train_accuracy=0.98) for r in method["final"]]
    ablation = dict(_group("lora+pace-no-consistency", "lora+pace", [0.4] * 5), selection=[])
    evidence.write([base, method, ablation], out=str(tmp_path))
    table = recommend.expectations(json.loads((tmp_path / "evidence.json").read_text()))
    rows = [line for line in table.splitlines() if line.startswith("| wordnet")]
    assert rows == ["| wordnet | 8shot-noise0 | lora+pace | lora | -2.0 ± 3.2 | 0.230 | 1 / 3 | 98.0 | 1.50 |"]


def test_a_bases_recommended_recipe_names_its_comparisons_with_the_other_bases(tmp_path):
    from benchmarks import recommend

    groups = [_group("lora", None, [0.6] * 5), _group("rlrr", None, [0.5] * 5),
              _group("rlrr-kaiming", None, [0.55, 0.56, 0.57, 0.58, 0.59])]
    for g in groups:
        g["selection"] = [{"lr": 0.01, "hparams": [], "validation_accuracy": 0.5}]
    evidence.write(groups, out=str(tmp_path))
    recommend.write(json.loads((tmp_path / "evidence.json").read_text()), str(tmp_path / "recommended"))
    text = (tmp_path / "recommended" / "wordnet" / recommend.file_name("rlrr-kaiming")).read_text()
    assert "#     vs rlrr: +7.0 ± 1.6 points" in text and "#     vs lora: -3.0 ± 1.6 points" in text
    assert "adapter:\n  init_weights: kaiming" in text
