"""A tiny text-classification set-up built locally (nothing downloaded): a WordLevel tokenizer, variable-length
'sentences' (so DataCollatorWithPadding pads) and a 2-layer BERT with hidden size 32 and no dropout
(attention_probs_dropout_prob=0, so SDPA picks the fused CPU kernel, which has no forward-mode AD)."""

from __future__ import annotations

import datasets
import torch
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

WORDS = [f"w{i}" for i in range(90)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def text_split(tok: PreTrainedTokenizerFast, n: int, seed: int) -> datasets.Dataset:
    """``n`` sentences of 3-11 words; label = whether most words are from the lower half of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, len(WORDS), (int(torch.randint(3, 12, (1,), generator=g)),), generator=g)
        rows.append({"text": " ".join(WORDS[i] for i in ids), "label": int((ids < 45).float().mean() > 0.5)})
    return datasets.Dataset.from_list(rows).map(
        lambda b: tok(b["text"]), batched=True, remove_columns=["text"]
    )


def text_data_splits() -> tuple[PreTrainedTokenizerFast, datasets.Dataset, datasets.Dataset]:
    """(tokenizer, 32 train rows, 16 meta rows)."""
    tok = tiny_tokenizer()
    return tok, text_split(tok, 32, seed=1), text_split(tok, 16, seed=2)


def tiny_bert(dropout: float = 0.0) -> BertForSequenceClassification:
    """``dropout``: the hidden layers' (attention dropout stays 0)."""
    cfg = BertConfig(
        vocab_size=len(WORDS) + 4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg)
