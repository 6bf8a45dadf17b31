"""Supervised fine-tuning of a decoder LM on noisy instruction data: per-example and per-source learning rates.

A small Llama-style decoder (built from a ``LlamaConfig``, trained from scratch) learns two-number addition in
an instruction format: the prompt ``"23+41="`` and the completion ``"64"`` followed by ``<eos>``, with a
completion-only loss (the prompt's labels are -100, as in SFT). The training data mixes three sources of equal
size with different corruption rates — a wrong answer is a random other number:

* ``textbook``: 10 % wrong answers,
* ``qa_site``: 10 % wrong answers,
* ``scraped``: 80 % wrong answers,

so a third of the training answers are wrong. 100 clean questions are the meta set and 300 clean questions that
appear nowhere else are the held-out set; every question (a pair ``a+b`` with ``0 <= a, b < 50``) is used once.

The model is trained twice on the same data and schedule: with ``transformers.Trainer`` ("plain") and with
:class:`~hf_ddlr.MetaLRTrainer` with ``lr_level="both"`` and ``group_column="source"`` ("metalr": one learned
rate per example times one per source). Reported: held-out exact-match (greedy decoding of the answer after the
prompt) and held-out loss of both; for MetaLR the AUROC of the instance rates (and of the effective instance x
source rates) for clean vs corrupted answers, and the learned source rates.

Two MetaLR options differ from the library's defaults here, because this model comes to fit its meta set: the
meta set is scored by the mean log of each meta question's loss (``meta_objective="log"``: the questions the
model already answers keep their pull on the rates, where under the cross-entropy its few remaining errors set
the direction), and the instance rates step on a running average of the meta gradient over a tenth of an epoch
(``meta_grad_average_epochs=0.1``) instead of ~30 steps. Chosen on this example's seeds 0-5 and checked on a
held-out variant (``benchmarks/results/variants/sft_log_heldout/``): instance-rate AUROC 0.861 -> 0.925 on
average over seeds 0-5 (docs/robustness.md). ``--library_defaults`` trains with the library's defaults instead.

Everything is built locally (a character-level tokenizer, the model, the data), nothing is downloaded. The
recipe (width 128, 2 layers, AdamW at 1e-3, batch 32, 30 epochs, linear decay) was chosen on the plain model only.

Examples::

    python examples/sft_noisy_data.py --output_dir outputs/sft_noisy --seed 0
    python examples/sft_noisy_data.py --quick --output_dir /tmp/sft_smoke   # seconds
    python examples/sft_noisy_data.py --library_defaults --output_dir outputs/sft_noisy_defaults --seed 0
    python examples/sft_noisy_data.py --lora --output_dir outputs/sft_noisy_lora   # LoRA adapters only
    accelerate launch examples/sft_noisy_data.py --output_dir outputs/sft_noisy
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402

from hf_ddlr import MetaLRTrainer  # noqa: E402

METHODS = ("plain", "metalr")
SOURCES = {"textbook": 0.1, "qa_site": 0.1, "scraped": 0.8}  # source -> fraction of wrong answers
MAX_OPERAND = 50
SPECIAL = ["<pad>", "<eos>"]
CHARS = list("0123456789+=")
SEQ_LEN = 9  # "49+49=" + "98" + <eos>


@dataclass
class SFTOptions:
    dataset: str = field(default="embedded", metadata={
        "help": "Only 'embedded': the synthetic addition task generated here (kept for the examples' common CLI).",
        "choices": ["embedded"]})
    methods: str = field(default="plain,metalr", metadata={"help": f"Comma-separated subset of {list(METHODS)}."})
    meta_size: int = field(default=100, metadata={"help": "Clean meta questions."})
    test_size: int = field(default=300, metadata={"help": "Clean held-out questions."})
    hidden_size: int = field(default=128, metadata={"help": "Width of the decoder."})
    num_layers: int = field(default=2, metadata={"help": "Decoder layers."})
    quick: bool = field(default=False, metadata={
        "help": "Smoke test: 400 train / 100 held-out questions, 40 meta, a width-32 model, 1 epoch."})
    lora: bool = field(default=False, metadata={
        "help": "Train a peft LoRA adapter (every attention and MLP projection) and the tied embedding instead of "
        "the whole model, for both methods (needs `pip install peft`)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank with --lora (alpha = 2 x rank)."})
    library_defaults: bool = field(default=False, metadata={
        "help": "Train MetaLR with MetaLRConfig's defaults for meta_objective and meta_grad_average_epochs instead of "
        "this example's two settings (meta_objective='log', meta_grad_average_epochs=0.1; the module docstring "
        "says why). A flag given on the command line wins over either."})


def presets(s: SFTOptions) -> dict:
    p = dict(per_device_train_batch_size=32, learning_rate=1e-3, num_train_epochs=30, warmup_steps=0.05,
             weight_decay=0.0, lr_scheduler_type="linear", eval_strategy="no", logging_steps=20,
             per_device_eval_batch_size=256)
    if not s.library_defaults:  # this example's two MetaLR settings (module docstring)
        p.update(meta_objective="log", meta_grad_average_epochs=0.1)
    if s.quick:
        p.update(num_train_epochs=1)
    return common.common_presets(s, "sft_noisy_data", **p)


# ---------------------------------------------------------------------------------------------- data
def char_tokenizer():
    """One token per character of ``0-9+=``, with ``<pad>`` (id 0) and ``<eos>`` (id 1)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                   model_max_length=SEQ_LEN)


def encode(tok, prompt: str, answer: str) -> dict:
    """Right-padded to SEQ_LEN; labels -100 on the prompt and the padding (completion-only loss)."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = p + a
    pad = SEQ_LEN - len(ids)
    return {"input_ids": ids + [tok.pad_token_id] * pad, "attention_mask": [1] * len(ids) + [0] * pad,
            "labels": [-100] * len(p) + a + [-100] * pad}


def random_wrong_answer(rng: np.random.Generator, a: int, b: int) -> int:
    """A wrong answer to ``a+b``: any other sum the task can have, uniformly."""
    return int(rng.choice([v for v in range(2 * MAX_OPERAND - 1) if v != a + b]))


def make_data(s: SFTOptions, seed: int, sources: dict[str, float] | None = None,
              wrong_answer=random_wrong_answer, salt: int = 16) -> dict:
    """The train (with ``source`` and ``is_corrupted``), meta and held-out rows, drawn from ``[seed, salt]``;
    ``sources`` (source -> fraction of wrong answers; :data:`SOURCES` by default) and ``wrong_answer`` let a variant
    of the task change the mixture and the kind of error."""
    sources = SOURCES if sources is None else sources
    rng = np.random.default_rng([seed, salt])
    pairs = [(a, b) for a in range(MAX_OPERAND) for b in range(MAX_OPERAND)]
    order = rng.permutation(len(pairs))
    n_test, n_meta = (100, 40) if s.quick else (s.test_size, s.meta_size)
    test = [pairs[i] for i in order[:n_test]]
    meta = [pairs[i] for i in order[n_test:n_test + n_meta]]
    train = [pairs[i] for i in order[n_test + n_meta:]]
    if s.quick:
        train = train[:400]
    names = list(sources)
    rows = []
    for k, (a, b) in enumerate(train):
        src = names[k % len(names)]
        ans = a + b
        corrupted = bool(rng.random() < sources[src])
        if corrupted:
            ans = wrong_answer(rng, a, b)
        rows.append({"prompt": f"{a}+{b}=", "answer": str(ans), "source": src, "is_corrupted": corrupted})
    clean = lambda qs: [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in qs]  # noqa: E731
    return {"train": rows, "meta": clean(meta), "test": clean(test)}


def to_dataset(tok, rows: list[dict], extra: tuple[str, ...] = ()):
    import datasets

    cols = [encode(tok, r["prompt"], r["answer"]) for r in rows]
    data = {k: [c[k] for c in cols] for k in ("input_ids", "attention_mask", "labels")}
    for e in extra:
        data[e] = [r[e] for r in rows]
    return datasets.Dataset.from_dict(data).with_format("torch", columns=["input_ids", "attention_mask", "labels"],
                                                        output_all_columns=True)


def tiny_llama(s: SFTOptions, vocab_size: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    h = 32 if s.quick else s.hidden_size
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=h, intermediate_size=4 * h, num_hidden_layers=s.num_layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16, pad_token_id=0,
                      eos_token_id=1, bos_token_id=None, tie_word_embeddings=True, attn_implementation="eager")
    return LlamaForCausalLM(cfg)


def with_lora(model, s: SFTOptions):
    """``model`` as a peft LoRA model: rank ``s.lora_r`` adapters on every attention and MLP projection, the
    (tied) token embedding trained in full — the model is trained from scratch, so the characters' embeddings
    must be learned — and everything else frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("--lora needs peft: pip install peft") from e
    cfg = LoraConfig(r=s.lora_r, lora_alpha=2 * s.lora_r, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                     modules_to_save=["embed_tokens"])
    return get_peft_model(model, cfg)


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def exact_match(model, tok, rows: list[dict], max_new_tokens: int = 3) -> float:
    """Greedy decoding after each prompt (batched by prompt length, no padding); an answer is right when the
    decoded characters up to ``<eos>`` are the correct number."""
    model.eval()
    device = next(model.parameters()).device
    right = 0
    by_len: dict[int, list[dict]] = {}
    for r in rows:
        by_len.setdefault(len(r["prompt"]), []).append(r)
    for group in by_len.values():
        ids = torch.tensor([tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in group], device=device)
        out = []
        for _ in range(max_new_tokens):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            ids = torch.cat([ids, nxt], dim=1)
        gen = torch.cat(out, dim=1).tolist()
        for r, g in zip(group, gen):
            g = g[:g.index(tok.eos_token_id)] if tok.eos_token_id in g else g
            right += tok.decode(g, skip_special_tokens=True).replace(" ", "") == r["answer"]
    return right / len(rows)


def auroc(clean: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(clean, scores))


# ---------------------------------------------------------------------------------------------- main
def run_method(method: str, s: SFTOptions, config, tok, data: dict, corrupted: np.ndarray) -> dict:
    meta = method == "metalr"
    overrides = {}
    if meta:  # instance x source rates unless --lr_level says otherwise; the source column whenever it is used
        overrides["lr_level"] = "both"
        level = config.lr_level if "lr_level" in s._explicit else "both"
        if level in ("group", "both"):
            overrides["group_column"] = "source"
    args = common.run_config(config, s, method, overrides)
    train = to_dataset(tok, data["train"], extra=("source",) if meta else ())
    test = to_dataset(tok, data["test"])
    model = tiny_llama(s, len(tok), config.seed)
    if s.lora:
        model = with_lora(model, s)
    kwargs = dict(model=model, args=args, train_dataset=train, eval_dataset=test)
    if meta:
        kwargs["meta_dataset"] = common.meta_set(args, to_dataset(tok, data["meta"]), method)
    trainer = (MetaLRTrainer if meta else Trainer)(**kwargs)
    t0 = time.time()
    trainer.train()
    out = {"method": method, "seed": args.seed, "train_time_s": round(time.time() - t0, 1),
           "train_size": len(train), "steps": trainer.state.global_step, "lora": s.lora,
           "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    out["heldout_loss"] = float(trainer.evaluate()["eval_loss"])
    out["heldout_exact_match"] = exact_match(trainer.model, tok, data["test"])
    out["train_exact_match_clean"] = exact_match(
        trainer.model, tok, [r for r, c in zip(data["train"], corrupted) if not c][:300])
    if meta:
        rates = trainer.rates
        inst = rates.instance.detach().cpu().numpy()
        names = sorted(SOURCES)  # group rates are keyed by the sorted distinct values of the column
        src = np.array([r["source"] for r in data["train"]])
        if rates.per_group is not None:  # lr_level "both" (the default here) or "group"
            group = dict(zip(names, (float(v) for v in rates.per_group.cpu())))
            out["source_rates"] = {k: round(v, 4) for k, v in group.items()}
            effective = inst * np.array([group[v] for v in src])
        else:  # --lr_level instance: every example's rate is its instance rate
            effective = inst
        out.update(
            source_mean_instance_rate={n: round(float(inst[src == n].mean()), 4) for n in names},
            instance_rate_auroc=auroc(~corrupted, inst),
            effective_rate_auroc=auroc(~corrupted, effective),
            instance_rate_auroc_within_source={
                n: auroc(~corrupted[src == n], inst[src == n]) for n in names
                if 0 < corrupted[src == n].mean() < 1},
            rate_clean=float(inst[~corrupted].mean()), rate_corrupted=float(inst[corrupted].mean()),
        )
    common.save_and_push(trainer, args, out)
    return out


def main(argv: list[str] | None = None) -> dict:
    s, config = common.parse_args(SFTOptions, presets, argv)
    tok = char_tokenizer()
    data = make_data(s, config.seed)
    corrupted = np.array([r["is_corrupted"] for r in data["train"]], dtype=bool)
    src = np.array([r["source"] for r in data["train"]])
    wrong = {n: float(corrupted[src == n].mean()) for n in SOURCES}
    common.say(f"[sft] {len(corrupted)} train answers ({corrupted.mean():.0%} wrong; by source: "
               + ", ".join(f"{n} {v:.0%}" for n, v in wrong.items())
               + f"), {len(data['meta'])} clean meta, {len(data['test'])} clean held-out questions")
    runs = []
    for method in common.chosen_methods(s.methods, METHODS):
        common.say(f"[sft] training {method} ...")
        run = run_method(method, s, config, tok, data, corrupted)
        common.say(f"[sft]   held-out exact-match {run['heldout_exact_match']:.3f}  loss {run['heldout_loss']:.4f}"
                   f"  ({run['train_time_s']:.0f} s)")
        runs.append(run)

    rows = ["| method | held-out exact-match | held-out loss | rate AUROC clean>corrupted (instance / effective) | "
            "source rates | train time (s) |", "|---|---|---|---|---|---|"]
    for r in runs:
        auc = (f"{r['instance_rate_auroc']:.3f} / {r['effective_rate_auroc']:.3f}"
               if "instance_rate_auroc" in r else "–")
        srcs = ", ".join(f"{k} {v:.2f}" for k, v in r["source_rates"].items()) if "source_rates" in r else "–"
        rows.append(f"| {r['method']} | {r['heldout_exact_match']:.3f} | {r['heldout_loss']:.4f} | {auc} | {srcs} | "
                    f"{r['train_time_s']:.0f} |")
    table = "\n".join(rows)
    payload = {"experiment": "sft_noisy_data", "seed": config.seed, "source_wrong_fraction": SOURCES,
               "observed_wrong_fraction": {"all": float(corrupted.mean()), **wrong},
               "train_size": len(corrupted), "meta_size": len(data["meta"]), "test_size": len(data["test"]),
               "runs": runs}
    write_outputs(config.output_dir, payload, table)
    return payload


def write_outputs(output_dir: str, payload: dict, table: str) -> None:
    import json

    if not common.is_main_process():
        return
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "sft_noisy_data_results.json"), "w") as f:
        json.dump(payload, f, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    with open(os.path.join(output_dir, "sft_noisy_data_results.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table + "\n")
    print(f"[sft_noisy_data] wrote {output_dir}/sft_noisy_data_results.json, sft_noisy_data_results.md")


if __name__ == "__main__":
    main()
    common.end_distributed()
