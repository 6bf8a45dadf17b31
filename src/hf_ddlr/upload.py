"""Uploads to the Hub that fail helpfully: the local folder stays complete and the error says how to retry.

Shared by the trainer's ``push_to_hub`` and :meth:`hf_ddlr.trajectory.LRTrajectory.push_to_hub`; it knows
nothing about trajectories.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from typing import Any


class HubUploadError(RuntimeError):
    """An upload to the Hub failed; the local folder is complete and the message says how to retry."""

    def __init__(self, message: str, *, folder_path: str, repo_id: str) -> None:
        super().__init__(message)
        self.folder_path = folder_path
        self.repo_id = repo_id


def retry_command(folder_path: str, repo_id: str, revision: str | None = None) -> str:
    """The shell command that re-uploads ``folder_path`` to ``repo_id``."""
    cmd = f"hf upload {shlex.quote(repo_id)} {shlex.quote(str(folder_path))} ."
    return cmd + (f" --revision {shlex.quote(revision)}" if revision else "")


def upload_folder_with_retry_message(
    folder_path: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload learned LR trajectory",
    ignore_patterns: list[str] | None = None,
    retry_hint: str | None = None,
    before_upload: Callable[[], None] | None = None,
) -> Any:
    """Create ``repo_id`` if needed and upload ``folder_path`` to it; return the ``CommitInfo``.

    The folder is only read, so a failure (HTTP error, connection refused, offline mode) leaves it
    complete; the failure is raised (not also logged: it is shown once) as :class:`HubUploadError`, whose
    message names the folder, the repo, the cause and the command to retry (``retry_hint`` adds an alternative,
    e.g. ``trainer.push_to_hub()``). ``before_upload``: called once the repo (and branch) exist, before the
    upload, e.g. to merge the repo's card into the folder's. Uses ``HF_ENDPOINT``/token settings like any
    ``huggingface_hub`` call.
    """
    from huggingface_hub import HfApi

    folder = str(folder_path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot upload {folder} to {repo_id}: the folder does not exist")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        # create_repo leaves an existing repo's visibility as it is: a private push must not land in a public repo
        public = bool(private) and getattr(api.repo_info(repo_id), "private", None) is False
        if not public:
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            if before_upload is not None:
                before_upload()
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                revision=revision,
                commit_message=commit_message,
                ignore_patterns=ignore_patterns,
            )
    except Exception as err:  # any failure: the folder is untouched, so say how to resume
        hint = f"`{retry_command(folder, repo_id, revision)}`" + (f" or {retry_hint}" if retry_hint else "")
        message = (
            f"Upload of {folder} to {repo_id} failed: {type(err).__name__}: {err}. "
            f"The folder is complete locally; retry with {hint}."
        )
        raise HubUploadError(message, folder_path=folder, repo_id=repo_id) from err
    raise ValueError(
        f"{repo_id} exists and is public, and private=True (--private) does not change an existing repo's "
        f"visibility: nothing was uploaded. Make it private first (its settings page on the Hub, or "
        f"HfApi().update_repo_settings({repo_id!r}, private=True)) and push again, or push to a new repo."
    )
