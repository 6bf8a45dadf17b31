"""The model card of a learned trajectory, and the folder that goes to the Hub with it.

:func:`write_artifacts` writes the trajectory files, the PNG plots and a README card (or adds a "Learned
learning-rate trajectory" section to the card ``Trainer.create_model_card`` wrote) into a folder; the
trainer calls it from its ``create_model_card`` / ``push_to_hub`` override, and
:meth:`~hf_ddlr.trajectory.LRTrajectory.push_to_hub` uploads such a folder on its own.

The card template is ``hf_ddlr/model_cards/metalr_card.md`` (Jinja2, shipped as package data).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .io import TRAJECTORY_CONFIG_NAME, TRAJECTORY_TENSORS_NAME
from .report import PLOT_FILE_TEMPLATE, PLOT_KINDS

if TYPE_CHECKING:  # the card reads the trajectory through its public methods only
    from .record import LRTrajectory

CARD_TEMPLATE_NAME = "metalr_card.md"
CARD_TAGS = ("hf-ddlr", "meta-learning", "learning-rate")
SECTION_START = "<!-- hf_ddlr:trajectory:start -->"
SECTION_END = "<!-- hf_ddlr:trajectory:end -->"
README_NAME = "README.md"

PLOT_TITLES = {
    "class": "Per-class learning-rate multipliers over epochs",
    "group": "Per-group learning-rate multipliers (data-mixture weights) over epochs",
    "instance": "Per-instance learning-rate multipliers over epochs",
    "weight_decay": "Learned weight decay and model learning rate over steps",
    "meta_loss": "Meta loss over steps",
}
_FILE_DESCRIPTIONS = {
    TRAJECTORY_TENSORS_NAME: "all recorded tensors (per-step LR / weight decay / meta loss, class and instance "
    "rate snapshots, noise mask)",
    TRAJECTORY_CONFIG_NAME: "schema version, dataset signature, label names, meta-learning settings",
}


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


def _dataset_rows(trajectory: LRTrajectory) -> list[tuple[str, str]]:
    """The card's table of the train set: its signature, the number of classes, the noisy-label count."""
    ds = trajectory.dataset or {}
    rows = [(k, _cell(ds[k])) for k in ("config", "split", "revision", "fingerprint", "num_examples")
            if ds.get(k) is not None]
    if trajectory.label_names:
        rows.append(("classes", str(len(trajectory.label_names))))
    if trajectory.noise_mask is not None:
        frac = float(trajectory.noise_mask.float().mean()) if trajectory.noise_mask.numel() else 0.0
        rows.append(("noisy labels", f"{int(trajectory.noise_mask.sum())} ({frac:.1%}), mask stored"))
    return rows


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
    if trajectory.has_group_rates:
        column = (trajectory.groups or {}).get("column")
        levels.append("per-group learning-rate multipliers (data-mixture weights" + (f" by `{column}`)" if column
                                                                                     else ")"))
    lr_level = cfg.get("lr_level") or (
        "both" if len(levels) == 2 else ("class" if trajectory.has_class_rates else "instance")
    )
    plot_names = [os.path.basename(p) for p in plots]
    files = [(TRAJECTORY_TENSORS_NAME, _FILE_DESCRIPTIONS[TRAJECTORY_TENSORS_NAME]),
             (TRAJECTORY_CONFIG_NAME, _FILE_DESCRIPTIONS[TRAJECTORY_CONFIG_NAME])]
    files += [(name, "plot") for name in plot_names]
    if repo_id is None:
        repo_id = model_name if "/" in model_name else "user/repo"
    return {
        "model_name": model_name,
        "dataset_name": dataset_name or ds.get("id") or "an unnamed dataset",
        "dataset_rows": _dataset_rows(trajectory),
        "levels_text": " and ".join(levels) or "learning-rate multipliers",
        "learns_wd": bool(cfg.get("learn_weight_decay", trajectory.num_steps > 0)),
        "averaged": cfg.get("averaged_over_runs"),
        "replayed": cfg.get("mode") == "replay",
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
    text = render_model_card(trajectory, model_name=name, dataset_name=dataset_name, base_card_text=model_card_base,
                             plots=plots, extra=extra, repo_id=repo_id)
    readme.write_text(text, encoding="utf-8")
    written.append(str(readme))
    return written
