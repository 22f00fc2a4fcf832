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
LOGIN = "log in with `hf auth login` (or set HF_TOKEN, or pass --token) using a token with write access"
# Exception class names of HTTP clients' transport failures (httpx and its forks, requests, urllib3).
_NETWORK_ERRORS = {"TransportError", "NetworkError", "ConnectError", "ConnectTimeout", "TimeoutException",
                   "ProxyError", "ReadTimeout", "NewConnectionError", "MaxRetryError", "SSLError"}


class PushError(RuntimeError):
    """A push that could not happen, with a one-line message saying what to do (log in, check the network...)."""


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_network_error(err: BaseException) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in _NETWORK_ERRORS for cls in type(err).__mro__):
            return True
        err = err.__cause__ or err.__context__
    return False


def push_error(err: BaseException, repo_id: str, endpoint: str) -> Optional[PushError]:
    """The :class:`PushError` saying what to do about ``err`` (raised by the Hub client), or ``None`` when ``err`` is
    not a login, permission, offline or network problem."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return PushError(f"cannot push with HF_HUB_OFFLINE=1 set ({_one_line(err)}); unset it, check the network, "
                         f"and retry.")
    if isinstance(err, LocalTokenNotFoundError):
        return PushError(f"not logged in to the Hub: {LOGIN}, then retry.")
    if isinstance(err, HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            return PushError(f"the Hub refused the push to {repo_id} (HTTP {status}: not logged in, or the token "
                             f"cannot write to {repo_id.split('/')[0]}): {LOGIN}, then retry.")
        return PushError(f"the Hub refused the push to {repo_id}: {_one_line(err)}")
    if _is_network_error(err):
        return PushError(f"cannot reach the Hub at {endpoint} ({_one_line(err, 120)}): check the network connection "
                         f"(and HF_ENDPOINT / proxy settings), {LOGIN}, then retry.")
    return None
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

    Raises:
        FileNotFoundError: ``run_dir`` holds no trained adapter.
        PushError: not logged in, no write access, offline mode, or the Hub cannot be reached (the message says
            what to do).
    """
    from huggingface_hub import HfApi

    _check_run_dir(run_dir)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        name = os.path.basename(os.path.normpath(run_dir))
        with tempfile.TemporaryDirectory(prefix="peft-tsrs-push-") as tmp:
            folder = stage_run(run_dir, os.path.join(tmp, name))
            api.upload_folder(
                repo_id=repo_id, folder_path=folder, repo_type="model", token=token,
                commit_message=commit_message or f"Upload {name} (peft-tsrs)",
            )
    except Exception as err:
        error = push_error(err, repo_id, getattr(api, "endpoint", "the Hub"))
        if error is None:
            raise
        raise error from err
    return str(url)
