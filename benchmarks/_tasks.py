"""The benchmark tasks shared by ``step_cost.py``, ``profile_meta_step.py`` and ``gpu_check.py``.

* :func:`make_task` — a CIFAR ResNet-18 (batch 64, 100 classes, random 32x32 inputs), a 4-conv BatchNorm
  CNN on the same images (``"cnn4"``), a small BERT classifier (hidden 128, 2 layers, seq 64, batch 32;
  ``"bert_lora"``: the same BERT wrapped in a ``peft`` LoRA r=8 on query/value, only the adapters and the
  classifier head trained) or a tiny Llama-style causal LM (``"llama"``: hidden 128, 2 layers, grouped-query
  attention, seq 128, batch 16; ``"llama_lora"``: under a LoRA r=8 on every projection), with in-memory train
  (20 % corrupted) and clean meta sets;
* :func:`make_trainer` — a plain ``Trainer`` or a ``MetaLRTrainer`` in one of :data:`CONFIGS` on a task, with
  the benchmarks' recipe (SGD momentum 0.9, weight decay 5e-4, constant LR, CPU, no logging);
* :func:`tiny_bert` — the locally built BERT classifier both BERT benchmarks use (nothing is downloaded).

Every model factory seeds torch before building, so every call gives the same initial weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

# (name, strategy, update); "plain" is transformers.Trainer
CONFIGS: list[tuple[str, str | None, str | None]] = [
    ("plain", None, None),
    ("exact", "exact", "same_step"),
    ("jvp", "jvp", "same_step"),
    ("finite_difference", "finite_difference", "same_step"),
    ("last_layer", "last_layer", "same_step"),
    ("jvp/delayed", "jvp", "delayed"),
    ("finite_difference/delayed", "finite_difference", "delayed"),
    ("last_layer/delayed", "last_layer", "delayed"),
    ("jvp/forward_mode", "jvp", "same_step"),  # the default with layerwise_dots=False (BERT only, see below)
]
# MetaLRConfig options of a configuration beyond strategy and update
OPTIONS: dict[str, dict] = {"jvp/forward_mode": {"layerwise_dots": False}}


# the LoRA task measures the default against plain LoRA training, with exact and forward mode for reference
LORA_CONFIGS = ["plain", "exact", "jvp", "jvp/delayed", "jvp/forward_mode"]


def configs_for(model: str) -> list[str]:
    """The configurations measured for ``model``. On the BatchNorm nets the default already runs in forward
    mode, so 'jvp/forward_mode' would only repeat the 'jvp' row; a causal LM has no single head input per
    example, so no 'last_layer' rows."""
    if model in ("bert_lora", "llama_lora"):
        return list(LORA_CONFIGS)
    names = [c[0] for c in CONFIGS]
    if model in ("resnet", "cnn4"):
        return [c for c in names if c != "jvp/forward_mode"]
    if model == "llama":
        return [c for c in names if not c.startswith("last_layer")]
    return names


class DictDataset(torch.utils.data.Dataset):
    """In-memory map-style dataset of dict items (cheap __getitem__, so data loading stays negligible)."""

    def __init__(self, **cols: torch.Tensor) -> None:
        self.cols = cols
        self.n = len(next(iter(cols.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.cols.items()}


@dataclass
class Task:
    """A benchmark task: model factory, train / meta data and the recipe's batch size and learning rate."""

    name: str
    batch_size: int
    learning_rate: float
    make_model: Callable[[], torch.nn.Module]  # a fresh model, same init every call
    train: DictDataset
    meta: DictDataset
    describe: str


def tiny_bert(
    vocab: int, seq: int, *, hidden: int, heads: int, ffn: int, dropout: bool = True
) -> torch.nn.Module:
    """A 2-layer ``BertForSequenceClassification`` with 2 labels, built locally from seed 0."""
    from transformers import BertConfig, BertForSequenceClassification

    no_dropout = {} if dropout else dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=seq,
        num_labels=2,
        **no_dropout,
    )
    return BertForSequenceClassification(cfg)


def _resnet_data(g: torch.Generator, n_train: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Class prototypes + noise; 20 % of the train labels flipped, the meta set clean."""
    C = 100
    protos = torch.randn(C, 3, 32, 32, generator=g)

    def images(n: int, noisy: float) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, C, (n,), generator=g)
        x = 0.5 * protos[y] + torch.randn(n, 3, 32, 32, generator=g)
        if noisy:
            flip = torch.rand(n, generator=g) < noisy
            y = torch.where(flip, torch.randint(0, C, (n,), generator=g), y)
        return x, y

    return {"train": images(n_train, 0.2), "meta": images(1000, 0.0)}


def _bert_data(g: torch.Generator, n_train: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random token ids labelled by a token-count rule; 20 % of train labels flipped, the meta set clean."""
    V, S = 1000, 64

    def tokens(n: int, noisy: float) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(1, V, (n, S), generator=g)
        y = ((ids < V // 2).sum(1) > S // 2).long()
        if noisy:
            flip = torch.rand(n, generator=g) < noisy
            y = torch.where(flip, 1 - y, y)
        return ids, y

    return {"train": tokens(n_train, 0.2), "meta": tokens(1000, 0.0)}


def _lm_data(g: torch.Generator, n_train: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Arithmetic token sequences (start a, step k: ``a + k·t`` mod the vocabulary), labels = the sequence
    (the causal LM loss shifts them); 20 % of the train sequences are random tokens, the meta set is clean."""
    V, S = 1000, 128

    def sequences(n: int, noisy: float) -> tuple[torch.Tensor, torch.Tensor]:
        a, k = torch.randint(0, V - 1, (n, 1), generator=g), torch.randint(1, 50, (n, 1), generator=g)
        ids = (a + k * torch.arange(S)) % (V - 1) + 1
        if noisy:
            flip = torch.rand(n, generator=g) < noisy
            ids = torch.where(flip[:, None], torch.randint(1, V, (n, S), generator=g), ids)
        return ids, ids.clone()

    return {"train": sequences(n_train, 0.2), "meta": sequences(256, 0.0)}


def tiny_llama() -> torch.nn.Module:
    """A 2-layer ``LlamaForCausalLM`` (vocab 1000, hidden 128, 4 heads / 2 key-value heads, MLP 344, RMSNorm,
    rotary positions up to 128), built locally from seed 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def lora_llama(r: int = 8) -> torch.nn.Module:
    """:func:`tiny_llama` in a ``peft`` LoRA of rank ``r`` on every attention and MLP projection (alpha 2r, no
    LoRA dropout); only the adapters train."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    torch.manual_seed(0)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(base, cfg)


def _cnn4_model() -> torch.nn.Module:
    from hf_ddlr.models import SmallCNNConfig, SmallCNNForImageClassification

    torch.manual_seed(0)
    cfg = SmallCNNConfig(num_channels=3, image_size=32, channels=[32, 64, 128, 128], num_labels=100)
    return SmallCNNForImageClassification(cfg)


def _resnet_model(width: int) -> torch.nn.Module:
    from hf_ddlr.models import CifarResNetConfig, CifarResNetForImageClassification

    torch.manual_seed(0)
    return CifarResNetForImageClassification(CifarResNetConfig(base_width=width, num_labels=100))


def lora_bert(r: int = 8) -> torch.nn.Module:
    """The benchmark's BERT (:func:`tiny_bert`) in a ``peft`` LoRA of rank ``r`` on query and value (alpha 2r,
    no LoRA dropout); the classifier head is trained in full (peft's ``modules_to_save`` for SEQ_CLS)."""
    from peft import LoraConfig, get_peft_model

    base = tiny_bert(1000, 64, hidden=128, heads=2, ffn=512)
    torch.manual_seed(0)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["query", "value"], task_type="SEQ_CLS")
    return get_peft_model(base, cfg)


_IMAGES = "random 32x32 inputs (class prototypes + noise, 20% flipped labels)"
# name -> (input key, batch size, learning rate, data maker, model factory taking the width, description)
_TASKS: dict[str, tuple] = {
    "resnet": ("pixel_values", 64, 0.1, _resnet_data, _resnet_model,
               "CIFAR ResNet-18 (base_width {width}, 100 classes), batch 64, " + _IMAGES),
    "cnn4": ("pixel_values", 64, 0.05, _resnet_data, lambda w: _cnn4_model(),
             "4-conv BatchNorm CNN ([conv3x3-BN-ReLU-maxpool] x 4: 32, 64, 128, 128 channels; linear; 100 classes), "
             "batch 64, " + _IMAGES),
    "llama": ("input_ids", 16, 0.05, _lm_data, lambda w: tiny_llama(),
              "LlamaForCausalLM (vocab 1000, hidden 128, 2 layers, 4 heads / 2 KV heads, MLP 344, RMSNorm, rotary), "
              "seq 128, batch 16, causal LM loss (20% of train sequences random tokens)"),
    "llama_lora": ("input_ids", 16, 0.05, _lm_data, lambda w: lora_llama(),
                   "LoRA r=8 (every attention and MLP projection) on the LlamaForCausalLM of 'llama' (vocab 1000, "
                   "hidden 128, 2 layers, RMSNorm, rotary), seq 128, batch 16; plain = LoRA training with "
                   "transformers.Trainer"),
    "bert": ("input_ids", 32, 0.02, _bert_data, lambda w: tiny_bert(1000, 64, hidden=128, heads=2, ffn=512),
             "BertForSequenceClassification (vocab 1000, hidden 128, 2 layers, 2 heads, ffn 512, dropout 0.1, "
             "sdpa attention), seq 64, batch 32, 2 labels"),
    "bert_lora": ("input_ids", 32, 0.02, _bert_data, lambda w: lora_bert(),
                  "LoRA r=8 (query, value; classifier head trained) on the BertForSequenceClassification of 'bert' "
                  "(vocab 1000, hidden 128, 2 layers, ffn 512, dropout 0.1), seq 64, batch 32; plain = LoRA training "
                  "with transformers.Trainer"),
}


def make_task(name: str, width: int, n_train: int) -> Task:
    """The ``"resnet"`` (base width ``width``), ``"cnn4"``, ``"bert"``, ``"bert_lora"``, ``"llama"`` or
    ``"llama_lora"`` task with ``n_train`` training examples."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(_TASKS)}")
    key, batch, lr, make_data, factory, describe = _TASKS[name]
    data = make_data(torch.Generator().manual_seed(1234), n_train)
    train, meta = (DictDataset(**{key: data[s][0], "labels": data[s][1]}) for s in ("train", "meta"))
    return Task(name, batch, lr, functools.partial(factory, width), train, meta, describe.format(width=width))


def make_trainer(
    task: Task,
    cfg: str,
    max_steps: int,
    out_dir: str,
    model: torch.nn.Module | None = None,
    callbacks: Iterable[TrainerCallback] = (),
    meta_options: dict | None = None,
):
    """A plain ``Trainer`` (cfg 'plain') or a ``MetaLRTrainer`` configured as ``cfg`` (and ``meta_options``),
    without the printer callback (no end-of-train metrics print). ``meta_options`` None: ``probe_batches=0``, so
    that a configuration costs what its meta-gradient strategy costs (step_cost.py, profile_meta_step.py compare
    strategies; the probes' extra forward-mode pass is measured by wallclock.py, which passes the options)."""
    from transformers import Trainer, TrainingArguments

    from hf_ddlr import MetaLRConfig, MetaLRTrainer

    _, strategy, update = next(c for c in CONFIGS if c[0] == cfg)
    common = dict(
        output_dir=out_dir,
        per_device_train_batch_size=task.batch_size,
        max_steps=max_steps,
        learning_rate=task.learning_rate,
        optim="sgd",
        optim_args="momentum=0.9",
        weight_decay=5e-4,
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),  # the GPU where there is one (benchmarks/step_cost.py)
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        data_seed=0,
    )
    model = task.make_model() if model is None else model
    if strategy is None:
        tr = Trainer(
            model=model, args=TrainingArguments(**common), train_dataset=task.train, callbacks=list(callbacks)
        )
    else:
        args = MetaLRConfig(**common, meta_strategy=strategy, meta_update=update,
                            **{**OPTIONS.get(cfg, {}), **({"probe_batches": 0} if meta_options is None else meta_options)})
        tr = MetaLRTrainer(model=model, args=args, train_dataset=task.train, meta_dataset=task.meta)
        for cb in callbacks:  # after the trainer's own trajectory recorder
            tr.add_callback(cb)
    tr.remove_callback(PrinterCallback)
    return tr
