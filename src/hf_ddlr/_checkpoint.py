"""The meta state in checkpoints: the rate table and the meta-gradient average saved next to the optimizer,
loaded back on resume (with the trajectory, cut at the resumed step) and with the best model.

The Trainer is reached as ``trainer`` so that tests/test_transformers_contract.py sees the uses of its members.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

import safetensors.torch
from transformers.utils import logging

from ._recording import AppliedInstanceRates, meta_settings
from .trajectory import TRAJECTORY_TENSORS_NAME, LRTrajectory

if TYPE_CHECKING:
    from .trainer import MetaLRTrainer

logger = logging.get_logger("hf_ddlr.trainer")

__all__ = ["META_GRAD_AVERAGE_NAME", "META_STATE_NAME", "load_best_meta_state", "load_meta_state",
           "save_meta_state", "save_rates"]

META_STATE_NAME = "meta_state.safetensors"
META_GRAD_AVERAGE_NAME = "meta_grad_average.safetensors"
RATE_METRIC_NAME = "rate_metric.safetensors"  # rate_metric "adam" (the default): the training gradient's 2nd moment
APPLIED_RATES_NAME = "applied_instance_rates.safetensors"  # probe runs: what each example was last trained with


def save_rates(trainer: MetaLRTrainer, output_dir: str) -> None:
    """Write the rates into checkpoint ``output_dir``: with the model, also under ``save_only_model=True``, so
    that ``load_best_model_at_end`` brings back the rates of the model it keeps."""
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in trainer.rates.state_dict().items()},
        os.path.join(output_dir, META_STATE_NAME),
    )


def save_meta_state(trainer: MetaLRTrainer, output_dir: str) -> None:
    """Write the running statistics of the meta step a resumed run continues (the meta-gradient average, the rate
    metric's second moment, the applied instance rates) into checkpoint ``output_dir``, beside its optimizer."""
    if trainer._meta_grad_average is not None:
        safetensors.torch.save_file(
            trainer._meta_grad_average.state_dict(), os.path.join(output_dir, META_GRAD_AVERAGE_NAME)
        )
    if trainer._rate_metric is not None:
        safetensors.torch.save_file(trainer._rate_metric.state_dict(), os.path.join(output_dir, RATE_METRIC_NAME))
    if trainer._applied_instance is not None:
        safetensors.torch.save_file(trainer._applied_instance.state_dict(), os.path.join(output_dir, APPLIED_RATES_NAME))


def load_best_meta_state(trainer: MetaLRTrainer) -> None:
    """``load_best_model_at_end``: the rates and the trajectory go back to the best checkpoint too, so that
    ``trainer.rates``, ``save_model`` and ``push_to_hub`` describe the model that is kept."""
    best = trainer.state.best_model_checkpoint
    if not best:
        return
    has_rates = os.path.isfile(os.path.join(best, META_STATE_NAME))
    if has_rates:
        trainer.rates.load_state_dict(safetensors.torch.load_file(os.path.join(best, META_STATE_NAME)))
    else:
        warnings.warn(
            f"The best checkpoint {best} holds no {META_STATE_NAME} (it was not written by this MetaLRTrainer "
            "version): its model is loaded, but trainer.rates stay those of the last step.",
            stacklevel=3,
        )
    if os.path.isfile(os.path.join(best, TRAJECTORY_TENSORS_NAME)):
        trainer.lr_trajectory = LRTrajectory.from_pretrained(best)
    logger.info(f"Loaded the {'rates and ' if has_rates else ''}LR trajectory of the best checkpoint {best} with its "
                "model.")


def _load_running_state(state: Any, path: str, device: Any, why_missing: str) -> None:
    """Load a running statistic of the meta step (the meta-gradient average, the rate metric's second moment) that
    train() made empty, from ``path``; a missing file is warned about (``why_missing``) and leaves it empty."""
    if state is None:
        return
    if os.path.isfile(path):
        state.load_state_dict(safetensors.torch.load_file(path), device)
    else:
        warnings.warn(f"{path} is missing {why_missing}", stacklevel=4)


def load_meta_state(trainer: MetaLRTrainer, checkpoint: str) -> None:
    """Resume: the rates, the meta-gradient average and the trajectory of ``checkpoint`` (each missing file
    is warned about: the run is then not an exact continuation)."""
    path = os.path.join(checkpoint, META_STATE_NAME)
    if not os.path.isfile(path):
        warnings.warn(
            f"{path} is missing: the learned rates restart from 1 (the checkpoint was not written by "
            "MetaLRTrainer, or with save_only_model=True by an earlier hf_ddlr). Training is not an exact continuation.",
            stacklevel=3,
        )
        return
    trainer.rates.load_state_dict(
        safetensors.torch.load_file(path), allow_resize=trainer.meta_args.resize_rates_on_resume
    )
    # (the optimizer gets the loaded weight decay with the first window's rates, before its first step)
    _load_running_state(
        trainer._meta_grad_average, os.path.join(checkpoint, META_GRAD_AVERAGE_NAME), trainer.args.device,
        "(a checkpoint written without meta_grad_average): the running average of the meta gradient starts again "
        "from this step. Training is not an exact continuation.",
    )
    _load_running_state(
        trainer._rate_metric, os.path.join(checkpoint, RATE_METRIC_NAME), trainer.args.device,
        "(a checkpoint written with rate_metric='optimizer' or by an hf_ddlr before rate_metric): where the "
        "optimizer is not Adam's, the second moment of the training gradient in which the products are taken starts "
        "again from this step and training is not an exact continuation (under Adam/AdamW it holds nothing: the "
        "continuation is exact).",
    )
    if trainer._applied_instance is not None:
        applied_path = os.path.join(checkpoint, APPLIED_RATES_NAME)
        saved = safetensors.torch.load_file(applied_path) if os.path.isfile(applied_path) else None
        trainer._applied_instance = AppliedInstanceRates.resumed(trainer.rates.instance, saved)
    if os.path.isfile(os.path.join(checkpoint, TRAJECTORY_TENSORS_NAME)):
        _resume_trajectory(trainer, checkpoint)


def _resume_trajectory(trainer: MetaLRTrainer, checkpoint: str) -> None:
    """The trajectory now describes this run (its schedule may be longer than the checkpointed one's)."""
    trainer.lr_trajectory = trainer.lr_trajectory.resume_from(
        checkpoint, trainer.state.global_step, config=meta_settings(trainer)
    )
