"""DPO on preference pairs where a share is the wrong way round: ``trl.DPOTrainer`` against ``MetaDPOTrainer``.

A preference dataset of ``prompt`` / ``chosen`` / ``rejected`` rows (``--dataset``: a Hub id such as
``trl-lib/ultrafeedback_binarized``, a folder written by ``Dataset.save_to_disk``, or a JSON / JSON-lines file) and
a causal LM (``--model``: a Hub id or a local folder). The first ``--meta_pairs`` rows of the training split are the
trusted pairs (the meta set); of the next ``--train_pairs``, ``--flip`` have ``chosen`` and ``rejected`` swapped, as
raters who misread a comparison would leave them (``--flip 0`` trains on the data as it is, with no known flips to
score the rates against); ``--test_pairs`` rows of ``--test_split`` are the evaluation pairs.

The policy is trained twice on the same pairs and recipe: with ``trl.DPOTrainer`` ("plain") and with
:class:`~hf_ddlr.MetaDPOTrainer` ("metalr", the library's defaults). Reported: DPOTrainer's evaluation reward
accuracy and margin on the test pairs for both, and for MetaLR the AUROC of the pairs' rates (unflipped above
flipped) with their mean rate by kind. Every ``MetaDPOConfig`` / ``DPOConfig`` / ``TrainingArguments`` option is
a flag (``--beta 0.05``, ``--meta_lr 0.2``, ``--push_to_hub --hub_model_id you/policy``, ...); with
``--push_to_hub`` the MetaLR run's repo also holds the pairs' rate trajectory and its plots.

Examples::

    python examples/dpo_noisy_preferences.py --model Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset trl-lib/ultrafeedback_binarized --output_dir outputs/dpo_noisy
    accelerate launch examples/dpo_noisy_preferences.py --model Qwen/Qwen2.5-0.5B-Instruct --bf16 \\
        --output_dir outputs/dpo_noisy
    python examples/dpo_noisy_preferences.py --model ./my_policy --dataset ./pairs.jsonl --quick
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402

from hf_ddlr import MetaDPOConfig, MetaDPOTrainer  # noqa: E402

METHODS = ("plain", "metalr")
COLUMNS = ("prompt", "chosen", "rejected")


@dataclass
class DPOOptions:
    model: str = field(default="Qwen/Qwen2.5-0.5B-Instruct", metadata={
        "help": "The policy: a Hub id or a local folder of a causal LM (AutoModelForCausalLM); the reference model "
        "is the same checkpoint."})
    dataset: str = field(default="trl-lib/ultrafeedback_binarized", metadata={
        "help": "Preference pairs with prompt / chosen / rejected columns: a Hub id, a save_to_disk folder, or a "
        "JSON / JSON-lines file."})
    train_split: str = field(default="train", metadata={"help": "The split the training and trusted pairs come from."})
    test_split: str = field(default="test", metadata={"help": "The split of the evaluation pairs."})
    methods: str = field(default="plain,metalr", metadata={"help": f"Comma-separated subset of {list(METHODS)}."})
    flip: float = field(default=0.3, metadata={"help": "Share of the training pairs swapped (0: none)."})
    train_pairs: int = field(default=2000, metadata={"help": "Training pairs (after the trusted ones)."})
    meta_pairs: int = field(default=64, metadata={"help": "Trusted pairs (the meta set): the split's first rows."})
    test_pairs: int = field(default=500, metadata={"help": "Evaluation pairs."})
    quick: bool = field(default=False, metadata={"help": "Smoke test: 64 training, 16 trusted and 32 test pairs."})


def presets(s: DPOOptions) -> dict:
    p = dict(per_device_train_batch_size=8, learning_rate=5e-7, num_train_epochs=1, lr_scheduler_type="linear",
             warmup_steps=0.1, logging_steps=10, per_device_eval_batch_size=16, max_length=512, beta=0.1,
             gradient_checkpointing=False, bf16=False)
    return common.common_presets(s, "dpo_noisy_preferences", **p)


def load_pairs(name: str, split: str):
    """The ``split`` of a preference dataset given by Hub id, ``save_to_disk`` folder or JSON file."""
    import datasets

    if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_dict.json")):
        return datasets.load_from_disk(name)[split]
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_info.json")):
        return datasets.load_from_disk(name)
    if name.endswith((".json", ".jsonl")):
        return datasets.load_dataset("json", data_files=name, split="train")
    return datasets.load_dataset(name, split=split)


def make_splits(s: DPOOptions, seed: int):
    """(train with ``is_flipped``, meta, test): the pairs' text columns only; a share ``flip`` of train swapped."""
    sizes = (16, 64, 32) if s.quick else (s.meta_pairs, s.train_pairs, s.test_pairs)
    source = load_pairs(s.dataset, s.train_split)
    missing = [c for c in COLUMNS if c not in source.column_names]
    if missing:
        raise SystemExit(f"{s.dataset} has no {missing} column(s); DPO pairs need {list(COLUMNS)}.")
    if len(source) < sizes[0] + sizes[1]:
        raise SystemExit(f"{s.dataset}[{s.train_split}] has {len(source)} rows; --meta_pairs + --train_pairs need "
                         f"{sizes[0] + sizes[1]}.")
    source = source.select_columns(list(COLUMNS))
    meta = source.select(range(sizes[0]))
    train = source.select(range(sizes[0], sizes[0] + sizes[1]))
    flipped = np.random.default_rng([seed, 23]).random(len(train)) < s.flip

    def swap(row, i):
        return {"chosen": row["rejected"], "rejected": row["chosen"]} if flipped[i] else {}

    train = train.map(swap, with_indices=True).add_column("is_flipped", flipped.tolist())
    test = load_pairs(s.dataset, s.test_split).select_columns(list(COLUMNS))
    return train, meta, test.select(range(min(sizes[2], len(test)))), flipped


def run_method(method: str, s: DPOOptions, config, data, flipped: np.ndarray) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    args = common.run_config(config, s, method, {})
    train, meta, test = data
    kwargs = dict(model=AutoModelForCausalLM.from_pretrained(s.model), args=args,
                  train_dataset=train.remove_columns("is_flipped"), eval_dataset=test,
                  processing_class=AutoTokenizer.from_pretrained(s.model))
    trainer = MetaDPOTrainer(meta_dataset=common.meta_set(args, meta, method), **kwargs) if method == "metalr" else DPOTrainer(**kwargs)
    return common.run_pair_trainer(trainer, args, method, flipped, lambda m: {
        "reward_accuracy": float(m["eval_rewards/accuracies"]), "reward_margin": float(m["eval_rewards/margins"]),
        "test_loss": float(m["eval_loss"])})


def main(argv: list[str] | None = None) -> dict:
    s, config = common.parse_args(DPOOptions, presets, argv, config_cls=MetaDPOConfig)
    train, meta, test, flipped = make_splits(s, config.seed)
    common.say(f"[dpo] {len(train)} training pairs ({flipped.mean():.0%} swapped), {len(meta)} trusted pairs, "
               f"{len(test)} test pairs; policy {s.model}")
    runs = []
    for method in common.chosen_methods(s.methods, METHODS):
        common.say(f"[dpo] training {method} ...")
        runs.append(run_method(method, s, config, (train, meta, test), flipped))
        common.say(f"[dpo]   test reward accuracy {runs[-1]['reward_accuracy']:.3f} ({runs[-1]['train_time_s']:.0f} s)")
    rows = ["| method | test reward accuracy | test reward margin | rate AUROC unflipped > swapped | mean rate "
            "unflipped / swapped | train time (s) |", "|---|---|---|---|---|---|"]
    for r in runs:
        rate = common.pair_rate_cells(r)
        rows.append(f"| {r['method']} | {r['reward_accuracy']:.3f} | {r['reward_margin']:.4f} | {rate} | "
                    f"{r['train_time_s']:.0f} |")
    payload = {"experiment": "dpo_noisy_preferences", "model": s.model, "dataset": s.dataset, "seed": config.seed,
               "flip": s.flip, "observed_flipped": float(flipped.mean()),
               "sizes": {"train": len(train), "meta": len(meta), "test": len(test)}, "runs": runs}
    common.write_outputs(config.output_dir, "dpo_noisy_preferences", payload, "\n".join(rows))
    return payload


if __name__ == "__main__":
    main()
    common.end_distributed()
