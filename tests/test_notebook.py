"""notebooks/quickstart.ipynb runs without a cell error (quick mode, in a scratch working directory)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import yaml

from peft_tsrs.app.cli import DEMO_REGULARIZERS
from peft_tsrs.app.recipes import TrainSpec, load_recipe

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
RUNS = ("rlrr", "rlrr-regularized")  # the two run folders the notebook writes under runs/quickstart/


def _text(cells) -> str:
    return "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                   for c in cells if c.cell_type == "code" for o in c.outputs)


def test_saved_notebook_is_generic_and_was_executed():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), "save the notebook executed"
    assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # training curves, comparison, stable-rank histogram
    text = _text(nb.cells)
    assert "quick mode: False" in text  # the saved outputs come from a real run, not the smoke test
    # ... with the current default learning rate and the demo's regularized arm (re-execute when either changes)
    assert f"lr {TrainSpec().learning_rate}" in text, "saved outputs are from another default learning rate"
    assert f"regularizers: {DEMO_REGULARIZERS}" in text, "saved outputs are from other comparison regularizers"


@pytest.mark.slow
def test_quickstart_runs_in_quick_mode(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # first cell of the in-memory copy: which interpreter the kernel runs, with how many intra-op threads
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys, torch\nprint(sys.executable, torch.get_num_threads())"))
    monkeypatch.setenv("PEFT_TSRS_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PEFT_TSRS_CACHE", str(tmp_path / "cache"))
    # One intra-op thread in the kernel: the quick runs are tiny, and on a shared 2-core machine several threads per
    # op spend most of their time waiting for each other (the test took minutes instead of seconds under load).
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(NOTEBOOK.parents[1]),
                                                                    os.environ.get("PYTHONPATH")])))
    # kernel_name 'python3': jupyter_client starts a kernelspec whose argv[0] is `python` with sys.executable, i.e.
    # the interpreter running the tests (the venv of `make test`), whichever python3 spec is found. The kernel
    # inherits this process's environment (set above).
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600, startup_timeout=180,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    elapsed = time.perf_counter() - start
    executable, threads = "".join(o.get("text", "") for o in nb.cells[0].outputs).split()
    assert os.path.realpath(executable) == os.path.realpath(sys.executable)
    assert threads == "1"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    assert "quick mode: True" in _text(nb.cells)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # training curves, comparison, stable-rank histogram
    out = tmp_path / "runs" / "quickstart"
    assert (out / "rlrr" / "adapter" / "adapter_config.json").is_file()
    assert (out / "comparison.png").is_file()

    # The quick budget really is tiny: a couple of steps on a handful of examples, small eval splits and short
    # sequences, so the diagnostics (batches of at most 32 examples from these splits) are cheap too.
    for name in RUNS:
        recipe = yaml.safe_load((out / name / "recipe.yaml").read_text())
        metrics = json.loads((out / name / "metrics.json").read_text())
        task, training = recipe["task"], recipe["training"]
        n_classes = len(task["classes"] or [])
        assert 0 < n_classes <= 3, task
        assert task["shots_per_class"] <= 2 and task["val_per_class"] <= 2 and task["test_per_class"] <= 3, task
        assert task["max_length"] <= 32, task
        assert 0 < training["max_steps"] <= 2, training
        assert metrics["train_steps"] <= 2 and metrics["n_train"] <= 2 * n_classes, metrics["train_steps"]
        assert metrics["diagnostics"], "diagnostics missing"
    # the comparison arm is the demo's
    regularized = yaml.safe_load((out / "rlrr-regularized" / "recipe.yaml").read_text())["regularizers"]
    assert regularized == load_recipe([], DEMO_REGULARIZERS).regularizers.to_dict()
    print(f"quick notebook: {elapsed:.1f} s")


def test_notebook_shows_the_offline_metrics():
    """The metrics of the notebook's runs come from peft_tsrs.metrics.compute_metrics, and the notebook says so and
    shows it for one's own Trainer: evaluate.load("accuracy") fetches its script from the Hub (no network here)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    text = "\n".join(c.source for c in nb.cells)
    assert "peft_tsrs.metrics import compute_metrics" in text or "peft_tsrs.metrics.compute_metrics" in text
    assert "compute_metrics=compute_metrics" in text or "compute_metrics=peft_tsrs.metrics.compute_metrics" in text
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "evaluate.load" not in code  # the Hub-only way is never run
