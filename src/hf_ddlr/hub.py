"""Hub side of learned LR trajectories: model card, output-folder artifacts, uploads that fail helpfully.

The trainer calls :func:`write_artifacts` from its ``create_model_card`` / ``push_to_hub`` override
(after ``Trainer.create_model_card`` wrote ``README.md``), so the trajectory files, the PNG plots and a
"Learned learning-rate trajectory" card section land in ``output_dir`` and travel with the model in
``Trainer.push_to_hub``'s ``upload_folder``. A trajectory on its own goes up with
:meth:`hf_ddlr.trajectory.LRTrajectory.push_to_hub`.

This module gathers that API in one place. The card lives in :mod:`hf_ddlr.trajectory.card` and the
uploads in :mod:`hf_ddlr.upload`: this module depends on the trajectory package, never the reverse.
"""

from __future__ import annotations

from typing import Any

from .trajectory.card import (
    CARD_TAGS,
    CARD_TEMPLATE_NAME,
    PLOT_TITLES,
    README_NAME,
    SECTION_END,
    SECTION_START,
    card_template_text,
    render_model_card,
    write_artifacts,
)
from .trajectory.record import LRTrajectory
from .upload import HubUploadError, retry_command, upload_folder_with_retry_message

__all__ = [
    "CARD_TAGS",
    "CARD_TEMPLATE_NAME",
    "PLOT_TITLES",
    "README_NAME",
    "SECTION_END",
    "SECTION_START",
    "HubUploadError",
    "card_template_text",
    "push_trajectory",
    "render_model_card",
    "retry_command",
    "upload_folder_with_retry_message",
    "write_artifacts",
]


def push_trajectory(trajectory: LRTrajectory, repo_id: str, **options: Any) -> Any:
    """Upload ``trajectory`` with its plots and card to ``repo_id``: :meth:`LRTrajectory.push_to_hub`
    (``options`` are its keyword arguments)."""
    return trajectory.push_to_hub(repo_id, **options)
