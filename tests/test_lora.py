"""PEFT / LoRA (issue 16, part 4): a ``peft`` LoRA model trains with MetaLRTrainer; only the adapter parameters
(and ``modules_to_save``, e.g. a classifier head) enter the lookahead, the tangent and the dots; the per-layer
products serve LoRA's layers (its ``lora_A`` / ``lora_B`` are plain ``nn.Linear``) and give the meta-gradients of
the exact double backward; at meta_lr=0 a LoRA run is the plain Trainer's LoRA run."""

from __future__ import annotations

import math

import pytest
import torch
from test_task_losses import COMMON, _collator, _data, _model
from tiny_text import text_data_splits, tiny_bert
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

import hf_ddlr.schedules as schedules
from hf_ddlr import MetaLRConfig, MetaLRTrainer

peft = pytest.importorskip("peft")

ADAPTED = {  # case -> (LoRA target modules, peft task type)
    "bert_cls": (["query", "value"], "SEQ_CLS"),
    "bert_regression": (["query", "value"], "SEQ_CLS"),
    "llama_lm": (["q_proj", "v_proj"], "CAUSAL_LM"),
}


def _lora(case: str, random_b: bool = False) -> torch.nn.Module:
    """The case's tiny model wrapped in LoRA r=4. ``random_b``: lora_B starts random instead of zero, so that
    lora_A has a gradient on the first step too (peft's ``init_lora_weights=False``)."""
    if case == "bert_cls":
        base = tiny_bert()
    else:
        base = _model("regression" if case == "bert_regression" else "causal_lm")
    targets, task_type = ADAPTED[case]
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task_type,
                          init_lora_weights=not random_b)
    return peft.get_peft_model(base, cfg)


def _trainer(case: str, out, model: torch.nn.Module | None = None, **kw) -> MetaLRTrainer:
    model = _lora(case) if model is None else model
    args = MetaLRConfig(output_dir=str(out), **{**COMMON, "max_steps": 3, **kw})
    if case == "bert_cls":
        tok, train, meta = text_data_splits()
        return MetaLRTrainer(model=model, args=args, train_dataset=train, meta_dataset=meta,
                             data_collator=DataCollatorWithPadding(tok), processing_class=tok)
    task = "regression" if case == "bert_regression" else "causal_lm"
    return MetaLRTrainer(model=model, args=args, train_dataset=_data(task, 24, seed=1),
                         meta_dataset=_data(task, 8, seed=2), data_collator=_collator(task))


def _adapter_names(model: torch.nn.Module) -> set[str]:
    """The parameters LoRA trains: the adapters' and those of ``modules_to_save``."""
    return {n for n, _ in model.named_parameters() if "lora_" in n or "modules_to_save" in n}


def _spy_meta_gradients(monkeypatch) -> list[tuple[set[str], set[str], set[str] | None]]:
    """Records, per meta step, the names of the parameters, of the lookahead specs and of a given lookahead
    gradient that :func:`hf_ddlr.schedules.meta_gradients` receives."""
    seen = []
    orig = schedules.meta_gradients

    def spy(model, params, window, meta, specs, **kw):
        grads = kw.get("grads")
        seen.append((set(params), set(specs), None if grads is None else set(grads)))
        return orig(model, params, window, meta, specs, **kw)

    monkeypatch.setattr(schedules, "meta_gradients", spy)
    return seen


@pytest.mark.parametrize("case", list(ADAPTED))
def test_lora_models_train_and_only_adapters_enter_the_meta_step(case, tmp_path, monkeypatch):
    """The rates move with finite losses on the per-layer path; every meta step sees exactly the adapter (and
    modules_to_save) parameters, none of the frozen base weights."""
    seen = _spy_meta_gradients(monkeypatch)
    t = _trainer(case, tmp_path)
    adapters = _adapter_names(t.model)
    trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trainable == adapters and any("lora_B" in n for n in adapters)
    assert ("modules_to_save" in " ".join(adapters)) == case.startswith("bert")  # the classifier head
    t.train()
    assert t._layerwise == "verified"  # LoRA's layers are nn.Linear: the per-layer products serve them
    assert not torch.equal(t.rates.instance, torch.ones_like(t.rates.instance))
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert len(seen) == 3
    for params, specs, grads in seen:
        assert params == adapters and specs == adapters
        assert grads is None or grads == adapters


@pytest.mark.parametrize("case", ["bert_cls", "llama_lm"])
def test_lora_meta_gradients_equal_the_exact_double_backward(case, tmp_path, monkeypatch):
    """The per-layer products (checked on step 1, used alone on steps 2-3) give the meta-gradients of
    meta_strategy='exact' at every step; lora_B starts random so that every adapter layer contributes."""
    runs = {}
    for strategy in ("jvp", "exact"):
        grads = []
        orig = schedules.meta_gradients

        def spy(*a, _orig=orig, _grads=grads, **kw):
            res = _orig(*a, **kw)
            _grads.append(res.example_grad.double())
            return res

        monkeypatch.setattr(schedules, "meta_gradients", spy)
        t = _trainer(case, tmp_path / strategy, model=_lora(case, random_b=True), meta_strategy=strategy,
                     rate_metric="optimizer",  # (exact's products: the two strategies compute the same quantity)
                     instance_signal="mean")  # (and exact's whole product)
        t.train()
        monkeypatch.setattr(schedules, "meta_gradients", orig)
        runs[strategy] = (t, grads)
    assert runs["jvp"][0]._layerwise == "verified"
    assert runs["exact"][0]._layerwise == "unchecked"  # exact never records a tape
    for step, (a, b) in enumerate(zip(runs["jvp"][1], runs["exact"][1], strict=True)):
        cos = float(a @ b) / float(a.norm() * b.norm())
        assert cos >= 0.9999, (step, cos)
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()), msg=f"step {step}")


@pytest.mark.parametrize("case", ["bert_regression", "llama_lm"])
def test_lora_at_meta_lr_zero_equals_the_plain_trainers_lora_run(case, tmp_path):
    """Rates that stay 1: the adapters (and every frozen weight) end where the plain Trainer's LoRA run ends."""
    task = "regression" if case == "bert_regression" else "causal_lm"
    plain, meta = _lora(case), _lora(case)
    args = TrainingArguments(output_dir=str(tmp_path / "plain"), **{**COMMON, "max_steps": 3})
    Trainer(model=plain, args=args, train_dataset=_data(task, 24, seed=1), data_collator=_collator(task)).train()
    zero = _trainer(case, tmp_path / "zero", model=meta, meta_lr=0.0)
    zero.train()
    assert torch.equal(zero.rates.instance, torch.ones(24))
    moved = 0
    for (n, a), (_, b) in zip(plain.state_dict().items(), meta.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)
        moved += "lora_" in n and not torch.equal(a, _lora(case).state_dict()[n])
    assert moved > 0  # the adapters did train


# ------------------------------------------------------------------ other PEFT methods
def _peft_bert(config, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(1)
    return peft.get_peft_model(tiny_bert(dropout), config)


def _bert_peft_trainer(model, out, trainer_cls=MetaLRTrainer, **kw):
    tok, train, meta = text_data_splits()
    if trainer_cls is MetaLRTrainer:
        args = MetaLRConfig(output_dir=str(out), **{**COMMON, "max_steps": 4, **kw})
        return MetaLRTrainer(model=model, args=args, train_dataset=train, meta_dataset=meta,
                             data_collator=DataCollatorWithPadding(tok), processing_class=tok)
    args = TrainingArguments(output_dir=str(out), **{**COMMON, "max_steps": 4, **kw})
    return trainer_cls(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tok),
                       processing_class=tok)


def _prompt_tuning() -> peft.PromptTuningConfig:
    return peft.PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS")


def test_prompt_tuning_trains_like_a_run_without_the_per_layer_recording(tmp_path):
    """PEFT's prompt tuning repeats its batch-1 prompt lookup per example, which the per-layer recording's batch
    expansion breaks: the run warns, takes forward mode, the rates move, and it trains exactly like a run with
    ``layerwise_dots=False`` (hidden dropout on: the same masks); at meta_lr=0 (no dropout) the virtual tokens
    and the head train as under the plain Trainer."""
    with pytest.warns(UserWarning, match="batch-1 embedding output expanded"):
        t = _bert_peft_trainer(_peft_bert(_prompt_tuning(), 0.1), tmp_path / "meta")
        t.train()
    assert t._layerwise_check.state == "off"
    assert torch.isfinite(t.rates.instance).all() and not torch.equal(t.rates.instance, torch.ones_like(t.rates.instance))
    off = _bert_peft_trainer(_peft_bert(_prompt_tuning(), 0.1), tmp_path / "off", layerwise_dots=False)
    off.train()
    assert torch.equal(t.rates.instance, off.rates.instance)
    for (n, a), (_, b) in zip(t.model.named_parameters(), off.model.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    plain, zero = _peft_bert(_prompt_tuning()), _peft_bert(_prompt_tuning())
    start = {n: p.detach().clone() for n, p in plain.named_parameters() if p.requires_grad}
    _bert_peft_trainer(plain, tmp_path / "plain", Trainer).train()
    _bert_peft_trainer(zero, tmp_path / "zero", meta_lr=0.0).train()
    for (n, a), (_, b) in zip(plain.named_parameters(), zero.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)
    assert all(not torch.equal(p, start[n]) for n, p in plain.named_parameters() if n in start)  # they trained


def test_an_adapter_without_forward_mode_takes_the_finite_difference(tmp_path):
    """PEFT's LoHa computes its weight in a custom autograd.Function without ``jvp``: forward mode fails on it.
    The first meta step sees that before changing anything, warns and takes ``meta_strategy="finite_difference"``
    for the run: the same rates, to rounding, as a run set to it from the start."""
    def loha():
        return peft.LoHaConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")

    with pytest.warns(UserWarning, match="needs forward-mode AD"):
        t = _bert_peft_trainer(_peft_bert(loha()), tmp_path / "jvp")
        t.train()
    assert t._schedule.strategy == "finite_difference"
    fd = _bert_peft_trainer(_peft_bert(loha()), tmp_path / "fd", meta_strategy="finite_difference")
    fd.train()
    assert not torch.equal(t.rates.instance, torch.ones_like(t.rates.instance))
    torch.testing.assert_close(t.rates.instance, fd.rates.instance, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="meta_strategy='exact'"):  # where the finite difference cannot serve
        _bert_peft_trainer(_peft_bert(loha()), tmp_path / "bf16", bf16=True).train()


def test_prompt_tuning_a_causal_lm_weights_the_models_own_token_losses(tmp_path):
    """A prompt-tuned causal LM returns logits for its virtual tokens too (4 positions more than the labels): the
    trainer aligns the labels as PEFT's forward does (ignored labels in front), so the token losses it weights
    average to the model's own loss — on a batch whose first label is a target, which that alignment lets the
    last virtual token predict. The rates move and stay finite."""
    from hf_ddlr._batches import to_microbatch

    torch.manual_seed(0)
    model = peft.get_peft_model(_model("causal_lm"), peft.PromptTuningConfig(num_virtual_tokens=4,
                                                                             task_type="CAUSAL_LM"))
    t = _trainer("llama_lm", tmp_path, model=model, max_steps=2)
    t.train()
    assert torch.isfinite(t.rates.instance).all() and not torch.equal(t.rates.instance, torch.ones(24))
    raw = _collator("causal_lm")([{**t.train_dataset[i], "sample_index": i} for i in range(6)])
    raw["labels"][::2, 0] = raw["input_ids"][::2, 0]  # the first token a target in half of the rows
    mb = to_microbatch(t, raw, 0)
    t.model.eval()
    with torch.no_grad():
        own = t.model(**mb.inputs, labels=raw["labels"]).loss
        logits = t.model(**mb.inputs).logits
        assert logits.shape[1] == raw["labels"].shape[1] + 4
        ours = t._task.mean(t._task(logits, mb.labels), mb.labels)
    torch.testing.assert_close(ours, own, rtol=1e-6, atol=0)


@pytest.mark.parametrize("orth_reg_weight", [0.5, 0.0])
def test_adalora_says_its_orthogonal_regularisation_is_not_weighted(orth_reg_weight, tmp_path, caplog):
    """AdaLoRA adds its orthogonal regularisation inside its forward, to a loss from labels only: the trainer,
    which weights the per-example losses from the logits, says the run trains without it (unless it is 0)."""
    cfg = peft.AdaLoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", total_step=4,
                             orth_reg_weight=orth_reg_weight)
    with caplog.at_level("WARNING"):
        _bert_peft_trainer(_peft_bert(cfg), tmp_path)
    said = [r for r in caplog.records if "orthogonal regularisation" in r.getMessage()]
    assert len(said) == (1 if orth_reg_weight else 0)


@pytest.mark.parametrize("method", ["dora", "ia3", "vera", "prefix"])
def test_other_peft_methods_train_with_rates(method, tmp_path):
    """DoRA, IA³ and VeRA on the tiny BERT classifier, prefix tuning on the tiny Llama causal LM: the rates move
    and stay finite, only the method's trainable parameters change, and no warning says a fallback was taken."""
    import warnings

    configs = {
        "dora": lambda: peft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", use_dora=True),
        "ia3": lambda: peft.IA3Config(target_modules=["key", "value", "intermediate.dense"],
                                      feedforward_modules=["intermediate.dense"], task_type="SEQ_CLS"),
        "vera": lambda: peft.VeraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
        "prefix": lambda: peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    }
    torch.manual_seed(1)
    base = _model("causal_lm") if method == "prefix" else tiny_bert()
    model = peft.get_peft_model(base, configs[method]())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if method == "prefix":
            t = _trainer("llama_lm", tmp_path, model=model)
        else:
            t = _bert_peft_trainer(model, tmp_path)
        t.train()
    assert torch.isfinite(t.rates.instance).all() and not torch.equal(t.rates.instance, torch.ones_like(t.rates.instance))
    assert all(torch.equal(p, frozen[n]) for n, p in t.model.named_parameters() if n in frozen)
    assert not [w for w in seen if "hf_ddlr" in w.filename], [str(w.message) for w in seen if "hf_ddlr" in w.filename]
