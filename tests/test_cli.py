"""The ``peft-tsrs`` command: train, report, demo, push, and its error messages (tiny budgets, no network)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_recipes import TINY, TINY_TASK, check_run_folder

from peft_tsrs.app.cli import main

QUICK = [*TINY, *TINY_TASK["wordnet_minilm"]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One finished `peft-tsrs train` run (module-wide: the push test reuses it)."""
    out = tmp_path_factory.mktemp("cli-train")
    code = main(["train", "--output-dir", str(out), "--name", "cli-run", "--no-progress", "--override", *QUICK])
    assert code == 0
    return out / "cli-run"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    """`peft-tsrs demo` with a tiny budget: (output folder, what it printed)."""
    out = tmp_path_factory.mktemp("cli-demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        # diagnostics on here, so the report's stable-rank / noise-sensitivity columns are filled
        code = main(["demo", "--output-dir", str(out), "--no-progress", "-o", *QUICK, "diagnostics=true"])
    assert code == 0
    return out, printed.getvalue()


@pytest.mark.slow
def test_train(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["method"] == "rlrr" and metrics["train_steps"] == 2
    check_run_folder(str(trained), metrics)
    assert [p.name for p in trained.parent.iterdir()] == ["cli-run"]  # the temporary folder became the run folder


@pytest.mark.slow
def test_train_prints_the_result(tmp_path, capsys):
    code = main(["train", str(Path(__file__).parents[1] / "configs/tasks/wordnet_minilm.yaml"),
                 str(Path(__file__).parents[1] / "configs/methods/lora.yaml"), "--output-dir", str(tmp_path),
                 "--no-progress", "-o", *QUICK])
    assert code == 0
    out = capsys.readouterr().out
    assert "lora: train accuracy" in out and "validation accuracy" in out and "test accuracy" in out
    assert str(tmp_path / "lora") in out
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()
    # the regime the run ended in: its fit of the training labels, the gap to test, the memory it took
    metrics = json.loads((tmp_path / "lora" / "metrics.json").read_text())
    assert {"accuracy", "loss"} <= set(metrics["train"]) and 0 <= metrics["train"]["accuracy"] <= 1
    assert {"accuracy", "loss"} <= set(metrics["train_end"])  # the last step's model, before the selected one
    assert any("train_end_accuracy" in h for h in metrics["history"])
    # ... without taking the place of the last validation (the selection must see every evaluation)
    last = max(h["step"] for h in metrics["history"])
    assert any("eval_accuracy" in h and h["step"] == last for h in metrics["history"])
    assert metrics["generalization_gap"] == pytest.approx(metrics["train"]["accuracy"] - metrics["test"]["accuracy"])
    assert metrics["peak_memory_mb"] > 0 and metrics["seconds_per_step"] > 0


@pytest.mark.slow
def test_demo_runs_both_arms_and_prints_the_table(demo):
    demo_dir, printed = demo
    for arm, method in (("baseline", "rlrr"), ("regularized", "rlrr+pace-fast+tsrs")):
        metrics = json.loads((demo_dir / f"demo-{arm}" / "metrics.json").read_text())
        assert metrics["method"] == method and metrics["train_steps"] == 2  # --override reached both arms
        assert "stable_rank_mean" in metrics["diagnostics"] and "noise_sensitivity" in metrics["diagnostics"]
        assert f"== {arm}: {method} on wordnet (2 shots/class)" in printed
    assert "| task | shots |" in printed
    rows = [line for line in printed.splitlines() if line.startswith("| wordnet | 2 |")]
    assert len(rows) == 2 and any("| rlrr |" in r for r in rows) and any("| rlrr+pace-fast+tsrs |" in r for r in rows)
    assert (demo_dir / "report.md").read_text().count("| wordnet | 2 |") == 2
    assert (demo_dir / "comparison.png").stat().st_size > 1000


@pytest.mark.slow
def test_report_over_two_runs(demo, tmp_path, capsys):
    demo_dir, _ = demo
    runs = [str(demo_dir / "demo-baseline"), str(demo_dir / "demo-regularized")]
    assert main(["report", *runs, "--output", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    table = (tmp_path / "rep" / "report.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| wordnet |")]
    assert len(rows) == 2 and {r.split("|")[4].strip() for r in rows} == {"rlrr", "rlrr+pace-fast+tsrs"}
    assert "nan" not in "".join(rows)  # accuracy, timing, stable rank, noise sensitivity all filled
    assert (tmp_path / "rep" / "comparison.png").stat().st_size > 1000
    assert "report.md" in out and rows[0] in out
    # default output: the runs' common parent
    assert main(["report", *runs]) == 0
    assert (demo_dir / "report.md").is_file()


@pytest.mark.slow
def test_report_keeps_configurations_apart_and_pools_seeds(demo, tmp_path):
    """Two seeds of one configuration are one row (seeds 2); the same method at another learning rate is its own
    row, labelled with what differs (it was averaged in as if it were a seed)."""
    import shutil

    import yaml

    demo_dir, _ = demo
    runs = {}
    for name, changes in (("a-s0", {}), ("a-s1", {("training", "seed"): 1, ("task", "seed"): 1}),
                          ("b-s0", {("training", "learning_rate"): 0.003})):
        runs[name] = tmp_path / name
        shutil.copytree(demo_dir / "demo-baseline", runs[name])
        recipe = yaml.safe_load((runs[name] / "recipe.yaml").read_text())
        for (section, key), value in changes.items():
            recipe[section][key] = value
        recipe["name"] = name
        (runs[name] / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["report", *map(str, runs.values()), "--output", str(tmp_path / "rep")]) == 0
    rows = [line for line in (tmp_path / "rep" / "report.md").read_text().splitlines() if line.startswith("| wordnet")]
    labels = sorted((r.split("|")[4].strip(), r.split("|")[5].strip()) for r in rows)
    assert labels == [("rlrr (learning_rate=0.003)", "1"), ("rlrr (learning_rate=0.01)", "2")]


# --------------------------------------------------------------------------- errors: exit code 2, one readable line
@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--override", "training.epochs"], "must look like section.key=value"),
        (["train", "-o", "training.epoch=3"], "unknown key(s) ['epoch'] in recipe section 'training'; valid keys:"),
        (["train", "-o", "trainig.epochs=3"], "unknown recipe key(s) ['trainig']"),
        (["train", "-o", "adapter.rnk=2"], "unknown option(s) ['rnk'] for adapter.type 'rlrr'"),
        (["train", "-o", "regularizers.tsrs_wieght=1"], "valid keys: tsrs_weight"),
        (["train", "-o", "task.name=mnist"], "task.name must be one of"),
        (["train", "no/such/recipe.yaml"], "recipe file not found: no/such/recipe.yaml"),
        (["train", "-o", "training.epochs=1", "configs/methods/tsrs.yaml"], "put recipe files before --override"),
        (["demo", "-o", "training.epoch=3"], "unknown key(s) ['epoch']"),
        (["report", "no/such/run"], "no finished run (metrics.json)"),
        (["push", "no/such/run", "me/repo"], "run folder not found"),
        # wrong types, NaN, a missing model folder: these used to end in a TypeError / OSError traceback
        (["train", "-o", "training.epochs=abc"], "training.epochs must be a number, got 'abc'"),
        (["train", "-o", "regularizers.tsrs_weight=abc"], "regularizers.tsrs_weight must be a number, got 'abc'"),
        (["train", "-o", "regularizers.tsrs_weight=nan"], "regularizers.tsrs_weight must be a finite number"),
        (["train", "-o", "regularizers.tsrs_weight=.nan"], "regularizers.tsrs_weight must be a finite number"),
        (["train", "-o", "model.name=/no/such/model"], "model.name '/no/such/model': no such model folder"),
        (["train", "-o", "training.batch_size=[1"], "is not valid YAML at line 1"),
        (["demo", "-o", "training.epochs=abc"], "training.epochs must be a number"),
    ],
)
def test_errors_exit_2_with_a_readable_message(argv, message, capsys, tmp_path):
    if argv[0] in ("train", "demo"):
        argv = [*argv[:1], "--output-dir", str(tmp_path / "out"), *argv[1:]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("peft-tsrs: error: ") and message in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err  # one line
    assert not (tmp_path / "out").exists()  # nothing written


def test_broken_yaml_file_is_one_line(tmp_path, capsys):
    (tmp_path / "broken.yaml").write_text("training:\n  epochs: [1\n")
    assert main(["train", str(tmp_path / "broken.yaml"), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"peft-tsrs: error: recipe file {tmp_path / 'broken.yaml'} is not valid YAML at line 3")
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_a_nan_weight_in_a_recipe_file_is_refused_not_recorded_as_another_method(tmp_path, capsys):
    """`tsrs_weight: .nan` used to switch TSRS off silently and exit 0 with the run recorded as plain `rlrr`."""
    (tmp_path / "tsrs.yaml").write_text("regularizers:\n  tsrs_weight: .nan\n")
    code = main(["train", str(tmp_path / "tsrs.yaml"), "--output-dir", str(tmp_path / "out"), "--no-progress",
                 "-o", *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and "regularizers.tsrs_weight must be a finite number, got nan" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def _fail(*args, **kwargs):
    raise RuntimeError("boom\nsecond line")


def test_a_failing_run_leaves_no_folder_and_keeps_the_previous_run(tmp_path, monkeypatch, capsys):
    """recipe.yaml used to be written before anything was built: a failed run left a partial folder behind."""
    import peft_tsrs.app.run as run

    monkeypatch.setattr(run, "build_task", _fail)
    out = tmp_path / "new" / "runs"  # parents that do not exist yet: removed again
    assert main(["train", "--output-dir", str(out), "--name", "r", "--no-progress", "-o", *QUICK]) == 1
    err = capsys.readouterr().err
    assert err.startswith("peft-tsrs: error: RuntimeError: boom second line") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "new").exists()
    # a rerun that fails leaves the earlier run folder of that name as it was
    earlier = tmp_path / "runs" / "r"
    earlier.mkdir(parents=True)
    (earlier / "recipe.yaml").write_text("name: r\n")
    (earlier / "metrics.json").write_text("{}")
    assert main(["train", "--output-dir", str(tmp_path / "runs"), "--name", "r", "--no-progress", "-o", *QUICK]) == 1
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r"]
    assert sorted(p.name for p in earlier.iterdir()) == ["metrics.json", "recipe.yaml"]
    # ... and a folder that is not a run folder is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["train", "--output-dir", str(tmp_path), "--name", "mine", "-o", *QUICK]) == 2
    assert "is not a peft-tsrs run folder" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_the_leftover_of_a_killed_run_is_removed_by_the_next_run(tmp_path, monkeypatch):
    """SIGKILL cannot be cleaned up after: the next run of that name removes the dead process's temporary folder
    (a live process's one stays)."""
    import subprocess
    import sys

    import peft_tsrs.app.run as run

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".r.partial-{dead.pid}-abc").mkdir()
    (tmp_path / f".r.partial-{dead.pid}-abc" / "recipe.yaml").write_text("name: r\n")
    (tmp_path / f".r.partial-{os.getpid()}-xyz").mkdir()  # a live process
    (tmp_path / f".other.partial-{dead.pid}-abc").mkdir()  # another run name
    monkeypatch.setattr(run, "build_task", _fail)
    assert main(["train", "--output-dir", str(tmp_path), "--name", "r", "-o", *QUICK]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.partial-{dead.pid}-abc",
                                                          f".r.partial-{os.getpid()}-xyz"]


@pytest.mark.slow
def test_a_run_failing_after_training_leaves_nothing(tmp_path, monkeypatch, capsys):
    import peft_tsrs.app.run as run

    monkeypatch.setattr(run, "_save_outputs", _fail)  # after training and the checkpoints
    assert main(["train", "--output-dir", str(tmp_path / "out"), "--name", "r", "--no-progress", "-o", *QUICK]) == 1
    assert not (tmp_path / "out").exists()  # neither the run folder nor the output folder the run created
    assert "RuntimeError: boom" in capsys.readouterr().err


@pytest.mark.slow
def test_kept_checkpoints_are_recorded_with_their_folder(tmp_path):
    assert main(["train", "--output-dir", str(tmp_path), "--name", "keep", "--no-progress", "--keep-checkpoints",
                 "-o", *QUICK]) == 0
    run_dir = tmp_path / "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]  # no temporary folder left next to it
    best = json.loads((run_dir / "metrics.json").read_text())["best_checkpoint"]
    assert best["folder"] == f"checkpoints/checkpoint-{best['step']}" and (run_dir / best["folder"]).is_dir()
    for checkpoint in (run_dir / "checkpoints").iterdir():
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        assert Path(state["best_model_checkpoint"]).parent == run_dir / "checkpoints"
        config = json.loads((checkpoint / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["push", "only-one-arg"])
    assert exc.value.code == 2
    assert "REPO_ID" in capsys.readouterr().err.upper()


# --------------------------------------------------------------------------- push (Hub calls recorded, no network)
@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    from huggingface_hub import HfApi

    calls: dict = {"create_repo": [], "upload_folder": []}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append({"repo_id": repo_id, **kwargs})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        copy = tmp_path / f"uploaded{len(calls['upload_folder'])}"
        shutil.copytree(kwargs["folder_path"], copy)  # the staging folder is temporary: keep what was sent
        calls["upload_folder"].append({**kwargs, "copy": copy})
        return None

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


@pytest.mark.slow
def test_push_uploads_the_run_folder(trained, fake_hub, capsys):
    from peft import PeftModel

    from peft_tsrs.app.recipes import load_recipe
    from peft_tsrs.app.tasks import build_model, build_task
    from test_recipes import _logits

    assert main(["push", str(trained), "me/wordnet-rlrr", "--private"]) == 0
    assert f"pushed {trained} -> https://huggingface.co/me/wordnet-rlrr" in capsys.readouterr().out
    (create,) = fake_hub["create_repo"]
    assert create["repo_id"] == "me/wordnet-rlrr" and create["private"] is True and create["exist_ok"] is True
    (upload,) = fake_hub["upload_folder"]
    assert upload["repo_id"] == "me/wordnet-rlrr" and upload["repo_type"] == "model"
    assert "cli-run" in upload["commit_message"]
    sent = upload["copy"]
    names = {p.name for p in sent.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "metrics.json",
            "training_curves.png", "recipe.yaml", "tokenizer.json"} <= names, names
    metrics = json.loads((sent / "metrics.json").read_text())
    card = (sent / "README.md").read_text()
    assert card.startswith("---") and "library_name: peft" in card and "peft-tsrs" in card
    assert "**rlrr**" in card and f"{metrics['test']['accuracy']:.4f}" in card

    # a model reloaded from the uploaded folder is the trained one
    recipe = load_recipe([str(sent / "recipe.yaml")])
    data = build_task(recipe)
    uploaded = PeftModel.from_pretrained(build_model(recipe, data), str(sent))
    original = PeftModel.from_pretrained(build_model(recipe, data), str(trained / "adapter"))
    fresh = build_model(recipe, data)
    a, labels = _logits(uploaded, data, "test")
    b, _ = _logits(original, data, "test")
    c, _ = _logits(fresh, data, "test")
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert (a.argmax(-1) == labels).float().mean().item() == pytest.approx(metrics["test"]["accuracy"])


def test_push_api_returns_the_url_and_rejects_a_folder_without_adapter(tmp_path, fake_hub):
    from peft_tsrs.app.hub import push_run_to_hub

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"has no trained adapter .*adapter_config.json"):
        push_run_to_hub(str(tmp_path / "run"), "me/x")
    assert fake_hub["create_repo"] == []  # nothing created for a bad folder
    (tmp_path / "run" / "adapter").mkdir()
    (tmp_path / "run" / "adapter" / "adapter_config.json").write_text("{}")
    url = push_run_to_hub(str(tmp_path / "run"), "me/x", token="hf_dummy", commit_message="msg")
    assert url == "https://huggingface.co/me/x"
    (create,) = fake_hub["create_repo"]
    assert create["private"] is False and create["token"] == "hf_dummy"
    (upload,) = fake_hub["upload_folder"]
    assert upload["commit_message"] == "msg" and upload["token"] == "hf_dummy"
    assert {p.name for p in upload["copy"].iterdir()} == {"adapter_config.json", "metrics.json"}


def _run_folder(tmp_path: Path) -> Path:
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "adapter" / "adapter_config.json").write_text("{}")
    return tmp_path / "run"


def test_push_without_network_is_one_line_saying_what_to_do(tmp_path):
    """No token and no network used to print a 70-line ConnectError traceback. The Hub endpoint is a closed local
    port: nothing leaves this machine."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "peft_tsrs.app.cli", "push", str(_run_folder(tmp_path)), "me/x"],
                            env=env, capture_output=True, text=True, timeout=120)
    err = result.stderr
    assert result.returncode == 2, err
    assert err.startswith("peft-tsrs: error: cannot reach the Hub at http://127.0.0.1:9") and err.count("\n") == 1, err
    assert "hf auth login" in err and "HF_TOKEN" in err and "network" in err and "Traceback" not in err


@pytest.mark.parametrize("status", [401, 403])
def test_push_refused_for_lack_of_login_says_to_log_in(tmp_path, monkeypatch, capsys, status):
    from types import SimpleNamespace

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    def refuse(self, *args, **kwargs):
        response = SimpleNamespace(status_code=status, headers={}, request=None)  # what HfHubHTTPError reads
        raise HfHubHTTPError("Invalid username or password.\nline two", response=response)

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    assert main(["push", str(_run_folder(tmp_path)), "me/x"]) == 2
    err = capsys.readouterr().err
    assert f"HTTP {status}" in err and "hf auth login" in err and "HF_TOKEN" in err and err.count("\n") == 1, err


def test_push_without_a_stored_token_says_to_log_in(tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import LocalTokenNotFoundError

    def no_token(self, *args, **kwargs):
        raise LocalTokenNotFoundError("Token is required (`token=True`), but no token found.")

    monkeypatch.setattr(HfApi, "create_repo", no_token)
    assert main(["push", str(_run_folder(tmp_path)), "me/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peft-tsrs: error: not logged in to the Hub: log in with `hf auth login`"), err


def test_push_offline_is_a_readable_error(tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    def offline(self, *args, **kwargs):
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "adapter" / "adapter_config.json").write_text("{}")
    assert main(["push", str(tmp_path / "run"), "me/x"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
