"""Hub side of learned LR trajectories: model card, output-folder artifacts, uploads that fail helpfully.

The trainer calls :func:`write_artifacts` from its ``create_model_card`` / ``push_to_hub`` override
(after ``Trainer.create_model_card`` wrote ``README.md``), so the trajectory files, the PNG plots and a
"Learned learning-rate trajectory" card section land in ``output_dir`` and travel with the model in
``Trainer.push_to_hub``'s ``upload_folder``. A trajectory on its own goes up with
:meth:`hf_ddlr.trajectory.LRTrajectory.push_to_hub` (which uses :func:`push_trajectory`).

The card template is ``hf_ddlr/model_cards/metalr_card.md`` (Jinja2, shipped as package data).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from .trajectory import (
    PLOT_FILE_TEMPLATE,
    PLOT_KINDS,
    TRAJECTORY_CONFIG_NAME,
    TRAJECTORY_TENSORS_NAME,
    LRTrajectory,
)

logger = logging.getLogger(__name__)

CARD_TEMPLATE_NAME = "metalr_card.md"
CARD_TAGS = ("hf-ddlr", "meta-learning", "learning-rate")
SECTION_START = "<!-- hf_ddlr:trajectory:start -->"
SECTION_END = "<!-- hf_ddlr:trajectory:end -->"
README_NAME = "README.md"

PLOT_TITLES = {
    "class": "Per-class learning-rate multipliers over epochs",
    "instance": "Per-instance learning-rate multipliers over epochs",
    "weight_decay": "Learned weight decay and model learning rate over steps",
    "meta_loss": "Meta loss over steps",
}
_FILE_DESCRIPTIONS = {
    TRAJECTORY_TENSORS_NAME: "all recorded tensors (per-step LR / weight decay / meta loss, class and instance "
    "rate snapshots, noise mask)",
    TRAJECTORY_CONFIG_NAME: "schema version, dataset signature, label names, meta-learning settings",
}


class HubUploadError(RuntimeError):
    """An upload to the Hub failed; the local folder is complete and the message says how to retry."""

    def __init__(self, message: str, *, folder_path: str, repo_id: str) -> None:
        super().__init__(message)
        self.folder_path = folder_path
        self.repo_id = repo_id


def card_template_text() -> str:
    """The Jinja2 source of the model card template shipped in ``hf_ddlr/model_cards/``."""
    return resources.files("hf_ddlr").joinpath("model_cards", CARD_TEMPLATE_NAME).read_text(encoding="utf-8")


def _cell(value: Any) -> str:
    """A value fit for a Markdown table cell."""
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(str(v) for v in value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _plot_entries(plots: Iterable[str]) -> list[tuple[str, str]]:
    entries = []
    for p in plots:
        name = os.path.basename(p)
        kind = next((k for k in PLOT_TITLES if PLOT_FILE_TEMPLATE.format(kind=k) == name), None)
        entries.append((PLOT_TITLES[kind] if kind else name, name))
    return entries


def _template_vars(
    trajectory: LRTrajectory,
    *,
    model_name: str,
    dataset_name: str | None,
    plots: Sequence[str],
    extra: dict[str, Any] | None,
    repo_id: str | None,
) -> dict[str, Any]:
    cfg = trajectory.config or {}
    ds = trajectory.dataset or {}
    levels = []
    if trajectory.has_instance_rates:
        levels.append("per-example learning-rate multipliers")
    if trajectory.has_class_rates:
        levels.append("per-class learning-rate multipliers")
    lr_level = cfg.get("lr_level") or (
        "both" if len(levels) == 2 else ("class" if trajectory.has_class_rates else "instance")
    )
    dataset_rows = [(k, _cell(ds[k])) for k in ("config", "split", "revision", "fingerprint", "num_examples")
                    if ds.get(k) is not None]
    if trajectory.label_names:
        dataset_rows.append(("classes", str(len(trajectory.label_names))))
    if trajectory.noise_mask is not None:
        frac = float(trajectory.noise_mask.float().mean()) if trajectory.noise_mask.numel() else 0.0
        dataset_rows.append(("noisy labels", f"{int(trajectory.noise_mask.sum())} ({frac:.1%}), mask stored"))
    plot_names = [os.path.basename(p) for p in plots]
    files = [(TRAJECTORY_TENSORS_NAME, _FILE_DESCRIPTIONS[TRAJECTORY_TENSORS_NAME]),
             (TRAJECTORY_CONFIG_NAME, _FILE_DESCRIPTIONS[TRAJECTORY_CONFIG_NAME])]
    files += [(name, "plot") for name in plot_names]
    if repo_id is None:
        repo_id = model_name if "/" in model_name else "user/repo"
    return {
        "model_name": model_name,
        "dataset_name": dataset_name or ds.get("id") or "an unnamed dataset",
        "dataset_rows": dataset_rows,
        "levels_text": " and ".join(levels) or "learning-rate multipliers",
        "learns_wd": bool(cfg.get("learn_weight_decay", trajectory.num_steps > 0)),
        "averaged": cfg.get("averaged_over_runs"),
        "config_rows": [(k, _cell(v)) for k, v in sorted(cfg.items())],
        "summary_markdown": trajectory.summary_markdown().strip(),
        "plots": _plot_entries(plots),
        "extra_rows": [(k, _cell(v)) for k, v in (extra or {}).items()],
        "files": files,
        "repo_id": repo_id,
        "lr_level": lr_level,
    }


def render_model_card(
    trajectory: LRTrajectory,
    *,
    model_name: str,
    dataset_name: str | None = None,
    base_card_text: str | None = None,
    plots: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
    repo_id: str | None = None,
) -> str:
    """Render the model card (``README.md`` text) describing ``trajectory``.

    Without ``base_card_text`` it is a complete card for a trajectory-only repo (YAML metadata with the
    ``hf-ddlr``/``meta-learning``/``learning-rate`` tags, the dataset, and the trajectory section).
    With it (e.g. the card ``Trainer.create_model_card`` wrote) that card's YAML metadata and text are
    kept, the tags are added, and the "Learned learning-rate trajectory" section is appended — or
    replaced, if an earlier push already added one. ``plots`` are file names (or paths; only the base
    name is used, as a link relative to the repo root). ``repo_id`` fills the download snippet.
    """
    from huggingface_hub import ModelCard, ModelCardData

    variables = _template_vars(
        trajectory, model_name=model_name, dataset_name=dataset_name, plots=plots, extra=extra, repo_id=repo_id
    )
    template = card_template_text()
    if base_card_text is None:
        ds_id = (trajectory.dataset or {}).get("id")
        data = ModelCardData(tags=list(CARD_TAGS), datasets=[ds_id] if ds_id and "/" in str(ds_id) else None)
        card = ModelCard.from_template(data, template_str=template, standalone=True, **variables)
        return str(card)
    import jinja2

    section = jinja2.Template(template, keep_trailing_newline=True).render(standalone=False, **variables).strip()
    card = ModelCard(base_card_text, ignore_metadata_errors=True)
    card.data.tags = list(dict.fromkeys(list(card.data.tags or []) + list(CARD_TAGS)))
    text = card.text
    pattern = re.compile(re.escape(SECTION_START) + r".*?" + re.escape(SECTION_END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    card.text = text.rstrip("\n") + "\n"
    return str(card)


def write_artifacts(
    trajectory: LRTrajectory,
    output_dir: str | os.PathLike,
    *,
    model_card_base: str | None = None,
    model_name: str | None = None,
    dataset_name: str | None = None,
    repo_id: str | None = None,
    extra: dict[str, Any] | None = None,
) -> list[str]:
    """Write the trajectory files, the PNG plots and ``README.md`` into ``output_dir``; return the paths.

    The card section is added to ``model_card_base`` when given, else to an existing
    ``output_dir/README.md`` (the card ``Trainer.create_model_card`` wrote: its YAML metadata is kept,
    the tags are added), else a standalone trajectory card is written. Calling it again replaces the
    section instead of appending a second one.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = trajectory.save_pretrained(out)
    for kind in PLOT_KINDS:  # plots of an earlier run into this folder would be uploaded with the new card
        (out / PLOT_FILE_TEMPLATE.format(kind=kind)).unlink(missing_ok=True)
    plots = trajectory.save_plots(out)
    written += plots
    readme = out / README_NAME
    if model_card_base is None and readme.is_file():
        model_card_base = readme.read_text(encoding="utf-8")
    # the repo is the best title; the trajectory's model_name is the *base* model (often a local path)
    name = model_name or repo_id or trajectory.model_name or out.resolve().name
    text = render_model_card(
        trajectory,
        model_name=name,
        dataset_name=dataset_name,
        base_card_text=model_card_base,
        plots=plots,
        extra=extra,
        repo_id=repo_id,
    )
    readme.write_text(text, encoding="utf-8")
    written.append(str(readme))
    return written


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
) -> Any:
    """Create ``repo_id`` if needed and upload ``folder_path`` to it; return the ``CommitInfo``.

    The folder is only read, so a failure (HTTP error, connection refused, offline mode) leaves it
    complete; the failure is logged and raised as :class:`HubUploadError`, whose message names the
    folder, the repo, the cause and the command to retry (``retry_hint`` adds an alternative, e.g.
    ``trainer.push_to_hub()``). Uses ``HF_ENDPOINT``/token settings like any ``huggingface_hub`` call.
    """
    from huggingface_hub import HfApi

    folder = str(folder_path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot upload {folder} to {repo_id}: the folder does not exist")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
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
        logger.error(message)
        raise HubUploadError(message, folder_path=folder, repo_id=repo_id) from err


def push_trajectory(
    trajectory: LRTrajectory,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload learned LR trajectory",
    revision: str | None = None,
    local_dir: str | os.PathLike | None = None,
) -> Any:
    """Write the trajectory, plots and a card to ``local_dir`` (a temporary folder when None) and upload it.

    A temporary folder is removed after a successful upload and kept after a failed one, so the
    :class:`HubUploadError`'s retry command works.
    """
    temporary = local_dir is None
    folder = tempfile.mkdtemp(prefix="hf_ddlr_trajectory_") if temporary else str(local_dir)
    write_artifacts(trajectory, folder, model_name=trajectory.model_name or repo_id, repo_id=repo_id)
    info = upload_folder_with_retry_message(
        folder,
        repo_id,
        token=token,
        private=private,
        revision=revision,
        commit_message=commit_message,
        retry_hint="`trajectory.push_to_hub(...)`",
    )
    if temporary:
        shutil.rmtree(folder, ignore_errors=True)
    return info
