"""Which loss :class:`~hf_ddlr.MetaLRTrainer` weights: the task of the model, chosen once at construction.

The task (:data:`hf_ddlr.meta.losses.TASKS`) is read from what the model's own loss is chosen by in
transformers: the model class's head (``*ForCausalLM``, ``*ForTokenClassification``, an encoder-decoder
``*ForConditionalGeneration`` / ``*ForSeq2SeqLM``, ``*ForMaskedLM``) and, for a sequence-level head,
``config.problem_type``, or, when it is unset, ``num_labels`` and the labels' dtype as the
``*ForSequenceClassification`` models infer it (one output: regression; integer labels: single-label
classification; float labels: multi-label classification). A model without a config (a plain
``nn.Module``) is a single-label classifier.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from transformers.utils import logging

from ._datasets import LABEL_KEYS, first_item
from .meta.losses import IGNORE_INDEX, SINGLE_LABEL, TASKS, TaskLoss, task_loss

logger = logging.get_logger(__name__)

__all__ = ["check_task_options", "decoder_inputs", "model_batch", "model_labels", "resolve_task",
           "warn_unweighted_terms"]

# model heads whose outputs none of the supported losses fit
_UNSUPPORTED_HEADS = ("ForQuestionAnswering", "ForCTC", "ForObjectDetection", "Segmentation", "ForDepthEstimation",
                      "ForMaskedImageModeling", "ForPreTraining", "ForZeroShot", "ForImageTextRetrieval")


@functools.cache
def _auto_classes(mapping: str) -> frozenset[str]:
    """The class names of one of transformers' auto-model mappings (what ``AutoModelFor...`` loads)."""
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for value in getattr(modeling_auto, mapping, {}).values():
        names.update([value] if isinstance(value, str) else value)
    return frozenset(names)


# LM heads whose loss predicts each position's own label under a permutation or masking objective (no shift): they
# are in the causal-LM auto mapping but fit neither the causal (shifted) nor the token-classification loss as used
_NO_SHIFT_LM_HEADS = ("XLNetLMHeadModel", "XLMWithLMHeadModel", "FlaubertWithLMHeadModel")


def _head_task(model: torch.nn.Module) -> str | None:
    """The token-level task of a transformers head class, None for a sequence-level (or unknown) one: by the
    class name's suffix, or, for the heads named otherwise (``GPT2LMHeadModel``, ``MarianMTModel``,
    ``EncoderDecoderModel``, ...), by transformers' own auto-model mappings."""
    name = type(model).__name__
    cfg = getattr(model, "config", None)
    if any(h in name for h in _UNSUPPORTED_HEADS) or name in _NO_SHIFT_LM_HEADS:
        raise ValueError(
            f"MetaLRTrainer cannot weight the loss of {name}: its outputs fit none of the supported tasks "
            f"({', '.join(TASKS)}; chosen from the model's class, config.problem_type and num_labels)."
        )
    if "ForTokenClassification" in name or "ForMaskedLM" in name:
        return "token_classification"
    if "ForCausalLM" in name:
        return "causal_lm"
    if "ForSeq2SeqLM" in name or ("ForConditionalGeneration" in name and getattr(cfg, "is_encoder_decoder", False)):
        return "seq2seq_lm"
    if "ForConditionalGeneration" in name:  # a decoder-only generator (e.g. a vision-language model)
        return "causal_lm"
    if name in _auto_classes("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"):
        return "seq2seq_lm"
    if name in _auto_classes("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"):
        return "causal_lm"
    if name in _auto_classes("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES") | _auto_classes(
            "MODEL_FOR_MASKED_LM_MAPPING_NAMES"):
        return "token_classification"
    return None


def _label_example(dataset: Any) -> torch.Tensor | None:
    """Row 0's label as a tensor (None when the set has no readable label)."""
    item = first_item(dataset) if dataset is not None else None
    key = next((k for k in LABEL_KEYS if item is not None and k in item), None)
    if key is None:
        return None
    try:
        return torch.as_tensor(item[key])
    except (TypeError, ValueError, RuntimeError):
        return None  # e.g. strings: the label-type check says what is wrong


def resolve_task(model: torch.nn.Module | None, train_dataset: Any) -> TaskLoss:
    """The :class:`~hf_ddlr.meta.losses.TaskLoss` of ``model`` on ``train_dataset`` (see the module doc)."""
    if model is None:
        return SINGLE_LABEL
    head = _head_task(model)
    if head is not None:
        return task_loss(head)
    cfg = getattr(model, "config", None)
    problem = getattr(cfg, "problem_type", None)
    if problem is not None:
        if problem not in TASKS:
            raise ValueError(f"config.problem_type={problem!r} is not supported by MetaLRTrainer; supported tasks: "
                             f"{', '.join(TASKS)}.")
        return task_loss(problem)
    if cfg is None or not getattr(cfg, "num_labels", None):
        return SINGLE_LABEL
    if cfg.num_labels == 1:
        return task_loss("regression")
    y = _label_example(train_dataset)
    if y is not None and y.dtype.is_floating_point and y.dim() == 1 and y.numel() == cfg.num_labels:
        return task_loss("multi_label_classification")
    return SINGLE_LABEL


def check_task_options(task: TaskLoss, lr_level: str, meta_strategy: str, label_smoothing: float,
                       group_column: str | None = None, center_instance_rates: bool = False,
                       instance_rate_scale: str = "batch", instance_signal: str = "auto") -> None:
    """Refuse, at construction, the options a task does not support: class-level rates (one class per example;
    group rates, keyed by ``group_column``, suit every task), instance rates centred per class (the same), the
    last-layer closed form (of single-label cross-entropy), label smoothing of a non-cross-entropy loss, the
    meta gradient split by the meta examples' class (``instance_signal="other_classes"``)."""
    if task is SINGLE_LABEL:
        return
    if instance_signal == "other_classes":
        raise ValueError(
            f"instance_signal='other_classes' splits the meta gradient by the meta examples' single class label; "
            f"the model's task is {task.task}. Use instance_signal='auto' (the mean product for this task) or "
            "'mean'."
        )
    per_class_options = (  # (set, as the user wrote it, what it does, the same within groups, option name)
        (center_instance_rates, "center_instance_rates=True", "centres", "Centre", "center_instance_rates"),
        (instance_rate_scale == "key", "instance_rate_scale='key'", "scales", "Scale", "instance_rate_scale"),
    )
    for on, given, does, do, name in per_class_options:
        if on and not group_column:
            raise ValueError(
                f"{given} {does} each instance rate's step within its class, which needs one class label per "
                f"example; the model's task is {task.task}. {do} within groups instead (lr_level='both' with "
                f"group_column='<column>'), or drop {name}."
            )
    if lr_level == "class" or (lr_level == "both" and not group_column):
        raise ValueError(
            f"lr_level={lr_level!r} learns a rate per class, which needs one class label per example; the "
            f"model's task is {task.task}. Class-level rates support single_label_classification only: use "
            f"lr_level='instance' for {task.task}, or group rates (lr_level='group' or 'both' with "
            f"group_column='<column>'), which suit every task."
        )
    if meta_strategy == "last_layer":
        raise ValueError(
            f"meta_strategy='last_layer' is the closed form of single-label cross-entropy; the model's task is "
            f"{task.task}. Use meta_strategy='jvp' (or 'finite_difference' / 'exact')."
        )
    if label_smoothing and task.task in ("multi_label_classification", "regression", "preference", "dpo"):
        raise ValueError(
            f"label_smoothing_factor={label_smoothing} smooths a cross-entropy over classes; the {task.task} loss "
            f"has none. Set label_smoothing_factor=0."
        )
    logger.info(f"MetaLRTrainer: the per-example loss is the {task.task} loss.")


def decoder_inputs(model: torch.nn.Module, inputs: Mapping[str, Any], labels: torch.Tensor,
                   task: TaskLoss) -> dict[str, Any]:
    """``inputs`` with the decoder inputs an encoder-decoder model would make from ``labels``: the model's forward
    gets no labels here, so ``decoder_input_ids`` (the labels shifted right) are added when the batch has none."""
    inputs = dict(inputs)
    if task.task != "seq2seq_lm" or "decoder_input_ids" in inputs or "decoder_inputs_embeds" in inputs:
        return inputs
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if prepare is None:
        raise ValueError(
            f"The batch has no decoder_input_ids and {type(model).__name__} has no "
            f"prepare_decoder_input_ids_from_labels: add decoder_input_ids to the batch, e.g. with "
            f"DataCollatorForSeq2Seq(tokenizer, model=model)."
        )
    inputs["decoder_input_ids"] = prepare(labels=labels)
    return inputs


def model_batch(model: torch.nn.Module, inputs: Mapping[str, Any], labels: torch.Tensor,
                task: TaskLoss) -> tuple[dict[str, Any], torch.Tensor]:
    """A batch's inputs and labels as the model's forward and the per-example loss see them: the decoder inputs
    an encoder-decoder model makes from the labels (:func:`decoder_inputs`), and the labels aligned with the
    logits (:func:`model_labels`)."""
    return decoder_inputs(model, inputs, labels, task), model_labels(model, labels, task)


# PEFT prompt-learning methods whose virtual tokens reach the model through the cache, not the sequence
_PEFT_PROMPTS_IN_CACHE = ("PREFIX_TUNING", "CARTRIDGE", "CPT")


def _peft_config(model: torch.nn.Module) -> tuple[Any, str | None]:
    """The active PEFT config of a PEFT model and its type's name (``"LORA"``, ``"PROMPT_TUNING"``, ...); (None,
    None) for any other model."""
    cfg = getattr(model, "active_peft_config", None)
    return (cfg, getattr(cfg.peft_type, "value", cfg.peft_type)) if cfg is not None else (None, None)


def model_labels(model: torch.nn.Module, labels: torch.Tensor, task: TaskLoss) -> torch.Tensor:
    """``labels`` aligned with the logits the model returns. A PEFT prompt-tuning (or p-tuning) causal LM prepends
    its virtual tokens to the sequence, so its logits are that many positions longer than the labels; PEFT's
    forward prepends as many ignored labels (-100) before its loss, and so does this (the per-example losses then
    equal the model's own)."""
    cfg, peft_type = _peft_config(model)
    if task.task != "causal_lm" or cfg is None or not getattr(cfg, "is_prompt_learning", False):
        return labels
    if peft_type in _PEFT_PROMPTS_IN_CACHE:
        return labels
    pad = torch.full((labels.shape[0], int(cfg.num_virtual_tokens)), IGNORE_INDEX, dtype=labels.dtype,
                     device=labels.device)
    return torch.cat([pad, labels], dim=1)


def warn_unweighted_terms(model: torch.nn.Module) -> None:
    """Say so when the model adds a term of its own to a loss it computes from labels, which the per-example
    losses the trainer weights (from the logits) leave out: AdaLoRA's orthogonal regularisation."""
    cfg, peft_type = _peft_config(model)
    if peft_type == "ADALORA" and cfg.orth_reg_weight > 0:
        logger.warning(
            f"MetaLRTrainer weights the per-example task losses computed from the logits; AdaLoRA adds its "
            f"orthogonal regularisation (orth_reg_weight={cfg.orth_reg_weight}) only to a loss computed from labels "
            f"inside the model, so this run trains without it. Set orth_reg_weight=0 in the AdaLoraConfig to "
            f"silence this."
        )
