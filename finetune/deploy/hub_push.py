"""`--push REPO_ID`: the written Hub folder uploaded with huggingface_hub (`create_repo`, then `upload_folder`)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from finetune.deploy.export_folder import MANIFEST
from finetune.errors import HubError, UsageError

log = logging.getLogger(__name__)


def require_hub() -> None:
    """One line naming the extra when huggingface_hub (timm's `save_for_hf` needs it too) is not installed."""
    if importlib.util.find_spec("huggingface_hub") is None:
        raise UsageError("--format hub needs huggingface_hub: pip install '.[hub]' (or pip install huggingface_hub)")


def check_repo_id(repo_id: str) -> None:
    """'user/name' or 'org/name', before anything is written or sent."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UsageError(f"--push {repo_id}: not a Hub repository id; write it as USER/NAME, e.g. me/ants-vs-bees") from None
    if repo_id.count("/") != 1:
        raise UsageError(f"--push {repo_id}: name the owner too, as USER/NAME (e.g. me/{repo_id.split('/')[-1]})")


def _reason(exc: Exception) -> str:
    """The first line of what went wrong, with the hint that fits the usual causes."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)[:200]
    if status in (401, 403):
        return f"{first}; log in with 'hf auth login' or set HF_TOKEN to a token with write access"
    return f"{first}; check the network (and HF_ENDPOINT), then push the folder again"


def push_folder(folder: Path, repo_id: str, *, private: bool = False) -> str:
    """Create the model repository if needed and upload every file of `folder` (but export's manifest); the commit's
    URL back."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            commit_message="Upload model exported by finetune",
            ignore_patterns=[MANIFEST],  # finetune's own record of what it wrote, not part of the model
        )
    except Exception as exc:  # huggingface_hub raises HTTP, connection, offline-mode and validation errors
        raise HubError(
            f"could not push {folder} to the Hub repository {repo_id}: {_reason(exc)} "
            f"(the folder is complete; upload it later with 'hf upload {repo_id} {folder}')"
        ) from None
    url = str(getattr(commit, "commit_url", None) or commit)
    log.info("pushed %s to %s", folder, url)
    return url
