"""Tasks beyond single-label classification (issue 16, part 1): the per-example loss of every task is the loss the
model's own head computes (value and gradient at unit rates), MetaLRTrainer picks it from the model and trains
with it, and at rates that never move it trains as the plain Trainer does.

Tiny models built from configs (nothing downloaded), no dropout (a plain Trainer draws other dropout masks than
MetaLRTrainer's replayed ones), and rows with different numbers of target tokens (so that a per-example mean
of token means would differ from the models' token mean)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from launching import run_launch
from tiny_text import WORDS, tiny_tokenizer
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    DataCollatorForSeq2Seq,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
    TrainingArguments,
)

import hf_ddlr.meta.engine as engine
from hf_ddlr import MetaLRConfig, MetaLRTrainer
from hf_ddlr._tasks import decoder_inputs, resolve_task
from hf_ddlr.meta import MetaBatch, MicroBatch, param_specs, task_loss

HERE = Path(__file__).parent
VOCAB = len(WORDS) + 4
TASKS = ["multi_label_classification", "regression", "token_classification", "causal_lm", "seq2seq_lm"]
COMMON = dict(report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, optim="sgd",
              learning_rate=0.1, lr_scheduler_type="constant", logging_steps=1, per_device_train_batch_size=8,
              max_grad_norm=0.0)  # no clipping: a clipped step would hide a wrong scale of the gradient


def _bert_config(**kw) -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **kw)


def _model(task: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if task == "multi_label_classification":
        return BertForSequenceClassification(_bert_config(num_labels=4, problem_type="multi_label_classification"))
    if task == "regression":
        return BertForSequenceClassification(_bert_config(num_labels=1))
    if task == "token_classification":
        return BertForTokenClassification(_bert_config(num_labels=3))
    if task == "causal_lm":
        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                            pad_token_id=0))
    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=1,
                                               num_heads=2, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0))


def _row(task: str, g: torch.Generator) -> dict:
    n = int(torch.randint(3, 11, (1,), generator=g))
    ids = torch.randint(4, VOCAB, (n,), generator=g)
    low = ids < 4 + len(WORDS) // 2
    row = {"input_ids": ids.tolist(), "attention_mask": [1] * n}
    if task == "multi_label_classification":
        row["labels"] = [float(low.float().mean() > 0.5), float(low[0]), float(n > 6), float(ids[-1] % 2)]
    elif task == "regression":
        row["labels"] = float(low.float().mean())
    elif task == "token_classification":
        labels = ((ids - 4) % 3).tolist()
        labels[0] = -100 if n % 2 else labels[0]  # e.g. a special token: not a target
        row["labels"] = labels
    elif task == "causal_lm":
        k = int(torch.randint(0, n - 1, (1,), generator=g))  # a prompt masked by a completion-only collator
        row["labels"] = [-100] * k + ids[k:].tolist()
    else:
        row["labels"] = ids.flip(0)[: int(torch.randint(2, n + 1, (1,), generator=g))].tolist()
    return row


def _data(task: str, n: int, seed: int) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    return datasets.Dataset.from_list([_row(task, g) for _ in range(n)])


def _collator(task: str):
    tok = tiny_tokenizer()
    if task in ("multi_label_classification", "regression"):
        return DataCollatorWithPadding(tok)
    if task == "token_classification":
        return DataCollatorForTokenClassification(tok)
    return DataCollatorForSeq2Seq(tok)  # pads labels with -100 (no decoder_input_ids: the trainer makes them)


def _batch(task: str, n: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    ds = _data(task, n, seed)
    return _collator(task)([ds[i] for i in range(n)])


# ---------------------------------------------------------------- the loss functions
@pytest.mark.parametrize("task", TASKS)
def test_task_is_resolved_from_the_model(task):
    assert resolve_task(_model(task), _data(task, 2, 0)).task == task


@pytest.mark.parametrize("task", TASKS)
def test_unit_rate_loss_and_gradient_are_the_models_own(task):
    """Σ ℓ_i / Σ n_i (the weighted loss at e = 1) is the model's ``outputs.loss``, and its gradient the gradient of
    that loss by autograd; for token tasks the examples' target counts differ, so the per-example means'
    mean would not match."""
    model = _model(task).train()
    batch = _batch(task)
    params = [p for p in model.parameters() if p.requires_grad]
    ref = model(**batch).loss
    ref_grads = torch.autograd.grad(ref, params)
    loss = resolve_task(model, None) if task != "multi_label_classification" else task_loss(task)
    labels = batch.pop("labels")
    inputs = decoder_inputs(model, batch, labels, loss)
    L = loss(model(**inputs).logits, labels)
    assert L.shape == (labels.shape[0],)
    got = (torch.ones_like(L) * L).sum() / loss.num_targets([labels])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(torch.autograd.grad(got, params), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    if loss.token_level:
        counts = loss.counts(labels)
        assert counts.unique().numel() > 1
        assert not torch.allclose(loss.per_example_mean(L, labels).mean(), ref, rtol=1e-5)


def test_token_tasks_meta_gradient_is_that_of_the_token_weighted_loss():
    """The forward-mode meta-gradients ∂L_meta/∂e_i with the window's target tokens as the normalizer equal the
    exact ones (autograd through e of Σ e_i ℓ_i / Σ n_i), and the meta loss is the token mean of the meta batch
    (the model's own loss on it)."""
    model, task = _model("causal_lm").train(), task_loss("causal_lm")
    batch, meta = _batch("causal_lm", 6, seed=1), _batch("causal_lm", 4, seed=2)
    labels, mlabels = batch.pop("labels"), meta.pop("labels")
    params = {n: p for n, p in model.named_parameters()}
    specs = param_specs(torch.optim.SGD(model.parameters(), lr=0.1), params, set())
    e = torch.rand(6) + 0.5
    out = {}
    for strategy in ("jvp", "exact"):
        window = [MicroBatch(dict(batch), labels, e.clone(), seed=3)]
        out[strategy] = engine.meta_gradients(model, params, window, MetaBatch(dict(meta), mlabels, seed=4), specs,
                                              weight_decay=0.0, normalizer=task.num_targets([labels]),
                                              strategy=strategy, task=task)
    torch.testing.assert_close(out["jvp"].example_grad, out["exact"].example_grad, rtol=1e-3, atol=1e-7)
    lm, _ = engine.meta_loss_gradient(model, params, MetaBatch(dict(meta), mlabels, seed=4), task=task)
    with torch.no_grad():
        ref = float(model(**meta, labels=mlabels).loss)
    assert lm == pytest.approx(ref, rel=1e-5)


# ---------------------------------------------------------------- the trainer
def _meta_trainer(task: str, out, model=None, **kw) -> MetaLRTrainer:
    args = MetaLRConfig(output_dir=str(out), **{**COMMON, "max_steps": 3, **kw})
    return MetaLRTrainer(model=model if model is not None else _model(task), args=args,
                         train_dataset=_data(task, 24, seed=1), meta_dataset=_data(task, 8, seed=2),
                         data_collator=_collator(task))


SMOOTH = dict(label_smoothing_factor=0.1)


@pytest.mark.parametrize("task, kw", [(t, {}) for t in TASKS] + [("causal_lm", dict(gradient_accumulation_steps=2)),
                                                                 ("causal_lm", SMOOTH), ("token_classification", SMOOTH)])
def test_trainer_learns_rates_and_equals_the_plain_trainer_when_they_stay_at_one(task, kw, tmp_path):
    """A short run moves the rates with finite losses; with meta_lr=0 (rates stay 1) the weights and the logged
    losses are the plain Trainer's (up to the summation order of the loss). With gradient accumulation the
    token mean is over the window's target tokens, as the Trainer's ``num_items_in_batch`` makes it for a model
    whose loss takes it (Llama's). (A model that accepts ``**kwargs`` but averages each micro-batch on its own,
    as BERT's and T5's heads do, gets the sum of the micro-batch means from the plain Trainer at GA > 1;
    MetaLRTrainer uses the window mean for every task, as it always did for single-label classification.)
    Label smoothing is the Trainer's ``LabelSmoother``'s."""
    t = _meta_trainer(task, tmp_path / "learn", **kw)
    t.train()
    assert not torch.equal(t.rates.instance, torch.ones(24))
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)

    plain, meta = _model(task), _model(task)
    plain_args = TrainingArguments(output_dir=str(tmp_path / "plain"), **{**COMMON, "max_steps": 3, **kw})
    ref = Trainer(model=plain, args=plain_args, train_dataset=_data(task, 24, seed=1), data_collator=_collator(task))
    ref.train()
    zero = _meta_trainer(task, tmp_path / "zero", model=meta, meta_lr=0.0, **kw)
    zero.train()
    assert torch.equal(zero.rates.instance, torch.ones(24))
    ref_losses = [h["loss"] for h in ref.state.log_history if "loss" in h]
    assert [h["loss"] for h in zero.state.log_history if "loss" in h] == pytest.approx(ref_losses, rel=1e-5)
    for (n, a), (_, b) in zip(plain.state_dict().items(), meta.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)


def _first_loss(trainer: Trainer) -> float:
    trainer.train()
    return next(h["loss"] for h in trainer.state.log_history if "loss" in h)


def test_multi_label_logs_the_trainers_binary_cross_entropy(tmp_path):
    """The bug this fixes: a multi-label model trained with softmax cross-entropy on its multi-hot targets
    (a first logged loss of ~1.75 where the Trainer logs ~0.693)."""
    task = "multi_label_classification"
    plain = Trainer(model=_model(task), args=TrainingArguments(output_dir=str(tmp_path / "p"), **{**COMMON, "max_steps": 1}),
                    train_dataset=_data(task, 24, seed=1), data_collator=_collator(task))
    ref = _first_loss(plain)
    # delayed: the first real step uses rates 1 (same_step weights it with the rates its meta step just moved)
    got = _first_loss(_meta_trainer(task, tmp_path / "m", max_steps=1, meta_update="delayed"))
    assert ref == pytest.approx(math.log(2), abs=0.05)
    assert got == pytest.approx(ref, rel=1e-5)


def test_token_classification_keeps_the_per_layer_products(tmp_path):
    """The per-layer products are loss-agnostic: on BERT token classification they pass their check against
    forward mode, on BERT token classification and on Llama (RMSNorm) causal LM."""
    for task in ("token_classification", "causal_lm"):
        t = _meta_trainer(task, tmp_path / task)
        t.train()
        assert t._layerwise == "verified", task


@pytest.mark.parametrize("task", ["multi_label_classification", "token_classification", "causal_lm"])
@pytest.mark.parametrize("kw, msg", [(dict(lr_level="class"), "lr_level='class' .* single_label_classification only"),
                                     (dict(lr_level="both"), "lr_level='both'"),
                                     (dict(meta_strategy="last_layer"), "meta_strategy='last_layer'"),
                                     (dict(center_instance_rates=True), "center_instance_rates=True .* group_column"),
                                     (dict(instance_rate_scale="key"), "instance_rate_scale='key' .* group_column")])
def test_class_rates_and_last_layer_are_refused_for_other_tasks(task, kw, msg, tmp_path):
    with pytest.raises(ValueError, match=msg) as err:
        _meta_trainer(task, tmp_path, **kw)
    assert task in str(err.value)


def test_label_range_check_is_only_for_class_labels(tmp_path):
    """Regression (num_labels=1, float labels) used to be refused with 'labels outside the label space'."""
    t = _meta_trainer("regression", tmp_path, max_steps=1)
    assert t._task.task == "regression"


def test_unsupported_head_is_refused_naming_the_supported_tasks(tmp_path):
    model = BertForQuestionAnswering(_bert_config())
    with pytest.raises(ValueError, match="BertForQuestionAnswering.*single_label_classification.*causal_lm"):
        _meta_trainer("token_classification", tmp_path, model=model)


def test_losses_check_their_shapes():
    with pytest.raises(ValueError, match="multi_label_classification loss expects.*Supported tasks"):
        task_loss("multi_label_classification")(torch.randn(3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="token-level loss expects"):
        task_loss("token_classification")(torch.randn(3, 4), torch.zeros(3, dtype=torch.long))
    assert torch.equal(task_loss("causal_lm")(torch.zeros(2, 3, 5), torch.full((2, 3), -100)), torch.zeros(2))
    assert float(F.mse_loss(torch.ones(2), torch.zeros(2))) == 1.0


@pytest.mark.parametrize("kw", [dict(meta_strategy="exact"), dict(meta_strategy="finite_difference"),
                                dict(meta_update="delayed", gradient_accumulation_steps=2)])
def test_other_strategies_and_schedules_train_token_tasks(kw, tmp_path):
    t = _meta_trainer("seq2seq_lm", tmp_path, **kw)
    t.train()
    assert not torch.equal(t.rates.instance, torch.ones(24)) and torch.isfinite(t.rates.instance).all()
    assert all(math.isfinite(h["meta_loss"]) for h in t.state.log_history if "meta_loss" in h)


def test_token_mean_under_ddp_is_over_every_process_tokens(tmp_path):
    """Two CPU processes whose batches hold different numbers of target tokens: at rates 1 MetaLRTrainer trains
    as the plain Trainer does under DDP (its loss divides by the tokens of every process, as the Trainer's
    ``average_tokens_across_devices`` does), not by each process's own token count — and by its own count when
    that flag is off, as the Trainer then does."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", str(HERE / "ddp_task_worker.py"),
           str(tmp_path)]
    proc = run_launch(cmd, HERE, env)  # once more only after gloo's rare abort in a process's teardown
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["world_size"] == 2 and res["moved_True"] > 1e-3 and res["moved_False"] > 1e-3
        assert res["ways_differ"] > 1e-5, res  # the flag changes the Trainer's step here: the check can fail
        assert res["diff_True"] < 1e-6 and res["diff_False"] < 1e-6, res  # the flag followed both ways


@pytest.mark.parametrize("task, kw, expected", [
    ("causal_lm", {}, 4),                                                             # half of 8
    ("causal_lm", dict(per_device_train_batch_size=3, gradient_accumulation_steps=3), 5),  # half of 9, rounded up
    ("causal_lm", dict(meta_batch_size=6), 6),                                        # an explicit size is kept
    ("token_classification", {}, 8),                                                  # other tasks: the whole step
    ("seq2seq_lm", {}, 8),
])
def test_default_meta_batch_is_half_the_step_for_a_causal_lm(task, kw, expected, tmp_path, monkeypatch):
    """Unset ``meta_batch_size``: a causal LM's meta batch is half the examples of an optimizer step (rounded
    up), every other task's the whole step; the sizes actually collated per meta step are counted."""
    from hf_ddlr._batches import MetaSetSampler

    sizes: list[int] = []
    collated = MetaSetSampler._collated

    def spy(self, idx):
        sizes.append(len(idx))
        return collated(self, idx)

    monkeypatch.setattr(MetaSetSampler, "_collated", spy)
    args = MetaLRConfig(output_dir=str(tmp_path), **{**COMMON, "max_steps": 2, **kw})
    trainer = MetaLRTrainer(model=_model(task), args=args, train_dataset=_data(task, 24, seed=1),
                            meta_dataset=_data(task, 30, seed=2), data_collator=_collator(task))
    trainer.train()
    assert sizes == [expected, expected]
    # the trajectory says which meta batch a causal LM used when none was set (other tasks: None = the step's)
    recorded = trainer.lr_trajectory.config["meta_batch_size"]
    assert recorded == (expected if task == "causal_lm" else kw.get("meta_batch_size"))


@pytest.mark.parametrize("task, kw, probed", [
    ("multi_label_classification", {}, True), ("regression", {}, True), ("token_classification", {}, False),
    ("causal_lm", {}, False), ("seq2seq_lm", {}, False), ("causal_lm", dict(probe_batches=1), True),
])
def test_probes_by_default_for_tasks_with_one_loss_per_example(task, kw, probed, tmp_path):
    """Unset ``probe_batches``: one step's worth of probes for a task with one loss per example, none for a
    token-level task (set explicitly, a causal LM probes too); the trajectory records the value used."""
    args = MetaLRConfig(output_dir=str(tmp_path), **{**COMMON, "max_steps": 1, "max_instance_rate": None, **kw})
    trainer = MetaLRTrainer(model=_model(task), args=args, train_dataset=_data(task, 24, seed=1),
                            meta_dataset=_data(task, 30, seed=2), data_collator=_collator(task))
    trainer.train()
    batch = args.per_device_train_batch_size
    moved = int((trainer.rates.instance != 1).sum())
    assert moved > batch if probed else moved == batch
    assert trainer.lr_trajectory.config["probe_batches"] == (1.0 if probed else 0.0)


def test_seq2seq_trainer_with_rates_evaluates_by_generation(tmp_path):
    """``Seq2SeqTrainer``'s generation in evaluation and prediction (``predict_with_generate``) with the rates:
    a trainer and a config made of MetaLRTrainer / MetaLROptions and Seq2SeqTrainer / Seq2SeqTrainingArguments,
    as the README shows. The rates move; evaluation and ``predict`` generate (the index column never reaches
    ``generate``), as a plain Seq2SeqTrainer's do from the same trained model."""
    from dataclasses import dataclass

    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    from hf_ddlr import MetaLROptions

    @dataclass
    class MetaSeq2SeqConfig(MetaLROptions, Seq2SeqTrainingArguments):
        pass

    class MetaSeq2SeqTrainer(MetaLRTrainer, Seq2SeqTrainer):
        pass

    task = "seq2seq_lm"
    common = dict(report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                  predict_with_generate=True, generation_max_length=6, per_device_eval_batch_size=4)
    torch.manual_seed(0)
    args = MetaSeq2SeqConfig(output_dir=str(tmp_path / "meta"), per_device_train_batch_size=4, learning_rate=1e-2,
                             max_steps=4, eval_strategy="steps", eval_steps=2, **common)
    generated = lambda p: {"generated_tokens": float((p.predictions > 0).sum())}  # noqa: E731
    trainer = MetaSeq2SeqTrainer(model=_model(task), args=args, train_dataset=_data(task, 16, 1),
                                 meta_dataset=_data(task, 8, 2), eval_dataset=_data(task, 8, 3),
                                 data_collator=_collator(task), compute_metrics=generated)
    trainer.train()
    assert not torch.equal(trainer.rates.instance, torch.ones_like(trainer.rates.instance))
    evals = [h for h in trainer.state.log_history if "eval_generated_tokens" in h]
    assert len(evals) == 2 and all(h["eval_generated_tokens"] > 0 for h in evals)
    test = _data(task, 4, 4)
    got = trainer.predict(test)
    plain = Seq2SeqTrainer(model=trainer.model, args=Seq2SeqTrainingArguments(output_dir=str(tmp_path / "plain"),
                                                                             **common),
                           data_collator=_collator(task))
    np.testing.assert_array_equal(got.predictions, plain.predict(test).predictions)



def _named_otherwise(name: str) -> torch.nn.Module:
    """LM heads whose class name has no task suffix, as AutoModelForCausalLM / AutoModelForSeq2SeqLM load them."""
    from transformers import BertLMHeadModel, GPT2Config, GPT2LMHeadModel, MarianConfig, MarianMTModel

    torch.manual_seed(0)
    if name == "GPT2LMHeadModel":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    if name == "BertLMHeadModel":
        return BertLMHeadModel(_bert_config(is_decoder=True))
    return MarianMTModel(MarianConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                      decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0, pad_token_id=0,
                                      decoder_start_token_id=0))


@pytest.mark.parametrize("name, task", [("GPT2LMHeadModel", "causal_lm"), ("BertLMHeadModel", "causal_lm"),
                                        ("MarianMTModel", "seq2seq_lm")])
def test_lm_heads_named_without_a_task_suffix_get_their_task_and_its_loss(name, task):
    """GPT-2's and Marian's heads (what the Auto classes load for gpt2 or opus-mt) are read from transformers'
    auto mappings: the task is theirs, and at rates 1 its loss and gradient are the model's own outputs.loss."""
    model = _named_otherwise(name).train()
    loss = resolve_task(model, None)
    assert loss.task == task
    batch = _batch(task)
    params = [p for p in model.parameters() if p.requires_grad]
    ref = model(**batch).loss
    labels = batch.pop("labels")
    L = loss(model(**decoder_inputs(model, batch, labels, loss)).logits, labels)
    got = L.sum() / loss.num_targets([labels])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(torch.autograd.grad(got, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_an_lm_head_without_a_shifted_loss_is_refused_by_name():
    from transformers import XLNetConfig, XLNetLMHeadModel

    model = XLNetLMHeadModel(XLNetConfig(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=2, d_inner=64))
    with pytest.raises(ValueError, match="cannot weight the loss of XLNetLMHeadModel"):
        resolve_task(model, None)
