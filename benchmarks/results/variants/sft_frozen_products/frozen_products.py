"""Where the SFT example's meta-gradient signal sits at the end of a plain run (docs/robustness.md, "The SFT
example's signal at the end of a plain run").

Trains the example's plain model (its recipe, ``EPOCHS`` epochs; the example trains 30), then scores every training
answer by (a) its own loss, (b) the product of its gradient with the whole meta set's loss gradient, raw and
preconditioned by AdamW's second moment at the last step (what the meta step's lookahead direction is made of), and
(c) that preconditioned product restricted to each part of the network. Prints the AUROC of each for clean above
corrupted answers.

    python benchmarks/results/variants/sft_frozen_products/frozen_products.py SEED EPOCHS
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from transformers import Trainer, TrainingArguments

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "..", "examples"))
import sft_noisy_data as sft  # noqa: E402

ORDER = ["final_norm", "layer1.mlp", "layer1.attn", "layer1.norm", "layer0.mlp", "layer0.attn", "layer0.norm",
         "embed"]  # from the output down (the tiny Llama ties its output layer to the embedding)


def part(name: str) -> str:
    if "embed" in name or "lm_head" in name:
        return "embed"
    if name.startswith("model.norm"):
        return "final_norm"
    kind = "attn" if "self_attn" in name else "mlp" if "mlp" in name else "norm"
    return f"layer{name.split('.')[2]}.{kind}"


def answer_losses(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Per-example completion loss (mean over the answer's tokens), as the example's causal-LM task."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                              reduction="none").view(labels.shape)
    mask = (labels != -100).float()
    return (token * mask).sum(1) / mask.sum(1)


def main(seed: int, epochs: float) -> None:
    torch.set_num_threads(1)
    s = sft.SFTOptions()
    tok = sft.char_tokenizer()
    data = sft.make_data(s, seed)
    corrupted = np.array([r["is_corrupted"] for r in data["train"]])
    source = np.array([r["source"] for r in data["train"]])
    train, meta = sft.to_dataset(tok, data["train"]), sft.to_dataset(tok, data["meta"])
    recipe = {k: v for k, v in sft.presets(s).items() if k != "output_dir"}
    recipe.update(num_train_epochs=epochs, disable_tqdm=True, seed=seed, data_seed=seed, report_to=[],
                  save_strategy="no")
    model = sft.tiny_llama(s, len(tok), seed)
    trainer = Trainer(model=model, args=TrainingArguments(tempfile.mkdtemp(), **recipe), train_dataset=train)
    trainer.train()
    model.eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]

    def rows(ds, idx):
        b = ds[idx]
        return {k: torch.as_tensor(b[k]) for k in ("input_ids", "attention_mask", "labels")}

    g_meta = torch.autograd.grad(answer_losses(model, rows(meta, list(range(len(meta))))).mean(), params)
    precond = []
    for p in params:
        state = trainer.optimizer.state[p]
        v_hat = state["exp_avg_sq"] / (1 - 0.999 ** float(state["step"]))
        precond.append(1 / (v_hat.sqrt() + 1e-8))
    parts = sorted({part(n) for n, _ in named})
    losses, raw, pre = [], [], []
    by_part: dict[str, list[float]] = {k: [] for k in parts}
    for i in range(len(train)):
        loss = answer_losses(model, rows(train, [i]))[0]
        grads = torch.autograd.grad(loss, params)
        losses.append(float(loss.detach()))
        raw.append(float(sum((g * m).sum() for g, m in zip(grads, g_meta))))
        terms = [float((g * m * q).sum()) for g, m, q in zip(grads, g_meta, precond)]
        pre.append(sum(terms))
        for k in parts:
            by_part[k].append(sum(t for t, (n, _) in zip(terms, named) if part(n) == k))
    clean = ~corrupted
    print(f"seed {seed}, {epochs:g} epochs: held-out exact-match {sft.exact_match(model, tok, data['test']):.3f}; "
          f"AUROC clean > corrupted: -loss {roc_auc_score(clean, -np.array(losses)):.3f}, "
          f"product {roc_auc_score(clean, raw):.3f}, preconditioned product {roc_auc_score(clean, pre):.3f} (by "
          "source: " + ", ".join(f"{n} {roc_auc_score(clean[source == n], np.array(pre)[source == n]):.2f}"
                                  for n in sft.SOURCES) + ")")
    for k in parts:
        print(f"  {k}: {roc_auc_score(clean, by_part[k]):.3f}")
    total = np.zeros(len(clean))
    for k in ORDER:
        total = total + np.array(by_part[k])
        print(f"  from the output down to {k}: {roc_auc_score(clean, total):.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]))
