"""The meta step's options: :class:`MetaLROptions` (the options alone), :class:`MetaLRConfig`
(``TrainingArguments`` plus those options, each documented for the CLI) and :func:`resolve_meta_options`,
which reads the options from any ``TrainingArguments`` (a user's subclass, TRL's configs): the value of an
attribute that exists, MetaLRConfig's default otherwise."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import TrainingArguments

from .meta.engine import INSTANCE_SIGNALS as _SIGNALS
from .meta.engine import STRATEGIES
from .meta.losses import META_OBJECTIVES
from .meta.parameters import PARAMETER_CHOICES, meta_parameters_pattern
from .meta.rates import (
    INSTANCE_AT_CAP,
    INSTANCE_CENTERS,
    INSTANCE_GRADIENTS,
    INSTANCE_LEVELS,
    INSTANCE_NORMALIZATIONS,
    INSTANCE_SCALES,
    LEVELS,
)

__all__ = ["MetaLRConfig", "MetaLROptions", "check_meta_options", "rate_metric_choice", "resolve_meta_options"]

UPDATES = ("same_step", "delayed")
LOOKAHEADS = ("optimizer", "sgd")
RATE_METRICS = ("auto", "optimizer", "adam")
SCALINGS = ("normalized", "raw")
CLASS_RATE_DIRECTIONS = ("average", "per_step")
INSTANCE_SIGNALS = ("auto", *_SIGNALS)
OBJECTIVE_CHOICES = ("auto", *META_OBJECTIVES)


def _option(default: Any, help_text: str, choices: tuple[str, ...] | None = None) -> Any:
    """A field of :class:`MetaLROptions` with the help text (and the choices) of its command-line flag."""
    metadata: dict[str, Any] = {"help": help_text}
    if choices is not None:
        metadata["choices"] = list(choices)
    return field(default=default, metadata=metadata)


@dataclass
class MetaLROptions:
    """The options of the data-dependent learning rates (Saxena, Vyas & DeCoste), without ``TrainingArguments``.

    :class:`MetaLRConfig` is ``TrainingArguments`` plus these fields. They are a separate dataclass so that
    the trainer can read them from an args object of another class (``MetaLRTrainer.meta_args``), and so
    that a project with its own ``TrainingArguments`` subclass can add them as CLI flags by mixing them in:
    ``@dataclass class MyConfig(MetaLROptions, SFTConfig): ...`` (``MetaLROptions`` first).

    The fields are grouped by purpose: what is learned; how the rates move; how the meta-gradient is
    computed; when the meta step runs; the data it reads; replay and resume.
    """

    # ---- What is learned
    lr_level: str = _option(
        "instance",
        "Which learning-rate multipliers to learn: 'instance' (one per training example), 'class' "
        "(one per label), 'group' (one per value of group_column: the data-mixture weights) or 'both' (the "
        "product of the instance rate and the class rate, or the group rate when group_column is set).",
        choices=LEVELS,
    )
    group_column: str | None = _option(
        None,
        "Train-set column whose values group the examples for lr_level='group' (or 'both': instance x group): "
        "any categorical column (ints or strings: data source, domain, task, language), at most 1000 distinct "
        "values. Every group gets one learned rate, keyed by the sorted distinct values; the meta set needs no "
        "such column. Works for every task (class rates need single-label classification).",
    )
    learn_weight_decay: bool = _option(
        False,
        "Learn the weight-decay coefficient by the same meta-gradient (paper §2.3), starting from "
        "`weight_decay`. The learned value is what the optimizer applies to its decay parameter groups.",
    )
    max_rate: float | None = _option(
        None,
        "Optional upper bound for every rate (rates are always clamped at 0). None (`inf` on a command line): "
        "no bound.",
    )
    max_instance_rate: float | None = _option(
        1.0,
        "Upper bound of the per-example rates (lr_level 'instance' or 'both'; the tighter of this and max_rate "
        "applies). At 1 an example's own rate can slow it down or stop it, never speed it up: the learned "
        "multipliers are example weights in [0, 1], as in Learning to Reweight and Meta-Weight-Net, and speed-ups "
        "are left to class and group rates, which stay unbounded. Uncapped, the rates of clean examples drift "
        "above 1 and raise the effective learning rate, which cost accuracy under constant or momentum "
        "schedules; the cap raised the runs at or above the plain Trainer from 76 to 88 percent of the robustness "
        "matrix (docs/robustness.md, 'Instance rates capped at 1'). For a network far from fitting its data in "
        "the run's length, try 1.5: it leaves fewer clean and mislabelled examples tied at the cap (an "
        "under-trained ResNet: rate AUROC 0.889 -> 0.912 and accuracy 0.675 -> 0.698 over nine seeds) but costs "
        "small CNNs trained with momentum up to 1.7 points (docs/robustness.md, 'Room above 1'). None (`inf` on "
        "a command line): no bound but max_rate (the paper's rule).",
    )
    instance_rate_normalization: str = _option(
        "none",
        "How the per-example rates are applied. 'none' (default): as learned. 'median': divided by "
        "max(1, the median instance rate), recomputed every step, so that with max_instance_rate above 1 the "
        "rates keep their room relative to each other while the typical example trains at the optimizer's own "
        "learning rate; it changes nothing while the rates stay at or below 1 (the default cap). Measured with "
        "max_instance_rate=1.5 (docs/robustness.md, 'Room above 1 with the typical example at the optimizer's "
        "rate'): small CNNs trained with momentum at a constant rate gain 0.9-1.2 points over the undivided cap, "
        "the rates rank as with the cap alone, Adam's steps do not change, and a ResNet far from fitting its "
        "data under plain SGD, which wanted the larger step, trains 1.4 points worse; across the robustness "
        "matrix it is not better than the default cap of 1. The trajectory records the rates as applied, so a "
        "replay reproduces them.",
        choices=INSTANCE_NORMALIZATIONS,
    )

    # ---- How the rates move: the step sizes and scaling of their update
    meta_lr: float = _option(
        0.1,
        "Step size of the rate update. With meta_lr_scaling='normalized' (default) it is the typical "
        "change of an instance rate per visit (0.03-0.3 all work) and the largest total change of the class "
        "rates per step; with 'raw' it multiplies the raw meta-gradient as in the paper and needs tuning "
        "per model and learning rate.",
    )
    meta_lr_scaling: str = _option(
        "normalized",
        "'normalized': divide each level's meta-gradient by its mean absolute value over the batch, "
        "so meta_lr does not depend on the learning rate, batch size or gradient scale. 'raw': the paper's "
        "plain SGD on the meta-gradient.",
        choices=SCALINGS,
    )
    instance_rate_gradient: str = _option(
        "effective",
        "With lr_level='both' (an example's rate is its instance rate times its class or group rate): what "
        "the instance rate steps on. 'effective': the meta-gradient of the example's whole rate, so an "
        "example keeps learning its own rate when its class or group rate is near 0 (a descent direction for "
        "the instance rate wherever that rate is > 0: the chain rule's gradient divided by it). 'chain_rule': "
        "the exact gradient of the product, the class or group rate times that meta-gradient; an example of a "
        "group whose rate reached 0 then gets no update. The class or group rates follow the chain rule either "
        "way.",
        choices=INSTANCE_GRADIENTS,
    )
    class_rate_direction: str = _option(
        "per_step",
        "With class or group rates and the meta-gradient average on: the meta-gradient direction the class or "
        "group rates step on. 'per_step' (default): this step's own meta gradient (with lr_level='both' one more "
        "set of products per meta step; with class or group rates alone, the same number). 'average': the "
        "running average, like the instance rates — class and group rates move at every step, so on the "
        "average's lagging direction they keep moving after the balance has passed and can swing with a "
        "growing amplitude (on a binary fine-tune, 21 points of accuracy lost; docs/robustness.md). Instance "
        "rates, which move once per epoch, keep the average either way.",
        choices=CLASS_RATE_DIRECTIONS,
    )
    center_instance_rates: bool | None = _option(
        None,
        "Step each instance rate on its meta-gradient minus the mean (or median: instance_rate_center) over the "
        "batch's examples of its class (or of its group, with group_column), so that the instance rates learn "
        "which examples to prefer within a class and leave whole-class preferences (the meta set's class balance "
        "against the train set's) to class rates or to no one. None (default): on where the instance rates step "
        "on the other classes' share (instance_signal, resolved), centred on the median — that share leans "
        "negative for every example, and uncentred every rate drifts down together, which under plain SGD cuts "
        "the learning rate — and off otherwise. With the paper's mean product (instance_signal='mean') centring "
        "raised accuracy where label noise unbalances the classes and in short plain-SGD runs, but lowered the "
        "rates' noisy/clean AUROC slightly in most other cells (docs/robustness.md). Needs class labels or a "
        "group_column, and an instance level ('instance' or 'both').",
    )
    instance_rate_center: str = _option(
        "auto",
        "With the instance rates centred: what is subtracted from each instance rate's meta-gradient, the 'mean' or "
        "the (lower) 'median' of the batch's examples of its class (or group). 'auto' (default): the median where "
        "the instance rates step on the other classes' share (instance_signal), the mean otherwise. The median is "
        "the typical, clean example's product, which the few large products of mislabelled examples do not pull: "
        "an example no better than its typical classmate stands still instead of resting at the cap of 1 beside "
        "it, and one worse moves down (docs/robustness.md, 'Instance rates centred on their class's median'). "
        "Every label needs several examples per batch: a label seen once has a centred step of 0.",
        choices=("auto", *INSTANCE_CENTERS),
    )
    instance_signal: str = _option(
        "auto",
        "What each instance rate steps on. 'mean' (the paper): its example's gradient's product with the meta "
        "set's mean gradient at the lookahead. 'other_classes': that product without the share of the meta "
        "examples of the example's own label, taken over the classification head in closed form (no extra pass "
        "over the model for the step's own examples; the probes take one forward). A mislabelled example's gradient raises its wrong label's logit for every input, which "
        "helps the meta examples of that label: that share ranks mislabelled examples above clean ones and hides "
        "the harm done to the other classes (docs/robustness.md, 'The meta gradient split by class'). 'auto' "
        "(default): 'other_classes' where it applies — single-label classification, meta_strategy 'jvp' or "
        "'finite_difference', an instance level, and a linear classification head that trains and that the "
        "lookahead moves — and 'mean' otherwise (token-level, regression, multi-label and preference tasks).",
        choices=INSTANCE_SIGNALS,
    )
    instance_rate_at_cap: str = _option(
        "auto",
        "What an instance rate at its cap (max_instance_rate, 1 by default) does with a step that would take it "
        "past the cap. 'clamp': the step is discarded, so every example that wanted to go up rests at the cap, "
        "tied, however much less it helped than its classmates. 'relative': the rate steps instead on its "
        "meta-gradient minus the (lower) median of the batch's examples of its class (or group), so an example that "
        "helps less than its typical classmate steps down from the cap; below the cap every rate keeps its own "
        "step, which pulls clean examples back up. 'auto' (default): 'relative' on a fine-tune of a pretrained "
        "model (where meta_parameters resolves to its head) and where the model trains with SGD without momentum, "
        "'clamp' otherwise (momentum SGD, Adam). On the robustness matrix (docs/robustness.md, 'Instance rates at "
        "the cap: a step relative to the typical classmate') 'relative' ranked every fine-tune better (+0.008 to "
        "+0.011 AUROC; +0.008 to +0.016 on held-out seeds) at the same accuracy, and the plain-SGD runs as well "
        "or better (the under-trained ResNet 0.899 -> 0.919; 16 of 19 held-out plain-SGD runs at or above plain "
        "against 13), but cost the 8-epoch momentum CNNs up to 1.5 points, whose mislabelled examples are "
        "already far below the cap.",
        choices=("auto", *INSTANCE_AT_CAP),
    )
    instance_rate_scale: str = _option(
        "batch",
        "What meta_lr is the typical step of, with meta_lr_scaling='normalized'. 'batch' (default): each "
        "instance rate's step is divided by the mean |meta-gradient| of the batch's examples. 'key': by the mean "
        "over the batch's examples of its own class (or group, with group_column), so every class or source "
        "moves by about meta_lr per visit even when another one's products are much larger (a corrupted source "
        "whose examples are barely trained). Measured on examples/sft_noisy_data.py (instance x source rates, 3 "
        "seeds): instance-rate AUROC 0.846 -> 0.880 on average, better on every seed; with class keys it ranked "
        "better within each label and trained to higher accuracy but ranked worse across labels "
        "(docs/robustness.md). Needs class labels or a group_column, and an instance level.",
        choices=INSTANCE_SCALES,
    )
    weight_decay_meta_lr: float = _option(
        0.01,
        "Step size of the weight-decay update. With 'normalized' scaling wd moves multiplicatively: log(wd) "
        "steps by weight_decay_meta_lr times the meta-gradient over its running RMS, clipped to 3x that "
        "(about a 1 percent change per step at 0.01, never more than 3 percent); with 'raw' scaling the raw SGD step.",
    )

    # ---- How the meta-gradient is computed
    meta_strategy: str = _option(
        "jvp",
        "How the per-example meta-gradients are computed: 'jvp' (forward-mode AD, exact), "
        "'finite_difference' (exact to ~1e-5 in fp32, cheaper; falls back to jvp under bf16/fp16 and on a GPU that runs the model in TF32), "
        "'exact' (double backward, the Learning-to-Reweight way; the reference) or 'last_layer' "
        "(closed form on the final linear layer; a cheap proxy).",
        choices=STRATEGIES,
    )
    layerwise_dots: bool = _option(
        True,
        "With meta_strategy='jvp', meta_update='same_step' and one micro-batch per step, take the "
        "dot products and both weighted gradients from the real forward's layer inputs and output "
        "gradients (one matmul per linear layer) instead of a forward-mode pass and a second backward: the "
        "same numbers at a lower cost. Applies to models whose trainable parameters all sit in "
        "nn.Linear / nn.Embedding / nn.LayerNorm / RMSNorm / GPT-2 Conv1D layers without BatchNorm "
        "(transformers encoders and decoders); it is checked "
        "against forward mode on the first meta step and falls back to forward mode with a warning when "
        "it does not match. On this path the lookahead of a large word-embedding table is computed on the "
        "rows the batch and the meta batch look up (the same values; checked once against the full "
        "lookahead). False: always forward mode.",
    )
    lookahead: str = _option(
        "optimizer",
        "'optimizer' (default): the lookahead is the real optimizer's next iterate — the gradient "
        "clipped to max_grad_norm as the Trainer does, then momentum SGD, or Adam/AdamW, RMSprop, Adagrad or "
        "Adafactor (transformers' and torch's) with this step's second moment (and Adafactor's update clipping) "
        "held constant in the derivatives, so the meta-gradient is preconditioned "
        "like the real update (another optimizer: the 'sgd' lookahead, with a warning). 'sgd': the paper's "
        "plain-SGD lookahead at the current learning rate (no clipping, no momentum); with the Trainer's default clipping its step is often many times the real one and the "
        "meta-gradient then mostly measures that overshoot (docs/robustness.md).",
        choices=LOOKAHEADS,
    )
    lookahead_step: float = _option(
        1.0,
        "Share of the real step the lookahead takes, in [0, 1]: the meta loss is differentiated at "
        "theta + lookahead_step x (the next iterate - theta), with the whole step's dependence on the rates. 1 "
        "(default): the one-step lookahead of the paper. 0: the first-order meta-gradient (the meta loss's "
        "gradient at theta itself, as first-order DARTS), which leaves out the step's overshoot along the "
        "sharpest directions: on plain-SGD recipes it ranked noisy examples better (docs/robustness.md, "
        "'The lookahead's step'), elsewhere it made no difference.",
    )
    rate_metric: str = _option(
        "auto",
        "The metric in which every example's gradient is compared with the meta gradient. 'optimizer': the real "
        "step's, i.e. the paper's meta-gradient (Adam/AdamW, RMSprop, Adagrad and Adafactor divide each coordinate "
        "by the root "
        "of their second moment; SGD, with or without momentum, does not). 'adam': where the optimizer does not "
        "precondition its step, each parameter's share of the products is divided as an Adam step would divide it, by the root of a "
        "running mean (0.999, bias-corrected) of its squared clipped training gradient (folded in at every meta "
        "step), so that the coordinates with the largest gradients (a deep network's lower layers, normalisation "
        "parameters) do not set the products alone; one more parameter-sized fp32 buffer. 'auto' (default): 'adam', except under "
        "meta_strategy='exact' (which differentiates the real lookahead: 'optimizer'). Under Adam/AdamW, RMSprop, "
        "Adagrad and Adafactor both are the same. On plain-SGD recipes 'adam' ranked mislabelled examples better (a ResNet: "
        "AUROC 0.87 -> 0.90), with momentum it made no difference (docs/robustness.md, 'The products in Adam's metric'). The weight "
        "decay's meta-gradient stays the real step's.",
        choices=RATE_METRICS,
    )
    meta_grad_average: float = _option(
        0.97,
        "Compare every example's gradient with an exponential moving average (this factor) of the "
        "meta-loss gradient over recent meta steps instead of this step's value alone. The per-step value "
        "is noisy in ways unrelated to any example (the meta batch is a small sample; at a real learning "
        "rate the lookahead overshoots along the sharpest directions, with a sign that alternates from step "
        "to step); the average keeps the persistent direction. Costs one parameter-sized fp32 buffer. 0: "
        "the paper's per-step meta-gradient. The default 0.97 averages over ~30 meta steps "
        "(docs/robustness.md).",
    )
    meta_grad_average_epochs: float | None = _option(
        None,
        "Set the average's span in epochs instead of a fixed factor: the factor becomes "
        "1 - meta_interval / (this x optimizer steps per epoch), so the average covers the same share of the "
        "data whatever the train-set and batch sizes (0.5: half an epoch, which on 60 steps per epoch is the "
        "default 0.97 and on a 21-step epoch 0.9). Overrides meta_grad_average when set. Off by default; "
        "docs/robustness.md has the measurement.",
    )
    probe_batches: float | None = _option(
        None,
        "Training examples each meta step also scores outside the step, as a multiple of the step's own "
        "(per_device_train_batch_size x gradient_accumulation_steps per device). A probed example's rate moves on "
        "the meta-gradient of its weight as if it were in the step at weight 0 (the derivative Learning to "
        "Reweight takes; the step itself does not change), in the same normalized update as the step's examples, "
        "so every instance rate is updated 1 + probe_batches times per epoch instead of once. The rates sum a "
        "few per-visit signals, and in short runs (2-4 epochs) the paper's one visit per epoch was too few "
        "(docs/robustness.md, 'Probes'). Each probe costs a forward-mode pass over its micro-batch (about a plain "
        "training step; less with a cheap step). None (default): 1 for tasks with one loss per example "
        "(classification, regression), 0 for tasks with logits per token (causal LM, seq2seq, token "
        "classification, DPO), whose forward-mode pass through the vocabulary costs a whole step and whose runs are long. 0: the paper's "
        "rule. Instance levels with history only (keep_history=True); the probes go through the train set in "
        "shuffled passes of their own, and the trajectory then records the rates each example was trained with "
        "(a replay applies them exactly).",
    )
    meta_parameters: str = _option(
        "auto",
        "The parameters the meta step looks ahead on: the lookahead moves them only (the real step still moves "
        "every trainable parameter, and clips by their whole gradient norm), so each example's meta-gradient is "
        "the sum of its products over them. 'all': every trainable parameter (the paper). 'head': those after "
        "the model's stack of blocks (the nn.ModuleList of layers): the pooler, final norm and classifier. "
        "'auto' (default): 'head' for a fine-tune of a pretrained model (loaded with from_pretrained, not a "
        "PEFT model) on a task with one loss per example, 'all' otherwise. On a pretrained encoder the lower "
        "layers' part of the meta-gradient follows the input's resemblance to the few meta examples more than "
        "the label's correctness: with the head's part alone MiniLM ranks mislabelled words better and trains "
        "better, and the meta step costs less (docs/robustness.md, 'The head's meta-gradient'). Any other value "
        "is a regular expression; the trainable parameters whose names it finds (re.search) are taken. "
        "meta_strategy='last_layer' is its own restriction (the classification layer) and ignores this.",
    )
    meta_objective: str = _option(
        "auto",
        "What the lookahead is scored by on the meta batch. 'loss': the task's loss, averaged (the paper's "
        "validation loss). 'bounded': the mean over meta examples of 1 - exp(-loss), for cross-entropy "
        "1 - p(label), the meta set's expected error: a meta example's pull on the direction is bounded, so the "
        "few meta examples a model cannot fit do not set it alone and those it already fits keep a share. "
        "'auto' (default): 'bounded' where the meta step looks ahead on the head of a pretrained model (see "
        "meta_parameters), 'loss' otherwise. On pretrained MiniLM fine-tunes with 20 meta words, a meta set of "
        "which the model got 5 wrong made the rates rank mislabelled words at 0.83 under 'loss', 0.94 under "
        "'bounded'; on models trained from scratch, which get many meta examples wrong for most of the run, "
        "'bounded' ranks far worse (docs/robustness.md, 'The meta objective'). 'log': the mean over meta examples "
        "of log(loss), each meta example pulling by its loss's relative change, so those the model already fits "
        "pull as much as those it gets wrong; an option for a model that fits its meta set (the causal-LM SFT "
        "example: instance-rate AUROC 0.861 -> 0.899 over six seeds, 0.803 -> 0.855 on a held-out variant), worse "
        "on classifiers trained from scratch (ResNet 0.899 -> 0.823). The logged "
        "meta_loss is the task's loss either way. meta_strategy='last_layer' takes 'loss' only.",
        choices=OBJECTIVE_CHOICES,
    )
    meta_dropout: bool = _option(
        False,
        "Evaluate the meta loss with dropout active. Default False: the meta loss is a held-out "
        "validation loss and is computed like one (dropout and other train-only randomness off; BatchNorm "
        "still uses batch statistics like the real step), which gives a less noisy meta-gradient and skips "
        "the dropout masks' cost. The training-batch passes always replay the real step's dropout.",
    )
    fd_epsilon: float = _option(
        3e-6,
        "Relative step of meta_strategy='finite_difference': eps = fd_epsilon * |theta| / |T|. "
        "Measured on a CIFAR ResNet-18 (ReLU kinks make truncation error dominate): cosine with the exact "
        "meta-gradient 0.99998 at 3e-6, 0.99993 at 1e-5, 0.9998 at 3e-5; rounding dominates below 1e-6.",
    )

    # ---- When the meta step runs and what it starts from
    meta_update: str = _option(
        "same_step",
        "'same_step': the real step uses the freshly updated rates (paper). 'delayed': the real step "
        "uses the current rates and the meta-gradient is rebuilt from its gradient; the new rates apply "
        "from the example's next visit (no second backward).",
        choices=UPDATES,
    )
    meta_interval: int = _option(1, "Run a meta step every k optimizer steps; rates are held in between.")
    keep_history: bool = _option(
        True,
        "Keep the learned rates across steps and epochs (the paper's method). False resets them to 1 "
        "before every meta step: the paper's no-history ablation, close to Learning to Reweight.",
    )

    # ---- Data: the meta batch and the index column
    meta_batch_size: int | None = _option(
        None,
        "Meta-set examples per meta step and device. Default: the examples per optimizer step and "
        "device (per_device_train_batch_size x gradient_accumulation_steps), half of them (rounded up) for a "
        "causal LM, whose meta pass through the vocabulary-wide output layer costs as much as a training step "
        "(measured: docs/speed.md). A meta set smaller than this is "
        "used whole at every meta step; a larger one is taken in turn, a new shuffled order each pass, so every "
        "meta example counts equally in the meta-gradient average (docs/robustness.md).",
    )
    index_column: str = _option(
        "sample_index",
        "Column holding each training example's row index (added when missing). Kept for training "
        "batches only and never passed to the model.",
    )

    # ---- Replay and resume
    replay_trajectory: str | None = _option(
        None,
        "Hub repo id or local folder of a learned LR trajectory to replay instead of learning rates "
        "(no meta set needed). The train set must match the trajectory's size and fingerprint.",
    )
    check_fingerprint: bool = _option(
        True,
        "With replay_trajectory: refuse a train set whose datasets fingerprint differs from the one "
        "the trajectory was learned on. False replays anyway when you know the rows are the same (e.g. "
        "the data was rebuilt by other code); a different size is always refused.",
    )
    resize_rates_on_resume: bool = _option(
        False,
        "When resuming onto a train set of another size, keep the overlapping rows of the instance "
        "table instead of failing.",
    )

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # TrainingArguments' own set-up first (MetaLRConfig, or a user's mix-in)
            parent()
        for name in ("max_rate", "max_instance_rate"):  # `--max_rate inf` on a command line: no bound
            if getattr(self, name) == math.inf:
                setattr(self, name, None)
        check_meta_options(self, getattr(self, "weight_decay", None))


def check_meta_options(opts: Any, weight_decay: float | None = None) -> None:
    """Raise ``ValueError`` naming the option and the fix when the meta options ``opts`` are not valid.

    ``opts`` is anything with :class:`MetaLROptions`' attributes (a ``MetaLRConfig``, a resolved
    :class:`MetaLROptions`). ``weight_decay`` is the ``TrainingArguments`` value the learned weight decay starts
    from; ``None`` skips the one check that needs it.
    """
    checks = [
        ("lr_level", opts.lr_level, LEVELS),
        ("meta_strategy", opts.meta_strategy, STRATEGIES),
        ("meta_update", opts.meta_update, UPDATES),
        ("lookahead", opts.lookahead, LOOKAHEADS),
        ("rate_metric", opts.rate_metric, RATE_METRICS),
        ("meta_lr_scaling", opts.meta_lr_scaling, SCALINGS),
        ("instance_rate_gradient", opts.instance_rate_gradient, INSTANCE_GRADIENTS),
        ("class_rate_direction", opts.class_rate_direction, CLASS_RATE_DIRECTIONS),
        ("instance_rate_scale", opts.instance_rate_scale, INSTANCE_SCALES),
        ("instance_rate_center", opts.instance_rate_center, ("auto", *INSTANCE_CENTERS)),
        ("instance_signal", opts.instance_signal, INSTANCE_SIGNALS),
        ("instance_rate_at_cap", opts.instance_rate_at_cap, ("auto", *INSTANCE_AT_CAP)),
        ("instance_rate_normalization", opts.instance_rate_normalization, INSTANCE_NORMALIZATIONS),
        ("meta_objective", opts.meta_objective, OBJECTIVE_CHOICES),
    ]
    for name, value, allowed in checks:
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, allowed))}.")
    for name in ("meta_lr", "weight_decay_meta_lr", "fd_epsilon"):
        v = getattr(opts, name)
        if not v >= 0:
            raise ValueError(f"{name} must be >= 0, got {v}. It is a step size; use 0 to freeze the values.")
    if not 0.0 <= opts.lookahead_step <= 1.0:
        raise ValueError(
            f"lookahead_step must be in [0, 1], got {opts.lookahead_step}: it is the share of the real step the "
            "lookahead takes (1: the paper's one-step lookahead, 0: the first-order meta-gradient at theta)."
        )
    if not 0.0 <= opts.meta_grad_average < 1.0:
        raise ValueError(
            f"meta_grad_average must be in [0, 1), got {opts.meta_grad_average}: it is the factor of a moving "
            "average (0 turns it off)."
        )
    if opts.meta_grad_average_epochs is not None and not opts.meta_grad_average_epochs > 0:
        raise ValueError(
            f"meta_grad_average_epochs must be > 0 (a span in epochs) or None, got {opts.meta_grad_average_epochs}."
        )
    _check_group_options(opts.lr_level, opts.group_column)
    if opts.center_instance_rates and opts.lr_level not in INSTANCE_LEVELS:
        raise ValueError(
            f"center_instance_rates=True centres the instance rates' steps, but lr_level={opts.lr_level!r} has no "
            "instance rates: use lr_level='instance' or 'both', or drop center_instance_rates."
        )
    if opts.instance_rate_center not in ("auto", "mean") and opts.center_instance_rates is False:
        raise ValueError(
            f"instance_rate_center={opts.instance_rate_center!r} chooses what center_instance_rates subtracts, but "
            "center_instance_rates is off: set center_instance_rates=True (or leave it unset), or drop "
            "instance_rate_center."
        )
    if opts.instance_signal == "other_classes" and opts.lr_level not in INSTANCE_LEVELS:
        raise ValueError(
            f"instance_signal={opts.instance_signal!r} changes what the instance rates step on, but "
            f"lr_level={opts.lr_level!r} has no instance rates: use lr_level='instance' or 'both', or drop "
            "instance_signal."
        )
    if opts.instance_signal == "other_classes" and opts.meta_strategy not in ("jvp", "finite_difference"):
        raise ValueError(
            f"instance_signal='other_classes' is taken with meta_strategy='jvp' or 'finite_difference', not "
            f"{opts.meta_strategy!r}: use one of those, or instance_signal='mean'."
        )
    if opts.instance_rate_at_cap == "relative" and opts.lr_level not in INSTANCE_LEVELS:
        raise ValueError(
            f"instance_rate_at_cap={opts.instance_rate_at_cap!r} changes the instance rates' steps at their cap, but "
            f"lr_level={opts.lr_level!r} has no instance rates: use lr_level='instance' or 'both', or drop "
            "instance_rate_at_cap."
        )
    if opts.instance_rate_scale == "key" and (opts.lr_level not in INSTANCE_LEVELS
                                              or opts.meta_lr_scaling != "normalized"):
        raise ValueError(
            f"instance_rate_scale='key' sets the scale of the normalized instance-rate step per class or group, but "
            f"lr_level={opts.lr_level!r} with meta_lr_scaling={opts.meta_lr_scaling!r} has no such step: use an "
            "instance level ('instance' or 'both') with meta_lr_scaling='normalized', or drop instance_rate_scale."
        )
    if not _is_int(opts.meta_interval) or opts.meta_interval < 1:
        raise ValueError(f"meta_interval must be a positive integer, got {opts.meta_interval!r}.")
    if opts.meta_batch_size is not None and (not _is_int(opts.meta_batch_size) or opts.meta_batch_size < 1):
        raise ValueError(f"meta_batch_size must be a positive integer (or None: the train batch size), got "
                         f"{opts.meta_batch_size!r}.")
    if not isinstance(opts.meta_parameters, str) or not opts.meta_parameters:
        raise ValueError(f"meta_parameters must be 'auto', 'all', 'head' or a regular expression of parameter "
                         f"names, got {opts.meta_parameters!r}.")
    meta_parameters_pattern(opts.meta_parameters, ("auto", *PARAMETER_CHOICES))
    probes = opts.probe_batches
    if probes is not None and not (_is_finite_number(probes) and probes >= 0):
        raise ValueError(f"probe_batches must be a number >= 0 (0: only the step's own examples are scored, the "
                         f"paper's rule; None: by task), got {probes!r}.")
    if probes and (opts.lr_level not in INSTANCE_LEVELS or not opts.keep_history):
        why = (f"lr_level={opts.lr_level!r} has no instance rates" if opts.lr_level not in INSTANCE_LEVELS
               else "keep_history=False resets the instance rates at every visit")
        raise ValueError(f"probe_batches={probes} moves instance rates between their visits, but {why}: drop "
                         "probe_batches (or use an instance level with keep_history=True).")
    if opts.instance_rate_gradient != "effective" and opts.lr_level != "both":
        raise ValueError(
            f"instance_rate_gradient={opts.instance_rate_gradient!r} chooses how the instance rates step under a "
            f"class or group rate (lr_level='both'); lr_level={opts.lr_level!r} has no product of the two: drop "
            "instance_rate_gradient or use lr_level='both'."
        )
    for name in ("max_rate", "max_instance_rate"):
        bound = getattr(opts, name)
        if bound is not None and not (_is_finite_number(bound) and bound > 0):
            raise ValueError(f"{name} must be a finite number > 0 (or None, `inf` on a command line, for no bound), "
                             f"got {bound!r}.")
    if (weight_decay is not None and opts.learn_weight_decay and weight_decay <= 0
            and opts.meta_lr_scaling == "normalized" and opts.replay_trajectory is None):
        raise ValueError(
            "learn_weight_decay=True needs a starting value: set weight_decay > 0 (e.g. 5e-4). The normalized "
            "weight-decay update is multiplicative and cannot leave 0."
        )
    if not opts.keep_history and opts.meta_update == "delayed" and opts.lr_level in INSTANCE_LEVELS:
        raise ValueError(
            "keep_history=False with meta_update='delayed' at the instance level would train without rates: "
            "the delayed update only applies from an example's next visit, and without history the table "
            "is reset before it. Use meta_update='same_step' for the no-history ablation (or lr_level='class')."
        )
    if opts.meta_objective in ("bounded", "log") and opts.meta_strategy == "last_layer":
        raise ValueError(
            f"meta_objective={opts.meta_objective!r} needs the meta-gradient of the whole objective; "
            "meta_strategy='last_layer' is the closed form of the cross-entropy meta loss. Use meta_strategy='jvp' "
            "or meta_objective='loss'."
        )
    if opts.rate_metric == "adam" and opts.meta_strategy == "exact":
        raise ValueError(
            "rate_metric='adam' takes the products in Adam's metric; meta_strategy='exact' differentiates the real "
            "lookahead, whose products are the optimizer's. Use meta_strategy='jvp' or rate_metric='optimizer'."
        )
    if opts.meta_update == "delayed" and opts.meta_strategy == "exact":
        raise ValueError(
            "meta_strategy='exact' rebuilds the whole lookahead graph, so it only runs with "
            "meta_update='same_step'. Use meta_strategy='jvp' or 'finite_difference' with 'delayed'."
        )


def _check_group_options(lr_level: str, group_column: str | None) -> None:
    """lr_level='group' needs a group_column; a group_column needs a level with a group table."""
    if lr_level == "group" and not group_column:
        raise ValueError(
            "lr_level='group' learns one rate per group of examples and needs group_column: set "
            "group_column='<column>' to a categorical train-set column (data source, domain, task, language)."
        )
    if group_column and lr_level not in ("group", "both"):
        raise ValueError(
            f"group_column={group_column!r} is only used by lr_level='group' (one rate per group) or 'both' "
            f"(instance x group), not lr_level={lr_level!r}: set lr_level='group' or 'both', or drop group_column."
        )


@dataclass
class MetaLRConfig(MetaLROptions, TrainingArguments):
    """Training arguments of :class:`~hf_ddlr.MetaLRTrainer`.

    Everything of :class:`transformers.TrainingArguments` plus the options of :class:`MetaLROptions` (the
    data-dependent learning rates), in that order. With ``HfArgumentParser`` every field is a command-line
    flag. ``MetaLRTrainer`` also accepts any other ``TrainingArguments``; options it lacks take the defaults.
    """


META_OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(MetaLROptions))


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_finite_number(x: object) -> bool:
    """An int or float (not a bool) that is neither nan nor infinite."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def rate_metric_choice(opts: Any) -> str:
    """``rate_metric`` as a run uses it: ``"auto"`` resolved to ``"adam"``, or to ``"optimizer"`` under
    ``meta_strategy="exact"`` (whose products are the real lookahead's); any other value as given."""
    if opts.rate_metric != "auto":
        return opts.rate_metric
    return "optimizer" if opts.meta_strategy == "exact" else "adam"


def resolve_meta_options(args: TrainingArguments | None) -> MetaLROptions:
    """The meta options of ``args``: for every :class:`MetaLROptions` field, ``args``' attribute of that name
    when it has one, the default otherwise; validated like ``MetaLRConfig``.

    A new object, so that the trainer can adjust it (a replayed trajectory that learned the weight decay
    turns ``learn_weight_decay`` on) without touching the user's args, which are saved with checkpoints.
    """
    given = {name: getattr(args, name) for name in META_OPTION_NAMES if args is not None and hasattr(args, name)}
    opts = MetaLROptions(**given)
    check_meta_options(opts, getattr(args, "weight_decay", None))
    return opts
