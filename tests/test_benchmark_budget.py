"""benchmarks.budget (evidence v2, step 1): the ladder's runs and the choice of the converged-regime budget."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `benchmarks` without `python -m`

from benchmarks import budget  # noqa: E402
from benchmarks.generalization.grid import Setting  # noqa: E402


def test_a_ladder_run_is_the_base_recipe_with_a_cosine_schedule_and_the_official_noise():
    from peft_tsrs.app.recipes import load_recipe

    spec = budget.ladder_spec("wordnet", Setting(8, 0.4), "lora", 20)
    recipe = load_recipe(list(spec.files), list(spec.overrides))
    assert recipe.training.lr_scheduler == "cosine" and recipe.training.epochs == 20
    assert recipe.task.label_noise == 0.4 and recipe.task.label_noise_type == "symmetric"
    assert recipe.training.learning_rate == spec.lr == 5e-3  # LoRA's centre on WordNet
    assert recipe.run_dir == spec.run_dir and spec.run_dir.endswith(os.path.join("8shot-noise40", "lora", "ep20"))


def _row(method, epochs, acc, setting="8shot-noise0"):
    return {"task": "wordnet", "setting": setting, "method": method, "epochs": epochs, "train_accuracy": acc}


def test_the_budget_is_the_largest_first_fitting_budget_of_the_bases():
    rows = [_row("full", 10, 0.99), _row("lora", 10, 0.7), _row("lora", 20, 0.985), _row("rlrr", 10, 0.9),
            _row("rlrr", 20, 0.95), _row("rlrr", 40, 1.0), _row("pace-base", 10, 0.98)]
    assert budget.budgets(rows, 0.98) == {"wordnet/8shot-noise0": 40}
    # a base that has not fitted yet leaves the budget open
    assert budget.budgets(rows[:-1], 0.98) == {"wordnet/8shot-noise0": None}


def test_a_base_that_never_fits_caps_the_budget_at_the_ladders_top_and_is_named():
    top = budget.LADDER[-1]
    rows = [_row("full", 10, 0.99), _row("lora", 10, 0.99), _row("rlrr", 10, 0.99)]
    rows += [_row("pace-base", e, 0.5 + 0.1 * i) for i, e in enumerate(budget.LADDER)]
    assert rows[-1]["train_accuracy"] < 0.98
    assert budget.budgets(rows, 0.98) == {"wordnet/8shot-noise0": top}
    assert budget.unfitted(rows, 0.98) == {"wordnet/8shot-noise0": [f"pace-base ({rows[-1]['train_accuracy']:.3f})"]}
    md = budget.markdown([{**r, "shots": 8, "label_noise": 0.0, "lr": 1e-2, "train_loss": 1.0,
                           "validation_accuracy": 0.5, "test_accuracy": 0.5, "generalization_gap": 0.0,
                           "seconds_per_step": 0.1, "peak_memory_mb": 1.0} for r in rows],
                         budget.budgets(rows, 0.98), 0.98)
    assert f"- wordnet/8shot-noise0: {top} epochs (pace-base (0.800) still below 98% there)" in md


def test_write_reports_rows_and_budgets(tmp_path):
    full = {**_row("full", 10, 0.99), "shots": 8, "label_noise": 0.0, "lr": 5e-5, "train_loss": 0.05,
            "validation_accuracy": 0.5, "test_accuracy": 0.45, "generalization_gap": 0.54, "seconds_per_step": 0.3,
            "train_steps": 120, "peak_memory_mb": 900.0}
    budget.write([full], 0.98, out=str(tmp_path))
    data = json.loads((tmp_path / "budget.json").read_text())
    assert data["budgets"] == {"wordnet/8shot-noise0": None} and data["runs"] == [full]
    md = (tmp_path / "budget.md").read_text()
    assert "| wordnet | 8shot-noise0 | full | 10 | 5e-05 | 0.990 | 0.050 | 0.500 | 0.450 | +0.540 |" in md
    assert "- wordnet/8shot-noise0: -" in md


def test_full_fine_tuning_climbs_at_v1s_validation_selected_rate():
    from peft_tsrs.app.recipes import load_recipe

    spec = budget.ladder_spec("wordnet", Setting(8), "full", 10)
    assert spec.lr == 5e-4 and load_recipe(list(spec.files), list(spec.overrides)).training.learning_rate == 5e-4


def test_fashion_mnist_runs_use_the_rotation_pretrained_backbone_in_their_own_folders():
    from peft_tsrs.app.recipes import load_recipe

    spec = budget.ladder_spec("fmnist", Setting(32, 0.4), "rlrr", 40)
    model = load_recipe(list(spec.files), list(spec.overrides)).model
    assert (model.name, model.pretrain_epochs, model.pretrain_augment, model.pretrain_rotation_weight) == (
        "fmnist_vit", 4.0, True, 1.0)
    assert os.path.join("budget", "fmnist-rot", "32shot-noise40", "rlrr", "ep40") in spec.run_dir
    assert spec.task == "fmnist"  # rows and budgets keep the task's key
    wordnet = budget.ladder_spec("wordnet", Setting(8), "rlrr", 20)
    assert os.path.join("budget", "wordnet", "8shot-noise0") in wordnet.run_dir


def test_a_new_machine_rebuilds_the_committed_budget_from_the_ledger_alone(tmp_path, monkeypatch):
    """runs/ is not committed: restored into a ledger, the committed budget.json's runs give it back byte for byte,
    and nothing trains (a climb that needed a run would stop short)."""
    from benchmarks.ledger import _OPEN

    monkeypatch.setattr(budget, "RUNS", str(tmp_path / "runs"))
    _OPEN.clear()
    committed = os.path.join(budget.OUT, "budget.json")
    with open(committed) as fh:
        data = json.load(fh)
    assert budget.restore_ledger(committed) == len(data["runs"]) > 0
    rows = [r for task, setting, base in budget.ladders(["wordnet", "fmnist"])
            for r in budget.climb(task, setting, base, data["target_train_accuracy"], train=False)]
    budget.write(rows, data["target_train_accuracy"], out=str(tmp_path))
    with open(committed, "rb") as fh:
        assert (tmp_path / "budget.json").read_bytes() == fh.read()


def test_a_call_for_one_task_keeps_the_other_tasks_budgets(tmp_path, monkeypatch):
    """`budget --tasks wordnet` rewrites budget.json: Fashion-MNIST's finished ladders (read from the ledger) stay in
    it, so the evidence grid keeps their budgets."""
    from benchmarks.ledger import _OPEN

    committed = os.path.join(budget.OUT, "budget.json")
    monkeypatch.setattr(budget, "RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(budget, "OUT", str(tmp_path / "out"))
    _OPEN.clear()
    with open(committed) as fh:
        data = json.load(fh)
    budget.restore_ledger(committed)
    assert budget.main(["--tasks", "wordnet", "--report"]) == 0
    written = json.loads((tmp_path / "out" / "budget.json").read_text())
    assert written["budgets"] == data["budgets"] and written["runs"] == data["runs"]
