"""The lookahead of large embedding tables on the looked-up rows (hf_ddlr.meta.rows): a run with it trains bit
for bit like one with the full lookahead; tables read elsewhere (tied to the output layer) keep the full one;
a restriction that would change a value is caught by the first step's check."""

from __future__ import annotations

import importlib

import pytest
import torch
from tiny_text import text_data_splits, tiny_bert
from transformers import DataCollatorWithPadding

import hf_ddlr.meta.rows as rows_mod
from hf_ddlr import MetaLRConfig, MetaLRTrainer

lookahead_mod = importlib.import_module("hf_ddlr.meta.lookahead")  # (the package exports a function of that name)

COMMON = dict(report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, logging_steps=1,
              max_steps=4, per_device_train_batch_size=8, lr_scheduler_type="constant", meta_lr=0.2)


@pytest.fixture
def small_tables(monkeypatch):
    """The tiny models' tables qualify (the thresholds are for real vocabularies)."""
    monkeypatch.setattr(rows_mod, "MIN_TABLE_ROWS", 0)
    monkeypatch.setattr(rows_mod, "MAX_ROW_FRACTION", 1.0)


def _run(tmp_path, name, restrict: bool, monkeypatch, **kw):
    """Train the tiny BERT; ``restrict=False``: no table is planned (the full lookahead). Also returns the
    number of rows of every restricted lookahead."""
    calls = []
    real = lookahead_mod._rows_next
    with monkeypatch.context() as m:
        if not restrict:
            m.setattr(rows_mod.EmbeddingRows, "plan", lambda self, *a: {})
        m.setattr(lookahead_mod, "_rows_next", lambda *a: calls.append(a[4].numel()) or real(*a))
        tok, train, meta = text_data_splits()
        args = MetaLRConfig(output_dir=str(tmp_path / name), **{**COMMON, **kw})
        t = MetaLRTrainer(model=tiny_bert(), args=args, train_dataset=train, meta_dataset=meta,
                          data_collator=DataCollatorWithPadding(tok))
        t.train()
    return t, calls


@pytest.mark.parametrize("kw", [dict(optim="adamw_torch", learning_rate=1e-3, weight_decay=0.01, max_grad_norm=0.1),
                                dict(optim="sgd", optim_args="momentum=0.9", learning_rate=0.1, weight_decay=5e-4)])
def test_restricted_run_trains_bit_for_bit_like_the_full_lookahead(tmp_path, monkeypatch, small_tables, kw):
    """AdamW with clipping (the preconditioner on the rows), SGD momentum: identical weights, rates and logs;
    the word-embedding table was restricted on every step, to fewer rows than it has."""
    a, calls = _run(tmp_path, "rows", True, monkeypatch, **kw)
    b, none = _run(tmp_path, "full", False, monkeypatch, **kw)
    assert a._schedule.embedding_rows.state == "verified" and a._layerwise == "verified"
    vocab = a.model.bert.embeddings.word_embeddings.num_embeddings
    assert len(calls) == 4 and all(0 < n < vocab for n in calls) and not none
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n
    assert torch.equal(a.rates.instance, b.rates.instance)
    strip = [{k: v for k, v in h.items() if "runtime" not in k and "per_second" not in k} for h in a.state.log_history]
    assert strip == [{k: v for k, v in h.items() if "runtime" not in k and "per_second" not in k}
                     for h in b.state.log_history]


def test_a_restriction_that_changes_the_meta_loss_is_caught_and_turned_off(tmp_path, monkeypatch, small_tables):
    """A plan that leaves out rows the meta forward reads: the first step's comparison differs, the run keeps
    the full lookahead (its results equal a run that never restricted)."""
    kw = dict(optim="adamw_torch", learning_rate=1e-3)
    b, _ = _run(tmp_path, "full", False, monkeypatch, **kw)
    real_plan = rows_mod.EmbeddingRows.plan
    monkeypatch.setattr(rows_mod.EmbeddingRows, "plan",
                        lambda self, *a: {n: r[: len(r) // 2] for n, r in real_plan(self, *a).items()})
    a, calls = _run(tmp_path, "bad", True, monkeypatch, **kw)
    assert a._schedule.embedding_rows.state == "off" and len(calls) == 1
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(a.rates.instance, b.rates.instance)


def test_tables_read_outside_their_lookup_are_not_restricted():
    """GPT-2 ties its word embedding to the output layer (read whole); positions are built inside the model:
    neither is planned. BERT's word embedding, looked up on input_ids, is."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_ddlr.meta.layerwise import record_layers

    def lookups(model, inputs):
        names = {id(p): n for n, p in model.named_parameters()}
        with record_layers(model, names, inputs["input_ids"].shape[0]) as tape:
            model(**inputs)
        tape.inputs = inputs  # as the trainer's real forward records them
        return tape.embedding_lookups()

    ids = torch.randint(1, 40, (3, 6))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=8))
    assert lookups(gpt2, {"input_ids": ids}) == {}
    found = lookups(tiny_bert(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert list(found) == ["bert.embeddings.word_embeddings.weight"] and found[list(found)[0]][0] == "input_ids"
