"""The same trainer on text: a ``*ForSequenceClassification`` model with noisy labels (MetaLR is not image-only).

A text classifier is trained on a training set with ``--noise_rate`` of its labels changed to another class,
with a small clean, class-balanced meta set held out, once with ``transformers.Trainer`` and once with
:class:`~hf_ddlr.MetaLRTrainer` (instance-level rates; every MetaLR flag applies). Nothing in the trainer is
image specific: the batch is whatever the collator makes (``input_ids``, ``attention_mask``, ``labels``), and the
meta step runs the model functionally (attention in the math kernel for forward-mode AD, dropout replayed).

Data (``--dataset``):

* a Hub dataset with ``text`` / ``label`` columns (default ``ag_news``: 4 news topics; ``imdb`` works too) and
  a pretrained checkpoint (``--model_name_or_path``, default ``prajjwal1/bert-tiny``), tokenised with its
  tokenizer;
* ``embedded`` (offline): a **synthetic** 4-topic corpus generated deterministically here (see
  :func:`synthetic_topics`): each sentence mixes words of its topic (sports / business / science / world), words of
  a random other topic and neutral filler words, so the topic is learnable but not trivially; a word-level
  tokenizer is built locally with ``tokenizers`` and the model is a tiny BERT (2 layers, hidden 64) built from a
  ``BertConfig`` — no download of any kind.

Examples::

    python examples/text_classification.py --dataset ag_news --noise_rate 0.4 --output_dir outputs/agnews_noisy
    python examples/text_classification.py --dataset embedded --output_dir outputs/text_embedded
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field

import numpy as np
from transformers import Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402

from hf_ddlr import MetaLRTrainer  # noqa: E402

METHODS = ("plain", "metalr")

TOPICS = {
    "sports": "match goal team coach season league player score win championship stadium striker tournament "
              "referee final cup athletes medal race olympic defender playoff inning marathon",
    "business": "market shares profit company investors bank revenue stock merger economy quarter earnings "
                "prices trade growth firm deal billion inflation dividend startup retail",
    "science": "researchers study space planet cells scientists energy climate genome telescope experiment "
               "species physics data laboratory vaccine orbit molecules fossil robot quantum",
    "world": "government minister election president troops capital treaty parliament border crisis protest "
             "talks embassy rebels vote united nations summit refugees ceasefire province diplomat",
}
FILLER = ("the a of to in and on for with at by from after over new said says report today week year people "
          "group first last more than about into could would will has have was were is are this that its two "
          "three officials local early late major plan").split()


def synthetic_topics(n: int, seed: int, p_topic: float = 0.22, p_other: float = 0.08) -> tuple[list[str], np.ndarray]:
    """``n`` sentences of 8-20 words with balanced topic labels (0..3), generated from ``seed``.

    Each word is a word of the sentence's own topic with probability ``p_topic``, a word of one other topic
    (fixed per sentence: a distractor) with ``p_other``, and a filler word otherwise.
    """
    rng = np.random.default_rng(seed)
    vocab = [t.split() for t in TOPICS.values()]
    labels = np.arange(n) % len(vocab)
    rng.shuffle(labels)
    texts = []
    for y in labels:
        other = (y + rng.integers(1, len(vocab))) % len(vocab)
        words = []
        for u in rng.random(rng.integers(8, 21)):
            pool = vocab[y] if u < p_topic else vocab[other] if u < p_topic + p_other else FILLER
            words.append(pool[rng.integers(len(pool))])
        texts.append(" ".join(words))
    return texts, labels.astype(np.int64)


def local_tokenizer(max_length: int = 32):
    """A word-level fast tokenizer over the synthetic vocabulary ([CLS] text [SEP], padding id 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    words = sorted({w for t in TOPICS.values() for w in t.split()} | set(FILLER))
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", model_max_length=max_length)


def tiny_bert(vocab_size: int, num_labels: int, seed: int):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64, num_labels=num_labels,
                     id2label=dict(enumerate(TOPICS)), label2id={n: i for i, n in enumerate(TOPICS)},
                     attn_implementation="eager")
    return BertForSequenceClassification(cfg)


@dataclass
class TextOptions:
    dataset: str = field(default="ag_news", metadata={"help": "Hub dataset with text/label columns, or 'embedded'."})
    model_name_or_path: str = field(default="prajjwal1/bert-tiny", metadata={
        "help": "Pretrained checkpoint for Hub datasets (ignored with --dataset embedded: a tiny BERT is built)."})
    methods: str = field(default="plain,metalr", metadata={"help": f"Comma-separated subset of {list(METHODS)}."})
    noise_rate: float = field(default=0.4, metadata={"help": "Fraction of training labels changed to another class."})
    meta_size: int = field(default=100, metadata={"help": "Clean, class-balanced meta examples held out of train."})
    max_length: int = field(default=128, metadata={"help": "Truncation length (32 for the embedded corpus)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Subsample train (default 20000 on Hub)."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Subsample test."})
    quick: bool = field(default=False, metadata={"help": "Smoke test: 400 train / 200 test examples, 1 epoch."})


def presets(s: TextOptions) -> dict:
    if s.dataset == "embedded":
        p = dict(per_device_train_batch_size=32, learning_rate=1e-3, num_train_epochs=6, warmup_steps=0.1,
                 weight_decay=0.01, lr_scheduler_type="linear")
    else:
        p = dict(per_device_train_batch_size=32, learning_rate=5e-5, num_train_epochs=3, warmup_steps=0.1,
                 weight_decay=0.01, lr_scheduler_type="linear")
    if s.quick:
        p.update(num_train_epochs=1)
    return common.common_presets(s, "text_classification", per_device_eval_batch_size=256, **p)


def load_text_data(s: TextOptions, seed: int):
    """(raw train/meta/test DatasetDict with text/label/is_noisy, tokenizer, model factory)."""
    import datasets

    from hf_ddlr.data import apply_label_noise

    n_train, n_test = s.max_train_samples, s.max_test_samples
    if s.quick:
        n_train, n_test = n_train or 400, n_test or 200
    if s.dataset == "embedded":
        n_train, n_test = n_train or 3000, n_test or 1000
        names = list(TOPICS)
        texts, labels = synthetic_topics(n_train + n_test, seed=1234)  # the corpus itself does not vary with seed
        feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
        full = datasets.Dataset.from_dict({"text": texts, "label": labels.tolist()}, features=feats)
        raw = datasets.DatasetDict(train=full.select(range(n_train)), test=full.select(range(n_train, len(full))))
        tokenizer = local_tokenizer(min(s.max_length, 32))

        def make_model():
            return tiny_bert(tokenizer.vocab_size, len(names), seed)
    else:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        raw = datasets.load_dataset(s.dataset)
        n_train = n_train or 20000
        for split, n in (("train", n_train), ("test", n_test)):
            if n and n < len(raw[split]):
                raw[split] = raw[split].shuffle(seed=seed).select(range(n))
        names = raw["train"].features["label"].names
        tokenizer = AutoTokenizer.from_pretrained(s.model_name_or_path)

        def make_model():
            return AutoModelForSequenceClassification.from_pretrained(
                s.model_name_or_path, num_labels=len(names), id2label=dict(enumerate(names)),
                label2id={n: i for i, n in enumerate(names)})

    # clean class-balanced meta set held out of train, then label noise on the rest (meta / test stay clean)
    y = np.asarray(raw["train"]["label"])
    rng = np.random.default_rng([seed, 0])
    meta_size = min(s.meta_size, 40) if s.quick else s.meta_size
    per_class = max(1, meta_size // len(names))
    meta_rows = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False)
                                        for c in range(len(names))]))
    train_rows = np.setdiff1d(np.arange(len(y)), meta_rows)
    clean = y[train_rows]
    noisy = apply_label_noise(clean, s.noise_rate, len(names), mode="flip", seed=seed) if s.noise_rate else clean
    train = raw["train"].select(train_rows.tolist()).remove_columns("label")
    train = train.add_column("label", noisy.tolist(), feature=raw["train"].features["label"])
    train = train.add_column("is_noisy", (noisy != clean).tolist())
    out = datasets.DatasetDict(train=train, meta=raw["train"].select(meta_rows.tolist()), test=raw["test"])
    return out, tokenizer, make_model


def main(argv: list[str] | None = None) -> dict:
    s, config = common.parse_args(TextOptions, presets, argv)
    raw, tokenizer, make_model = load_text_data(s, config.seed)
    noise_mask = np.asarray(raw["train"]["is_noisy"], dtype=bool)
    max_len = min(s.max_length, tokenizer.model_max_length)
    tok = raw.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_len), batched=True)
    keep = ["input_ids", "attention_mask", "token_type_ids", "label"]

    def view(split: str, index: bool = False):
        ds = tok[split]
        if index:
            ds = ds.add_column("sample_index", list(range(len(ds))))
        return ds.select_columns([c for c in keep + (["sample_index"] if index else []) if c in ds.column_names]
                                 + (["is_noisy"] if split == "train" else []))

    common.say(f"[text] {s.dataset}: {len(raw['train'])} train ({noise_mask.mean():.0%} wrong labels), "
               f"{len(raw['meta'])} clean meta, {len(raw['test'])} test")
    runs = []
    for method in common.parse_list(s.methods):
        if method not in METHODS:
            raise SystemExit(f"unknown method {method!r}; choose from {list(METHODS)}.")
        # the tokenised splits carry only model columns (+ index, is_noisy): let the Trainer drop the rest
        args = dataclasses.replace(common.run_config(config, s, method, {}), remove_unused_columns=True)
        meta = method == "metalr"
        common.say(f"[text] training {method} ...")
        run = common.run_one(method, MetaLRTrainer if meta else Trainer, make_model(), args,
                             view("train", index=meta), view("test"), meta=view("meta") if meta else None,
                             noise_mask=noise_mask, processing_class=tokenizer)
        common.say(f"[text]   best {run['best_accuracy']:.4f}  final {run['final_accuracy']:.4f}")
        runs.append(run)

    rows = ["| method | best test acc | final test acc | rate AUROC clean>noisy | mean rate clean / noisy | "
            "train time (s) |", "|---|---|---|---|---|---|"]
    for r in runs:
        sep = f"{r['rate_clean']:.2f} / {r['rate_noisy']:.2f}" if "rate_clean" in r else "–"
        rows.append(f"| {r['method']} | {r['best_accuracy']:.4f} | {r['final_accuracy']:.4f} | "
                    f"{common.fmt(r.get('auroc_clean_vs_noisy'), 3)} | {sep} | {r['train_time_s']:.0f} |")
    table = "\n".join(rows)
    payload = {"experiment": "text_classification", "dataset": s.dataset,
               "model": "tiny BERT (local)" if s.dataset == "embedded" else s.model_name_or_path,
               "noise_rate": s.noise_rate, "runs": [common.strip(r) for r in runs]}
    common.write_outputs(config.output_dir, "text_classification", payload, table, runs)
    return payload


if __name__ == "__main__":
    main()
    common.end_distributed()
