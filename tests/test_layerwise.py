"""Per-layer ("ghost") products: the same dots and gradients as forward mode / autograd, and the trainer path
that uses them (checked against forward mode, falls back when a model cannot be decomposed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from tiny import TinyMLP, make_split
from tiny_text import text_data_splits, tiny_bert
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, DataCollatorWithPadding, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

import hf_ddlr.meta.engine as engine
from hf_ddlr import MetaLRConfig, MetaLRTrainer
from hf_ddlr.meta import MicroBatch, per_example_loss, replay_rng
from hf_ddlr.meta.layerwise import LayerwiseCheck, LayerwiseUnsupported, record_layers, unsupported_reason
from hf_ddlr.schedules import SameStepFused

# transformers 5.23 renamed TrainingArguments.gradient_checkpointing (the old name a deprecated alias until v6)
CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in
                 {f.name for f in dataclasses.fields(TrainingArguments)} else "gradient_checkpointing")


def _bert(dropout: float = 0.1) -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=12, num_labels=3, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=0.0, pad_token_id=0)
    return BertForSequenceClassification(cfg).train()


def _batch(B: int = 6, S: int = 10):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    for i in range(B):  # padded rows of different lengths (the pad id's embedding row gets no gradient)
        n = 4 + i % 5
        ids[i, n:], mask[i, n:] = 0, 0
    ids[::2, 1] = 0  # the pad id inside attended text too: its embedding row still gets no gradient
    return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3, (B,), generator=g)


def _record(model, inputs, labels, seed=5):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with replay_rng(seed), record_layers(model, {id(p): n for n, p in params.items()}, labels.shape[0]) as tape:
        L = per_example_loss(model(**inputs).logits, labels)
    return params, tape, L


def _products_match_autograd(params, tape, L, k: int):
    """Runs the tape's backward; Σ c_i ∇L_i for random c, and example k's own gradient (one-hot c), equal
    autograd's. Returns c and the tape's weighted gradients."""
    c = torch.rand(L.shape[0]) + 0.1
    ref = torch.autograd.grad((c * L).sum(), list(params.values()), retain_graph=True)
    one = torch.autograd.grad(L[k], list(params.values()), retain_graph=True)
    tape.backward(L)
    got, got_one = tape.weighted_grads(c), tape.weighted_grads(torch.eye(L.shape[0])[k])
    assert set(got) == set(params)
    big = max(float(r.norm()) for r in ref)
    for n, r, r1 in zip(params, ref, one):
        torch.testing.assert_close(got[n], r, rtol=1e-4, atol=1e-6 * big, msg=n)
        torch.testing.assert_close(got_one[n], r1, rtol=1e-4, atol=1e-6 * big, msg=n)
    return c, got


def test_products_equal_autograd_per_example_and_forward_mode_on_bert():
    """BERT with dropout, padding and broadcast position embeddings: Σ c_i ∇L_i equals autograd for arbitrary c,
    a one-hot c gives one example's own gradient (so nothing leaks between examples), and T·∇L_i equals the
    forward-mode dots."""
    model = _bert()
    inputs, labels = _batch()
    params, tape, L = _record(model, inputs, labels)
    c, got = _products_match_autograd(params, tape, L, k=2)
    assert float(got["bert.embeddings.word_embeddings.weight"][0].abs().max()) == 0.0  # padding row
    T = {n: torch.randn_like(p) for n, p in params.items()}
    T["bert.embeddings.word_embeddings.weight"][0] = 0  # as in any tangent: the meta gradient is 0 there too
    dots = tape.dots(T)
    fwd = engine.jvp_dots(model, params, MicroBatch(inputs, labels, c, seed=5), T)
    torch.testing.assert_close(dots, fwd, rtol=1e-4, atol=1e-5 * float(fwd.abs().max()))


class _RMSNet(nn.Module):
    """Embedding → torch's nn.RMSNorm (default eps) → mean over positions → Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.norm, self.head = nn.Embedding(50, 16), nn.RMSNorm(16), nn.Linear(16, 3)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, input_ids, attention_mask):
        h = self.norm(self.emb(input_ids)) * attention_mask.unsqueeze(-1)
        return SequenceClassifierOutput(logits=self.head(h.sum(1) / attention_mask.sum(1, keepdim=True)))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                      resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.0)).train()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                         pad_token_id=0, rms_norm_eps=1e-5))
    with torch.no_grad():  # RMSNorm weights away from 1, so that a gradient taken as Σ g (no x̂) is wrong
        for m in model.modules():
            if type(m).__name__ == "LlamaRMSNorm":
                m.weight.uniform_(0.5, 1.5)
    return model.train()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "torch_rmsnorm"])
def test_products_equal_autograd_per_example_on_decoder_layers(kind):
    """A Llama-style decoder (LlamaRMSNorm, grouped-query attention, rotary positions, a completion-only masked
    token loss), GPT-2 (Conv1D layers, tied input/output embedding, dropout) and torch's nn.RMSNorm: the tape
    records every trainable layer, Σ c_i ∇L_i and one example's own gradient equal autograd's, and T·∇L_i
    equals forward mode."""
    from hf_ddlr.meta import task_loss

    inputs, labels = _batch()
    lm = kind in ("llama", "gpt2")
    task = task_loss("causal_lm") if lm else task_loss("single_label_classification")
    if lm:
        model = _llama() if kind == "llama" else _gpt2()
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        labels[:, :2] = -100  # a prompt: not a target
    else:
        model = _RMSNet()
    assert unsupported_reason(model) is None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with replay_rng(5), record_layers(model, {id(p): n for n, p in params.items()}, 6) as tape:
        L = task(model(**inputs).logits, labels)
    c, _ = _products_match_autograd(params, tape, L, k=3)
    T = {n: torch.randn_like(p) for n, p in params.items()}
    if kind == "llama":
        T["model.embed_tokens.weight"][0] = 0  # the padding row: the meta gradient is 0 there too
    dots = tape.dots(T)
    fwd = engine.jvp_dots(model, params, MicroBatch(inputs, labels, c, seed=5), T, task=task)
    torch.testing.assert_close(dots, fwd, rtol=1e-4, atol=1e-5 * float(fwd.abs().max()))


def test_rmsnorm_look_alikes_are_not_taken_for_rmsnorm():
    """A module named *RMSNorm with a bias, or a 2-D weight, is not decomposed (named in the reason)."""

    class BiasedRMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.bias, self.eps = nn.Parameter(torch.ones(4)), nn.Parameter(torch.zeros(4)), 1e-6

    class MatrixRMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.ones(2, 4)), 1e-6

    for cls in (BiasedRMSNorm, MatrixRMSNorm):
        assert f"'' ({cls.__name__}) holds trainable parameters" in unsupported_reason(cls())


def test_products_follow_the_loss_scale():
    model = _bert(dropout=0.0)
    inputs, labels = _batch()
    params, tape, L = _record(model, inputs, labels)
    ref = torch.autograd.grad(L.sum(), list(params.values()), retain_graph=True)
    tape.backward(L, scale=1024.0)
    got = tape.weighted_grads(torch.ones(6))
    for n, r in zip(params, ref):
        torch.testing.assert_close(got[n], r, rtol=1e-4, atol=1e-6, msg=n)


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 2, 3)


class _OwnParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 3)
        self.scale = nn.Parameter(torch.ones(3))


def test_unsupported_models_are_named():
    assert unsupported_reason(TinyMLP()) is None
    assert unsupported_reason(_bert()) is None
    assert "BatchNorm" in unsupported_reason(TinyMLP(bn=True))
    assert "'c' (Conv2d)" in unsupported_reason(_Conv())
    assert "'' (_OwnParam)" in unsupported_reason(_OwnParam())
    frozen = _OwnParam()
    frozen.scale.requires_grad_(False)
    assert unsupported_reason(frozen) is None  # only trainable parameters matter


class _InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.l1(x)
        h.mul_(2.0)  # the recorded output is no longer the layer's output
        return self.l2(torch.relu(h))


class _SeqFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):  # x: [B, 4] -> runs l1 on a [2, B, 4] sequence-first tensor
        return self.l2(self.l1(torch.stack([x, -x])).mean(0))


@pytest.mark.parametrize("model, match", [(_InPlace(), "modified in place"), (_SeqFirst(), "not the batch")])
def test_forwards_that_cannot_be_decomposed_are_refused_before_the_backward(model, match):
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with record_layers(model, {id(p): n for n, p in model.named_parameters()}, 5) as tape:
        L = per_example_loss(model(x), y)
    with pytest.raises(LayerwiseUnsupported, match=match):
        tape.backward(L)
    L.sum().backward()  # the graph is intact: the caller can fall back to a normal backward


# ---------------------------------------------------------------- the trainer path
COMMON = dict(report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, optim="sgd",
              learning_rate=0.5, lr_scheduler_type="constant", logging_steps=1, max_steps=4, meta_lr=0.2,
              class_rate_direction="average",  # one set of products per meta step: the counts below
              probe_batches=0)  # (the probes' forward-mode passes would add to them)


def _count_jvp(monkeypatch) -> list:
    calls = []
    orig = engine.jvp_dots

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(engine, "jvp_dots", spy)
    return calls


def _text_trainer(tmp_path, layerwise: bool, **kw) -> MetaLRTrainer:
    tok, train, meta = text_data_splits()
    model = tiny_bert()
    model.config.hidden_dropout_prob = 0.1  # dropout on the residual stream: the replayed masks must match
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.1 if m.p == 0.0 else m.p
    args = MetaLRConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, lr_level="both",
                        learn_weight_decay=True, weight_decay=0.01, layerwise_dots=layerwise, **{**COMMON, **kw})
    return MetaLRTrainer(model=model, args=args, train_dataset=train, meta_dataset=meta,
                         data_collator=DataCollatorWithPadding(tok), processing_class=tok)


def test_trainer_with_layerwise_products_trains_like_forward_mode(tmp_path, monkeypatch):
    calls = _count_jvp(monkeypatch)
    a = _text_trainer(tmp_path / "a", layerwise=True)
    a.train()
    n_a = len(calls)
    b = _text_trainer(tmp_path / "b", layerwise=False)
    b.train()
    assert a._layerwise == "verified"
    assert n_a == 1 and len(calls) - n_a == 4  # forward mode only for the first step's check
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)
    # (the instance rates step on their class's median-centred products divided by the batch's mean |step|: a
    # division by differences of nearly equal products, which scales the two passes' rounding, ~1e-7, to ~1e-4)
    torch.testing.assert_close(a.rates.instance, b.rates.instance, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(a.rates.per_class, b.rates.per_class, rtol=1e-4, atol=1e-6)
    assert a.rates.weight_decay == pytest.approx(b.rates.weight_decay, rel=1e-4)
    assert not torch.equal(a.rates.instance, torch.ones_like(a.rates.instance))
    la = [h["loss"] for h in a.state.log_history if "loss" in h]
    lb = [h["loss"] for h in b.state.log_history if "loss" in h]
    assert la == pytest.approx(lb, rel=1e-4)  # the logged loss is the weighted loss, not the surrogate's


def _mlp_trainer(model: nn.Module, out, **kw) -> MetaLRTrainer:
    """A trainer on the tiny tabular splits (32 train / 16 meta rows, batch 8) for MLP-like models."""
    args = MetaLRConfig(output_dir=str(out), per_device_train_batch_size=8, **{**COMMON, **kw})
    return MetaLRTrainer(model=model, args=args, train_dataset=make_split(32, seed=3), meta_dataset=make_split(16, seed=4))


class _HiddenThenHead(nn.Module):
    """TinyMLP (hidden 16) whose hidden features reach the logits through ``head`` (subclasses change how)."""

    def __init__(self):
        super().__init__()
        self.net = TinyMLP(hidden=16)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x, labels=None):
        return SequenceClassifierOutput(logits=self.head(F.relu(self.net.l1(x))))


class _TiedHead(_HiddenThenHead):
    """Linear layers only, but the head's weight is also used outside its module (as tied weights are)."""

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.net.l2(h) + 0.5 * F.linear(h, self.net.l2.weight)


@pytest.mark.parametrize("kind", ["tied", "batchnorm"])
def test_trainer_falls_back_to_forward_mode(tmp_path, monkeypatch, kind):
    """A weight used outside its layer passes the static check but fails the first step's check (a warning;
    that step keeps the reference values); BatchNorm is ruled out up front. Both train like forward mode."""
    calls = _count_jvp(monkeypatch)

    def run(layerwise, out):
        torch.manual_seed(0)
        t = _mlp_trainer(_TiedHead() if kind == "tied" else TinyMLP(bn=True), out, layerwise_dots=layerwise)
        t.train()
        return t

    if kind == "tied":
        with pytest.warns(UserWarning, match="uses forward mode for this model: the per-layer gradient"):
            a = run(True, tmp_path / "a")
    else:
        a = run(True, tmp_path / "a")
    assert a._layerwise == "off" and len(calls) == 4
    b = run(False, tmp_path / "b")
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=n)
    torch.testing.assert_close(a.rates.instance, b.rates.instance)


class _RepeatedLookup(nn.Module):
    """Dropout, then a batch-1 embedding lookup repeated per example (as PEFT's prompt tuning builds its virtual
    tokens): the per-layer recording's expansion of that lookup to the batch breaks the forward."""

    def __init__(self):
        super().__init__()
        self.net, self.drop, self.pos = TinyMLP(hidden=16), nn.Dropout(0.3), nn.Embedding(4, 6)

    def forward(self, x, labels=None):
        h = self.drop(x)  # (draws from the step's dropout stream before the lookup fails)
        p = self.pos(torch.arange(4)[None]).repeat(x.shape[0], 1, 1).mean(1)
        return SequenceClassifierOutput(logits=self.net.l2(F.relu(self.net.l1(h + p))))


@pytest.mark.parametrize("stream", ["run", "seeded"])
def test_a_forward_the_recording_breaks_runs_again_without_it(tmp_path, monkeypatch, stream):
    """The first step's forward fails on the expanded lookup: the run warns, takes forward mode, and trains
    exactly like a run that never recorded — the retried forward draws the same dropout masks. ``"seeded"``: where
    the random state is not captured (an accelerator other than CUDA), every forward runs from the step's seed."""
    if stream == "seeded":
        from hf_ddlr.meta.passes import RngState

        monkeypatch.setattr(RngState, "capture", classmethod(lambda cls: None))

    def run(layerwise, out):
        torch.manual_seed(0)
        t = _mlp_trainer(_RepeatedLookup(), out, layerwise_dots=layerwise, max_steps=3)
        t.train()
        return t

    with pytest.warns(UserWarning, match="batch-1 embedding output expanded to the batch"):
        a = run(True, tmp_path / "a")
    assert a._layerwise_check.state == "off"
    b = run(False, tmp_path / "b")
    assert not torch.equal(b.rates.instance, torch.ones_like(b.rates.instance))
    assert torch.equal(a.rates.instance, b.rates.instance)
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n


def test_a_models_own_error_is_not_taken_for_the_recordings():
    """An error in a forward the recording did not change (no batch-1 lookup was expanded) is the model's own:
    it propagates as it is."""
    model = TinyMLP()
    names = {id(p): n for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="the model's own"):
        with record_layers(model, names, 4):
            model(torch.randn(4, 6))
            raise ValueError("the model's own")


def test_dots_check_catches_examples_coupled_outside_batchnorm(tmp_path, monkeypatch):
    """Examples mixed by something other than BatchNorm (here: a batch mean subtracted from the features)
    give correct summed gradients but wrong per-example dots: the check on the first step catches it."""

    class Coupled(_HiddenThenHead):
        def head(self, h: torch.Tensor) -> torch.Tensor:
            return self.net.l2(h - h.mean(0, keepdim=True))

    torch.manual_seed(0)
    t = _mlp_trainer(Coupled(), tmp_path)
    with pytest.warns(UserWarning, match="per-layer dots vs forward mode"):
        t.train()
    assert t._layerwise == "off"


def test_gradient_accumulation_and_checkpointing_keep_forward_mode(tmp_path, monkeypatch):
    calls = _count_jvp(monkeypatch)
    t = _text_trainer(tmp_path, layerwise=True, gradient_accumulation_steps=2, max_steps=2)
    t.train()
    assert t._layerwise == "unchecked" and len(calls) == 4  # two micro-batches per step: forward mode
    t2 = _text_trainer(tmp_path / "gc", layerwise=True, max_steps=1, **{CHECKPOINTING: True})
    t2.train()
    assert t2._layerwise == "off"


@pytest.mark.parametrize("where", ["lookahead gradient", "meta loss"])
def test_an_overflowing_first_step_postpones_the_check(tmp_path, monkeypatch, where):
    """fp16 runs overflow in their first steps; such a step must neither pass nor fail the check (it would
    otherwise switch the fast path off for the whole run): the next finite step is checked instead."""
    calls = _count_jvp(monkeypatch)
    first = []
    if where == "lookahead gradient":
        orig = SameStepFused._lookahead_grad

        def patched(self, w, L):
            g = orig(self, w, L)
            if not first:
                first.append(1)
                g = {n: v + float("inf") for n, v in g.items()}
            return g

        monkeypatch.setattr(SameStepFused, "_lookahead_grad", patched)
    else:
        orig = engine.meta_loss_gradient

        def patched(*a, **k):
            lm, g = orig(*a, **k)
            if not first:
                first.append(1)
                lm = float("inf")
            return lm, g

        monkeypatch.setattr(engine, "meta_loss_gradient", patched)
    states = []
    t = _text_trainer(tmp_path, layerwise=True)
    orig_step = LayerwiseCheck.meta_step
    monkeypatch.setattr(LayerwiseCheck, "meta_step",
                        lambda self, *a, **k: (orig_step(self, *a, **k), states.append(t._layerwise))[0])
    t.train()
    assert states[:2] == ["unchecked", "verified"] and t._layerwise == "verified"
    skipped = sum(h.get("meta_skipped_steps", 0) for h in t.state.log_history)
    assert skipped == (1 if where == "meta loss" else 0)
    assert len(calls) == 2  # step 1: forward mode (as the reference path, or as the check), step 2: the check


def test_meta_gradients_from_a_tape_equal_forward_mode_and_the_check_reports_a_wrong_tape():
    from hf_ddlr.meta import MetaBatch, meta_gradients, param_specs

    model = _bert()
    inputs, labels = _batch()
    meta_inputs, meta_labels = _batch(B=4, S=8)
    params = {n: p for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    specs = param_specs(opt, params, [n for n in params if n.endswith("weight")], mode="sgd")
    w = torch.rand(6) + 0.5

    def run(tape=None, check=None, strategy="jvp", **kw):
        return meta_gradients(model, params, [MicroBatch(inputs, labels, w, seed=5)], MetaBatch(meta_inputs, meta_labels, 9),
                              specs, weight_decay=0.01, normalizer=6.0, strategy=strategy, layer_tape=tape,
                              check_layer_tape=check, **kw)

    ref = run()
    _, tape, L = _record(model, inputs, labels)
    tape.backward(L)
    got = run(tape, check=0.9999)
    assert got.layerwise_mismatch is None
    torch.testing.assert_close(got.example_grad, ref.example_grad, rtol=1e-4, atol=1e-6)
    assert got.weight_decay_grad == pytest.approx(ref.weight_decay_grad, rel=1e-5)
    tape.scale = 2.0  # a tape whose products are off by a factor: same direction, wrong norm
    bad = run(tape, check=0.9999)
    assert "norms" in bad.layerwise_mismatch
    torch.testing.assert_close(bad.example_grad, ref.example_grad, rtol=1e-4, atol=1e-6)  # the reference is kept
    # the per-step products of the class / group rates do not use a tape that failed its check either (a fresh
    # average is this step's meta gradient, so both sets equal the forward-mode reference)
    from hf_ddlr.meta.averaging import MetaGradientAverage

    bad = run(tape, check=0.9999, average=MetaGradientAverage(0.9), per_step_too=True)
    assert "norms" in bad.layerwise_mismatch
    torch.testing.assert_close(bad.example_grad, ref.example_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(bad.per_step_grad, ref.example_grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="layer tape gives the dots of meta_strategy='jvp'"):
        run(tape, strategy="finite_difference")


def _arch(name: str, vocab: int):
    from transformers import (
        AlbertConfig,
        AlbertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    torch.manual_seed(0)
    if name == "distilbert":  # learned positions looked up once ([1, S]) and broadcast over the batch
        return DistilBertForSequenceClassification(DistilBertConfig(
            vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=32,
            num_labels=2, pad_token_id=0))
    if name == "roberta":  # position ids computed per example from the padding
        return RobertaForSequenceClassification(RobertaConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=40, num_labels=2, pad_token_id=0))
    if name == "gpt2":  # Conv1D layers; the score of the last non-padding token
        from transformers import GPT2Config, GPT2ForSequenceClassification

        return GPT2ForSequenceClassification(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2,
                                                        n_positions=40, num_labels=2, pad_token_id=0))
    # ALBERT: one set of layer weights called once per layer (several recorded calls per parameter)
    return AlbertForSequenceClassification(AlbertConfig(
        vocab_size=vocab, embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=2, pad_token_id=0))


@pytest.mark.parametrize("name", ["distilbert", "roberta", "albert", "gpt2"])
def test_other_encoders_take_the_per_layer_products_and_train_like_forward_mode(tmp_path, name):
    tok, train, meta = text_data_splits()

    def run(layerwise):
        args = MetaLRConfig(output_dir=str(tmp_path / str(layerwise)), per_device_train_batch_size=8,
                            layerwise_dots=layerwise, **{**COMMON, "max_steps": 3})
        t = MetaLRTrainer(model=_arch(name, len(tok)), args=args, train_dataset=train, meta_dataset=meta,
                          data_collator=DataCollatorWithPadding(tok))
        t.train()
        return t

    a, b = run(True), run(False)
    assert a._layerwise == "verified"
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)
    torch.testing.assert_close(a.rates.instance, b.rates.instance, rtol=1e-4, atol=2e-4)  # (the centred step: above)


def test_meta_gradients_over_the_head_from_a_tape_equal_forward_mode_and_the_exact_strategy():
    """``meta_params`` on BERT (the head: pooler and classifier, found after the encoder's stack of blocks): the
    tape's products over the head, forward mode with tangents on the head only, and the double-backward exact
    strategy agree; and they differ from the whole model's (the restriction is not a no-op)."""
    from hf_ddlr.meta import MetaBatch, meta_gradients, param_specs
    from hf_ddlr.meta.parameters import head_parameter_names

    model = _bert(dropout=0.0)
    inputs, labels = _batch()
    meta_inputs, meta_labels = _batch(B=4, S=8)
    params = {n: p for n, p in model.named_parameters()}
    head = head_parameter_names(model, params)
    assert head == ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"]
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    specs = param_specs(opt, params, [n for n in params if n.endswith("weight")], mode="sgd")
    w = torch.rand(6) + 0.5

    def run(tape=None, strategy="jvp", **kw):
        return meta_gradients(model, params, [MicroBatch(inputs, labels, w, seed=5)], MetaBatch(meta_inputs, meta_labels, 9),
                              specs, weight_decay=0.01, normalizer=6.0, strategy=strategy, layer_tape=tape,
                              check_layer_tape=None, **kw)

    exact = run(strategy="exact", meta_params=head)
    fwd = run(meta_params=head)
    _, tape, L = _record(model, inputs, labels)
    tape.backward(L)
    taped = run(tape, meta_params=head)
    for got in (fwd, taped):
        torch.testing.assert_close(got.example_grad, exact.example_grad, rtol=1e-4, atol=1e-6)
        assert got.weight_decay_grad == pytest.approx(exact.weight_decay_grad, rel=1e-4)
        assert got.meta_loss == pytest.approx(exact.meta_loss, rel=1e-6)
    whole = run(tape)
    assert not torch.allclose(whole.example_grad, exact.example_grad, rtol=0.05)


class _Float64MLP(TinyMLP):
    """TinyMLP in float64 (its inputs cast on the way in: the collator gives float32)."""

    def forward(self, x, labels=None):
        return super().forward(x.double(), labels)


def test_a_float64_model_takes_the_per_layer_products(tmp_path):
    """The per-layer products are fp32; a float64 model's lookahead keeps float64 parameters (θ' was written into
    an fp32 scratch tensor and the meta forward failed on the dtype), and gives the forward-mode run's rates."""
    from hf_ddlr import MetaLRConfig, MetaLRTrainer

    def run(layerwise: bool):
        torch.manual_seed(0)
        model = _Float64MLP().double()
        args = MetaLRConfig(output_dir=str(tmp_path / str(layerwise)), report_to=[], use_cpu=True, save_strategy="no",
                            disable_tqdm=True, optim="sgd", learning_rate=0.3, per_device_train_batch_size=8,
                            max_steps=3, layerwise_dots=layerwise)
        t = MetaLRTrainer(model=model, args=args, train_dataset=make_split(32, seed=1), meta_dataset=make_split(8, seed=2))
        t.train()
        return t

    per_layer, forward = run(True), run(False)
    assert per_layer._layerwise == "verified" and all(p.dtype == torch.float64 for p in per_layer.model.parameters())
    assert not torch.equal(per_layer.rates.instance, torch.ones_like(per_layer.rates.instance))
    torch.testing.assert_close(per_layer.rates.instance, forward.rates.instance, rtol=1e-5, atol=1e-6)
