"""Push a finished run folder to the Hugging Face Hub.

``PeftModel.push_to_hub`` pushes a model object; :func:`push_run_to_hub` pushes what ``peft-tsrs train`` wrote: the
``adapter/`` folder (weights, ``adapter_config.json``, tokenizer, and the model card ``README.md`` naming method,
recipe and results) at the root of the repository, so ``PeftModel.from_pretrained(base, repo_id)`` loads it, plus the
run's ``metrics.json``, ``recipe.yaml`` and ``training_curves.png`` next to it — one commit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Optional

ADAPTER = "adapter"
# Run-level files uploaded next to the adapter files (those present are uploaded).
RUN_FILES = ("metrics.json", "recipe.yaml", "training_curves.png")
# Marks of a loadable model folder: a PEFT adapter, or a full model (``adapter.type: full``).
MODEL_FILES = ("adapter_config.json", "config.json")


def _check_run_dir(run_dir: str) -> str:
    """The run's adapter folder, or a clear error saying what is missing."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    adapter_dir = os.path.join(run_dir, ADAPTER)
    if not os.path.isdir(adapter_dir) or not any(os.path.isfile(os.path.join(adapter_dir, f)) for f in MODEL_FILES):
        raise FileNotFoundError(
            f"{run_dir} has no trained adapter ({adapter_dir}/adapter_config.json or config.json is missing); "
            f"push a folder written by a finished `peft-tsrs train` run."
        )
    return adapter_dir


def stage_run(run_dir: str, target: str) -> str:
    """Copy what gets uploaded into ``target``: the adapter files at the top, the run files next to them."""
    adapter_dir = _check_run_dir(run_dir)
    shutil.copytree(adapter_dir, target, dirs_exist_ok=True)
    for name in RUN_FILES:
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(target, name))
    return target


def push_run_to_hub(
    run_dir: str,
    repo_id: str,
    private: bool = False,
    token: Optional[str] = None,
    commit_message: Optional[str] = None,
) -> str:
    """Create (or reuse) the model repository ``repo_id`` and upload the run folder into it; returns the repo URL.

    Args:
        run_dir: a run folder written by :func:`peft_tsrs.run.run_recipe` (``<output_dir>/<name>``).
        repo_id: ``user/name`` or ``org/name`` on the Hub.
        private: create the repository as private (an existing repository keeps its visibility).
        token: a Hub token; ``None`` uses the logged-in one (``hf auth login`` / ``HF_TOKEN``).
        commit_message: defaults to ``"Upload <run name> (peft-tsrs)"``.
    """
    from huggingface_hub import HfApi

    _check_run_dir(run_dir)
    api = HfApi(token=token)
    url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    name = os.path.basename(os.path.normpath(run_dir))
    with tempfile.TemporaryDirectory(prefix="peft-tsrs-push-") as tmp:
        folder = stage_run(run_dir, os.path.join(tmp, name))
        api.upload_folder(
            repo_id=repo_id, folder_path=folder, repo_type="model", token=token,
            commit_message=commit_message or f"Upload {name} (peft-tsrs)",
        )
    return str(url)
