"""Which parameters the meta step takes (``meta_parameters``): the head after the stack of blocks, patterns,
errors, and what ``"auto"`` resolves to for a run."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

from hf_ddlr.meta.parameters import block_stack, head_parameter_names, select_meta_parameters


def _bert(**kw) -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=24, num_labels=2, **kw))


def _names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_the_head_is_what_follows_the_stack_of_blocks():
    bert = _bert()
    assert block_stack(bert) == "bert.encoder.layer"
    assert head_parameter_names(bert, _names(bert)) == [
        "bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"]
    torch.manual_seed(0)
    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=30, n_embd=16, n_layer=2, n_head=2, num_labels=2,
                                                    pad_token_id=0))
    assert block_stack(gpt2) == "transformer.h"
    assert head_parameter_names(gpt2, _names(gpt2)) == ["transformer.ln_f.weight", "transformer.ln_f.bias",
                                                        "score.weight"]
    # frozen parameters are not taken; a model without a stack of blocks has no head
    bert.classifier.weight.requires_grad_(False)
    assert "classifier.weight" not in head_parameter_names(bert, _names(bert))
    assert head_parameter_names(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), ["0.weight"]) == []


def test_select_meta_parameters_choices_and_errors():
    bert = _bert()
    names = _names(bert)
    assert select_meta_parameters(bert, names, "all") is None
    assert select_meta_parameters(bert, names, r"layer\.1\.|classifier") == [
        n for n in names if ".layer.1." in n or n.startswith("classifier")]
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        select_meta_parameters(bert, names, "decoder")
    with pytest.raises(ValueError, match="not one of .* nor a valid regular expression"):
        select_meta_parameters(bert, names, "layer[")
    with pytest.raises(ValueError, match="has none. Use meta_parameters='all'"):
        select_meta_parameters(nn.Sequential(nn.Linear(3, 2)), ["0.weight"], "head")


# ---------------------------------------------------------------- the trainer: what "auto" resolves to
def _trainer(tmp_path, model, trainer_kw=None, **kw):
    from tiny_text import text_data_splits
    from transformers import DataCollatorWithPadding

    from hf_ddlr import MetaLRConfig, MetaLRTrainer

    tok, train, meta = text_data_splits()
    kw = {"save_strategy": "no", "max_steps": 2, "optim": "adamw_torch", "learning_rate": 1e-3, **kw}
    args = MetaLRConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, report_to=[], use_cpu=True,
                        disable_tqdm=True, seed=0, max_grad_norm=0.05, **kw)
    return MetaLRTrainer(model=model, args=args, train_dataset=train, meta_dataset=meta,
                         data_collator=DataCollatorWithPadding(tok), **(trainer_kw or {}))


def _pretrained(tmp_path):
    from tiny_text import tiny_bert

    path = tmp_path / "pretrained"
    if not path.exists():
        tiny_bert().save_pretrained(path)
    return BertForSequenceClassification.from_pretrained(path)


def _trained(tmp_path, model, **kw):
    trainer = _trainer(tmp_path, model, **kw)
    trainer.train()
    return trainer


def test_auto_takes_the_head_of_a_pretrained_model_and_every_parameter_of_a_new_one(tmp_path):
    """``meta_parameters="auto"``: a fine-tune of a model loaded with from_pretrained steps exactly like an
    explicit ``"head"`` run, a model built from its config exactly like ``"all"``; the two choices give different
    rates, and the trajectory records the resolved choice."""
    from tiny_text import tiny_bert

    auto_pre = _trained(tmp_path, _pretrained(tmp_path))
    head = _trained(tmp_path, _pretrained(tmp_path), meta_parameters="head")
    auto_new = _trained(tmp_path, tiny_bert())
    whole = _trained(tmp_path, tiny_bert(), meta_parameters="all")
    assert auto_pre.lr_trajectory.config["meta_parameters"] == "head"
    assert auto_new.lr_trajectory.config["meta_parameters"] == "all"
    assert torch.equal(auto_pre.rates.instance, head.rates.instance)
    assert torch.equal(auto_new.rates.instance, whole.rates.instance)
    # same initial weights (tiny_bert is seeded; the pretrained copy is it): only the meta step's parameters differ
    assert not torch.allclose(head.rates.instance, whole.rates.instance, rtol=1e-3)
    assert (head.rates.instance != 1).sum() > 8  # the rates moved (a step's examples and its probes)
    # a pattern is taken as given
    pattern = _trained(tmp_path, _pretrained(tmp_path), meta_parameters=r"^classifier\.")
    assert pattern.lr_trajectory.config["meta_parameters"] == r"^classifier\."
    assert not torch.allclose(pattern.rates.instance, head.rates.instance, rtol=1e-3)


def test_auto_keeps_every_parameter_for_peft_models_and_token_level_tasks(tmp_path):
    from test_task_losses import COMMON, _collator, _data, _model

    from hf_ddlr import MetaLRConfig, MetaLRTrainer
    from hf_ddlr._meta_parameters import meta_parameters_choice

    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(_pretrained(tmp_path), peft.LoraConfig(r=2, target_modules=["query", "value"],
                                                                       task_type="SEQ_CLS"))
    assert meta_parameters_choice(_trainer(tmp_path, lora)) == "all"
    path = tmp_path / "lm"
    _model("causal_lm").save_pretrained(path)
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(path)
    args = MetaLRConfig(output_dir=str(tmp_path / "o"), **{**COMMON, "max_steps": 1})
    trainer = MetaLRTrainer(model=lm, args=args, train_dataset=_data("causal_lm", 24, seed=1),
                            meta_dataset=_data("causal_lm", 30, seed=2), data_collator=_collator("causal_lm"))
    assert meta_parameters_choice(trainer) == "all"


def test_bad_meta_parameters_are_refused_when_the_config_is_made(tmp_path):
    from hf_ddlr import MetaLRConfig

    with pytest.raises(ValueError, match=r"not one of \('auto', 'all', 'head'\) nor a valid regular expression"):
        MetaLRConfig(output_dir=str(tmp_path), meta_parameters="layer[", report_to=[])
    with pytest.raises(ValueError, match="meta_parameters must be"):
        MetaLRConfig(output_dir=str(tmp_path), meta_parameters="", report_to=[])


def test_resume_with_the_heads_meta_gradient_is_bit_exact(tmp_path):
    """A pretrained model's run (auto: the head) stopped at a checkpoint and resumed continues exactly like the
    straight run: the running average holds the head's entries only and is saved and restored with them."""
    straight = _trained(tmp_path / "a", _pretrained(tmp_path), max_steps=4, save_strategy="no",
                        meta_grad_average=0.5)
    assert set(straight._meta_grad_average.average) == {  # (and the classifier's class shares: instance_signal)
        "bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias",
        "<own class head>.weight", "<own class head>.bias"}
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, meta_grad_average=0.5)
    first = _trainer(tmp_path / "b", _pretrained(tmp_path), **kw)
    first.train()
    ckpt = tmp_path / "b" / "out" / "checkpoint-2"
    resumed = _trainer(tmp_path / "b", _pretrained(tmp_path), **kw)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert torch.equal(resumed.rates.instance, straight.rates.instance)
    for n, p in straight.model.named_parameters():
        assert torch.equal(p, dict(resumed.model.named_parameters())[n]), n
    # negative control: without the average's file the continuation is not exact (the check above can fail)
    (ckpt / "meta_grad_average.safetensors").unlink()
    with pytest.warns(UserWarning, match="meta_grad_average.safetensors is missing"):
        broken = _trainer(tmp_path / "b", _pretrained(tmp_path), **kw)
        broken.train(resume_from_checkpoint=str(ckpt))
    assert not torch.equal(broken.rates.instance, straight.rates.instance)


def _uncentred(tmp_path, model, **kw):
    """A run whose instance rates step on the whole, uncentred products (instance_signal="mean"): where they are
    centred on their label's median (the default with the other classes' share), the step relative to the typical
    classmate at the cap is the clamp's (the centred median is 0), and the two rules cannot be told apart."""
    return _trained(tmp_path, model, instance_signal="mean", **kw)


def test_auto_at_cap_is_relative_on_a_pretrained_models_head_and_clamped_otherwise(tmp_path):
    """``instance_rate_at_cap="auto"``: a fine-tune of a pretrained model (the head's meta-gradient) steps exactly
    like an explicit ``"relative"`` run and records it; a model built from its config, or every parameter of a
    pretrained one, like ``"clamp"``, recording nothing new; on the fine-tune the two rules give different rates
    (some examples leave the cap)."""
    from tiny_text import tiny_bert

    auto_pre = _uncentred(tmp_path, _pretrained(tmp_path))
    relative = _uncentred(tmp_path, _pretrained(tmp_path), instance_rate_at_cap="relative")
    clamp_pre = _uncentred(tmp_path, _pretrained(tmp_path), instance_rate_at_cap="clamp")
    auto_new = _uncentred(tmp_path, tiny_bert())
    clamp_new = _uncentred(tmp_path, tiny_bert(), instance_rate_at_cap="clamp")
    whole = _uncentred(tmp_path, _pretrained(tmp_path), meta_parameters="all")
    assert (auto_pre.rates.at_cap, auto_new.rates.at_cap, whole.rates.at_cap) == ("relative", "clamp", "clamp")
    assert auto_pre.lr_trajectory.config["instance_rate_at_cap"] == "relative"
    assert "instance_rate_at_cap" not in auto_new.lr_trajectory.config
    assert "instance_rate_at_cap" not in whole.lr_trajectory.config
    assert torch.equal(auto_pre.rates.instance, relative.rates.instance)
    assert torch.equal(auto_new.rates.instance, clamp_new.rates.instance)
    assert (relative.rates.instance < clamp_pre.rates.instance).any()


def test_auto_at_cap_is_relative_under_sgd_without_momentum(tmp_path):
    """``instance_rate_at_cap="auto"`` on a model trained from scratch: SGD without momentum steps exactly like an
    explicit ``"relative"`` run and records it, whether the Trainer builds the SGD from ``optim`` or is handed it
    (an optimizer, or its class and arguments); with momentum, or under AdamW, the rates are clamped."""
    from tiny_text import tiny_bert

    from hf_ddlr._meta_parameters import plain_sgd

    sgd = {"optim": "sgd", "learning_rate": 0.05}
    auto = _uncentred(tmp_path, tiny_bert(), **sgd)
    relative = _uncentred(tmp_path, tiny_bert(), instance_rate_at_cap="relative", **sgd)
    clamp = _uncentred(tmp_path, tiny_bert(), instance_rate_at_cap="clamp", **sgd)
    assert auto.rates.at_cap == "relative" and auto.lr_trajectory.config["instance_rate_at_cap"] == "relative"
    assert torch.equal(auto.rates.instance, relative.rates.instance)
    assert not torch.equal(auto.rates.instance, clamp.rates.instance)
    assert plain_sgd(auto)  # after training too, with the Trainer's optimizer wrapped by accelerate
    momentum = _uncentred(tmp_path, tiny_bert(), optim_args="momentum=0.9", **sgd)
    assert momentum.rates.at_cap == "clamp" and "instance_rate_at_cap" not in momentum.lr_trajectory.config
    assert not plain_sgd(momentum)

    def handed(optimizer=None, cls_and_kwargs=None):
        model = tiny_bert()
        opts = {"optimizers": (optimizer(model), None)} if optimizer else {"optimizer_cls_and_kwargs": cls_and_kwargs}
        return _trainer(tmp_path, model, trainer_kw=opts).rates.at_cap  # (args.optim: AdamW, not used)

    assert handed(lambda m: torch.optim.SGD(m.parameters(), lr=0.05)) == "relative"
    assert handed(lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)) == "clamp"
    assert handed(lambda m: torch.optim.Adam(m.parameters(), lr=1e-3)) == "clamp"
    assert handed(cls_and_kwargs=(torch.optim.SGD, {"lr": 0.05})) == "relative"
    assert handed(cls_and_kwargs=(torch.optim.SGD, {"lr": 0.05, "momentum": 0.5})) == "clamp"
