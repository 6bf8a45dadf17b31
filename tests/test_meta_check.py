"""After a learning run the trainer reads the meta set with the trained model and names the examples it gets wrong
(``trainer.meta_set_check``): the numbers against a direct evaluation, the warning, and the tasks it skips."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from tiny import TinyMLP, make_split

from hf_ddlr import MetaLRConfig, MetaLRTrainer
from hf_ddlr._meta_check import MetaSetCheck

COMMON = dict(report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, optim="adamw_torch",
              learning_rate=0.03, per_device_train_batch_size=32, per_device_eval_batch_size=7)


def _meta_with_wrong_labels(k: int):
    """The meta split with the labels of ``k`` clear-cut examples (top score 0.8 above the next) changed to their
    least likely class; returns it and those rows."""
    meta = make_split(30, seed=2)
    scores = torch.tensor(meta["x"])[:, :3]
    top2 = scores.topk(2, dim=1).values
    rows = torch.nonzero(top2[:, 0] - top2[:, 1] > 0.8).flatten()[:k].tolist()
    worst = scores.argmin(1).tolist()
    meta = meta.map(lambda r, i: {"label": worst[i] if i in rows else r["label"]}, with_indices=True)
    return meta, rows


def test_the_examples_the_trained_model_gets_wrong_are_named_and_warned_about(tmp_path, caplog):
    """A model that learned the task (dropout on: the check must read it in eval mode) on a meta set with 8 of 30
    labels changed: the check's losses and mistakes equal a direct eval-mode evaluation of every meta example (in
    batches of per_device_eval_batch_size, a last partial one included), every changed row is among the mistakes,
    they come highest loss first, and a warning names them (the rates follow that meta set, so the model also gets
    some clean examples wrong)."""
    meta, bad = _meta_with_wrong_labels(8)
    assert len(bad) == 8
    torch.manual_seed(0)
    model = TinyMLP(dropout=0.3)
    trainer = MetaLRTrainer(model=model, args=MetaLRConfig(output_dir=str(tmp_path), num_train_epochs=6, **COMMON),
                            train_dataset=make_split(512, seed=1), meta_dataset=meta)
    with caplog.at_level(logging.INFO, logger="hf_ddlr"):
        trainer.train()
    check = trainer.meta_set_check
    assert model.training  # the trainer's mode is given back
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor(meta["x"])).logits
    y = torch.tensor(meta["label"])
    torch.testing.assert_close(check.losses, F.cross_entropy(logits, y, reduction="none"))
    assert torch.equal(check.wrong, logits.argmax(1) != y)
    wrong = check.wrong_rows()
    assert set(bad) <= set(wrong)
    assert torch.all(check.losses[wrong][:-1] >= check.losses[wrong][1:])
    assert check.wrong_share >= 0.2 and not check.at_chance
    warned = [r for r in caplog.records if r.name == "hf_ddlr._meta_check" and r.levelno == logging.WARNING]
    assert len(warned) == 1 and f"{len(wrong)} of the 30 meta examples wrong" in warned[0].getMessage()
    assert f"highest loss first: {', '.join(map(str, wrong[:10]))}" in warned[0].getMessage()


def test_the_model_card_carries_the_check(tmp_path):
    """The card written for the Hub (Trainer.create_model_card, as push_to_hub writes it) names the meta examples the
    trained model gets wrong, as the check found them."""
    from tiny import TinyConfig, TinyPreTrained

    meta, bad = _meta_with_wrong_labels(8)
    torch.manual_seed(0)
    trainer = MetaLRTrainer(model=TinyPreTrained(TinyConfig()),
                            args=MetaLRConfig(output_dir=str(tmp_path), num_train_epochs=6, **COMMON),
                            train_dataset=make_split(512, seed=1), meta_dataset=meta)
    trainer.train()
    wrong = trainer.meta_set_check.wrong_rows()
    assert set(bad) <= set(wrong)
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "README.md").read_text()
    assert (f"| meta set, as the trained model sees it | {len(wrong)} of 30 meta examples predicted wrong" in card
            and f"rows, highest loss first: {', '.join(map(str, wrong[:10]))}" in card)


def test_a_meta_set_the_model_agrees_with_is_reported_without_a_warning(tmp_path, caplog):
    torch.manual_seed(0)
    trainer = MetaLRTrainer(model=TinyMLP(), args=MetaLRConfig(output_dir=str(tmp_path), num_train_epochs=6, **COMMON),
                            train_dataset=make_split(512, seed=1), meta_dataset=make_split(30, seed=2))
    with caplog.at_level(logging.INFO, logger="hf_ddlr"):
        trainer.train()
    check = trainer.meta_set_check
    assert check.wrong_share < 0.2
    records = [r for r in caplog.records if r.name == "hf_ddlr._meta_check"]
    assert [r.levelno for r in records] == [logging.INFO]


def test_a_model_at_chance_on_the_meta_set_is_told_so():
    check = MetaSetCheck(torch.tensor([0.7, 0.8, 0.6, 0.9]), torch.tensor([True, True, False, True]), num_labels=2)
    assert check.at_chance and check.wrong_rows() == [3, 1, 0]
    assert "no better than guessing" in check.message() and "check that these labels" not in check.message()
    three = MetaSetCheck(torch.tensor([0.7, 0.8, 0.6]), torch.tensor([True, False, False]), num_labels=3)
    assert not three.at_chance and "rows, highest loss first: 0." in three.message()


@pytest.mark.parametrize("task", ["regression", "multi_label_classification"])
def test_tasks_without_a_single_label_have_no_check(tmp_path, task):
    from test_task_losses import COMMON as TASK_COMMON
    from test_task_losses import _collator, _data, _model

    args = MetaLRConfig(output_dir=str(tmp_path), **{**TASK_COMMON, "max_steps": 1})
    trainer = MetaLRTrainer(model=_model(task), args=args, train_dataset=_data(task, 16, seed=1),
                            meta_dataset=_data(task, 8, seed=2), data_collator=_collator(task))
    trainer.train()
    assert trainer.meta_set_check is None


def test_a_meta_set_the_model_cannot_take_fails_with_both_batches_shapes(tmp_path):
    """A meta set of other feature sizes than the train set fails at the first meta step with a message that shows
    the meta batch's and a training micro-batch's shapes and names the fix, not the model's bare shape error."""
    args = MetaLRConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                        per_device_train_batch_size=8, optim="sgd", learning_rate=0.1, max_steps=2)
    torch.manual_seed(0)
    t = MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=make_split(32, 1),
                      meta_dataset=make_split(16, 2, d_in=5))
    # the model's own error as torch words it (torch 2.15 names the kernel: "addmm: mat1 and mat2 ...")
    with pytest.raises(RuntimeError, match=r"(?s)first meta step failed: RuntimeError: (addmm: )?mat1 and mat2.*meta batch "
                                           r"\{x: \(8, 5\)\} beside the training micro-batch \{x: \(8, 6\)\}.*"
                                           r"prepare the meta set as the train set"):
        t.train()
