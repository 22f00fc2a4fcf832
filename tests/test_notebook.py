"""notebooks/quickstart.ipynb runs without a cell error (quick mode, in a scratch working directory)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_saved_notebook_is_generic_and_was_executed():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), "save the notebook executed"
    assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # training curves, comparison, stable-rank histogram
    text = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for c in code for o in c.outputs)
    assert "quick mode: False" in text  # the saved outputs come from a real run, not the smoke test


@pytest.mark.slow
def test_quickstart_runs_in_quick_mode(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # first cell of the in-memory copy: which interpreter the kernel runs
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    monkeypatch.setenv("PEFT_TSRS_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PEFT_TSRS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(NOTEBOOK.parents[1]),
                                                                    os.environ.get("PYTHONPATH")])))
    # kernel_name 'python3': jupyter_client starts a kernelspec whose argv[0] is `python` with sys.executable, i.e.
    # the interpreter running the tests (the venv of `make test`), whichever python3 spec is found.
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    executable = "".join(o.get("text", "") for o in nb.cells[0].outputs).strip()
    assert os.path.realpath(executable) == os.path.realpath(sys.executable)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # training curves, comparison, stable-rank histogram
    assert (tmp_path / "runs" / "quickstart" / "rlrr" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "runs" / "quickstart" / "rlrr-tsrs" / "metrics.json").is_file()
    assert (tmp_path / "runs" / "quickstart" / "comparison.png").is_file()
