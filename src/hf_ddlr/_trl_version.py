"""The TRL releases hf_ddlr's TRL trainers work with, checked when one of them is first imported."""

from __future__ import annotations

import importlib.metadata

from packaging.version import Version

# The oldest TRL release the TRL tests passed on (`python scripts/dependency_versions.py`, its table in
# benchmarks/results/dependency_versions/): the trainers build on TRL members that changed between minor releases.
MIN_TRL = "1.16"
FIX = f"pip install -U 'trl>={MIN_TRL}' (or pip install 'hf_ddlr[trl]')"
_WHO = "hf_ddlr's TRL trainers (MetaSFTTrainer, MetaRewardTrainer, MetaDPOTrainer)"


def check_trl_version(installed: str | None) -> None:
    """Refuse a missing TRL, or one older than :data:`MIN_TRL`, with the command that fixes it: ``pip install
    hf_ddlr`` does not install the ``[trl]`` extra, so an older TRL already in the environment stays."""
    if installed is None:
        raise ImportError(f"{_WHO} need TRL: {FIX}.")
    if Version(installed) < Version(MIN_TRL):
        raise ImportError(f"{_WHO} need trl>={MIN_TRL}, found trl {installed} (they build on TRL members that older "
                          f"releases lack or define otherwise): {FIX}.")


def require_trl(import_error: ImportError | None = None) -> None:
    """:func:`check_trl_version` of the installed TRL; with ``import_error`` (``import trl`` failed although a
    recent enough TRL is installed), an ImportError saying so."""
    try:
        installed = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    check_trl_version(installed)
    if import_error is not None:
        raise ImportError(f"{_WHO} need TRL; trl {installed} is installed but did not import ({import_error}): "
                          f"pip install --force-reinstall 'trl>={MIN_TRL}'.") from import_error
