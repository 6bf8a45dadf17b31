"""The files of a saved trajectory: their names, the format version, writing them and finding/reading them.

A trajectory is stored as two files, ``lr_trajectory.safetensors`` (every tensor) and ``lr_trajectory.json``
(schema version + metadata), in a local folder or a Hub model repo. This module moves and checks those
files only: it hands back plain ``(metadata, tensors)`` and never builds an
:class:`~hf_ddlr.trajectory.LRTrajectory` itself (that is :meth:`LRTrajectory.from_stored`), so that it
does not depend on the record class.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

TRAJECTORY_TENSORS_NAME = "lr_trajectory.safetensors"
TRAJECTORY_CONFIG_NAME = "lr_trajectory.json"
TRAJECTORY_FILES = (TRAJECTORY_TENSORS_NAME, TRAJECTORY_CONFIG_NAME)
SCHEMA_VERSION = 1
FORMAT_NAME = "hf_ddlr.lr_trajectory"


def write_files(
    tensors: Mapping[str, torch.Tensor], metadata: dict[str, Any], save_directory: str | os.PathLike
) -> list[str]:
    """Write ``lr_trajectory.safetensors`` and ``lr_trajectory.json`` into ``save_directory``; return their paths."""
    from safetensors.torch import save_file

    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors_path = directory / TRAJECTORY_TENSORS_NAME
    config_path = directory / TRAJECTORY_CONFIG_NAME
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    save_file(contiguous, str(tensors_path), metadata={"format": FORMAT_NAME, "schema_version": str(SCHEMA_VERSION)})
    config_path.write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return [str(tensors_path), str(config_path)]


def locate_files(
    repo_id_or_path: str | os.PathLike,
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    subfolder: str | None = None,
) -> tuple[Path, Path]:
    """The local paths of a saved trajectory's tensors and config file: in a local folder, or downloaded
    from the Hub model repo ``repo_id_or_path`` (``hf_hub_download``, honouring ``HF_ENDPOINT``, ``HF_HOME``
    and offline mode like every ``huggingface_hub`` call)."""
    local = Path(repo_id_or_path)
    if subfolder:
        local = local / subfolder
    if local.is_dir():
        return _local_files(local)
    if os.path.exists(local):
        raise ValueError(
            f"{local} is a file; pass the folder that holds {TRAJECTORY_TENSORS_NAME} and {TRAJECTORY_CONFIG_NAME}"
        )
    return _hub_files(str(repo_id_or_path), revision, cache_dir=cache_dir, token=token, subfolder=subfolder)


def _local_files(folder: Path) -> tuple[Path, Path]:
    missing = [n for n in TRAJECTORY_FILES if not (folder / n).is_file()]
    if missing:
        inside = sorted(str(p.parent.relative_to(folder)) for p in folder.glob(f"*/{TRAJECTORY_CONFIG_NAME}"))
        hint = (f"It holds trajectories in its subfolder{'s' if len(inside) > 1 else ''} {', '.join(inside)} (e.g. "
                f"an example's output folder, a run per method): pass {folder / inside[0]}." if inside else
                f"Save one with trajectory.save_pretrained({str(folder)!r}).")
        raise FileNotFoundError(f"{folder} is missing {', '.join(missing)}: it is not a saved LRTrajectory. {hint}")
    return folder / TRAJECTORY_TENSORS_NAME, folder / TRAJECTORY_CONFIG_NAME


def _hub_files(
    repo_id: str,
    revision: str | None,
    *,
    cache_dir: str | os.PathLike | None,
    token: str | bool | None,
    subfolder: str | None,
) -> tuple[Path, Path]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise FileNotFoundError(
            f"{repo_id!r} is neither an existing local folder nor a Hub repo id ({err}). "
            f"Check the path, or pass a repo id such as 'user/repo'."
        ) from err
    paths = []
    for name in TRAJECTORY_FILES:
        try:
            paths.append(
                hf_hub_download(
                    repo_id, name, subfolder=subfolder, revision=revision, cache_dir=cache_dir, token=token
                )
            )
        except RepositoryNotFoundError as err:
            raise FileNotFoundError(
                f"{repo_id!r} is neither a local folder nor a Hub model repo this account can read (the Hub has "
                f"no such repo, or it is private or gated: log in with `hf auth login` or pass token=...). Check "
                f"the path or the repo id."
            ) from err
        except RevisionNotFoundError as err:
            raise FileNotFoundError(
                f"Hub repo {repo_id!r} has no revision {revision!r} (a branch, tag or commit). Leave revision out "
                f"for 'main', or name one the repo has."
            ) from err
        except LocalEntryNotFoundError as err:
            raise FileNotFoundError(
                f"{repo_id!r} is not a local folder, and {name} of the Hub repo of that name is not "
                f"in the local cache while the Hub cannot be reached (offline mode, HF_HUB_OFFLINE=1, or no "
                f"network). Check the path, or download the trajectory once online."
            ) from err
        except EntryNotFoundError as err:
            raise FileNotFoundError(
                f"Hub repo {repo_id!r} (revision {revision or 'main'}) has no {name}: it holds no "
                f"learned LR trajectory. Push one with trajectory.push_to_hub({repo_id!r})."
            ) from err
    return Path(paths[0]), Path(paths[1])


def hub_card_text(repo_id: str, *, revision: str | None = None, token: str | bool | None = None) -> str | None:
    """The ``README.md`` of Hub model repo ``repo_id`` (at ``revision``), or None when the repo, the revision
    or the card does not exist yet: what a trajectory pushed there adds its section to instead of replacing."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        path = hf_hub_download(repo_id, "README.md", revision=revision, token=token)
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError):
        return None  # (also the Hub out of reach, a LocalEntryNotFoundError: the upload that follows says so)
    return Path(path).read_text(encoding="utf-8")


def read_files(tensors_path: Path, config_path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metadata and the tensors of a saved trajectory, checked: a schema version this code reads, both
    files intact, and the tensors the metadata declares (the two files come from one save)."""
    from safetensors.torch import load_file

    meta = _read_metadata(config_path)
    try:
        tensors = load_file(str(tensors_path))
    except Exception as err:  # safetensors raises its own SafetensorError for a truncated/corrupt file
        raise ValueError(
            f"{tensors_path} is corrupt or truncated ({err}); re-save the trajectory or download it again."
        ) from err
    declared = set(meta.get("tensors", {}))
    if declared != set(tensors):
        raise ValueError(
            f"{tensors_path} holds tensors {sorted(tensors)} but {config_path} declares {sorted(declared)}; "
            f"the two files come from different saves. Re-save or re-download both."
        )
    return meta, tensors


def _read_metadata(config_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}); the trajectory file is corrupt") from err
    version = meta.get("schema_version")
    if not isinstance(version, int):
        raise ValueError(f"{config_path} has no integer schema_version; it is not an hf_ddlr trajectory")
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"{config_path} uses trajectory schema version {version}, but this hf_ddlr reads up to "
            f"version {SCHEMA_VERSION}. Upgrade hf_ddlr (pip install -U hf_ddlr) to load it."
        )
    return meta
