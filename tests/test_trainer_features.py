"""MetaLRTrainer features around the meta step: unsupported parallelism refused at start-up, gradient
accumulation, mixed precision (bf16 autocast, fp16 loss scaling), exact resume, logging, text models."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from unittest import mock

import pytest
import safetensors.torch
import torch
from ddp_worker import run, state_of
from tiny import TinyMLP, make_split
from tiny_text import text_data_splits, tiny_bert
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback

import hf_ddlr.meta.engine as engine
import hf_ddlr.schedules as schedules
from hf_ddlr import MetaLRConfig, MetaLRTrainer
from hf_ddlr.meta.passes import is_compiled
from hf_ddlr.meta.primal_reuse import record_outputs
from hf_ddlr.trainer import META_STATE_NAME
from hf_ddlr.trajectory import LRTrajectory

COMMON = dict(report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)


def _args(tmp_path, **kw):
    return MetaLRConfig(output_dir=str(tmp_path), **{**COMMON, **kw})


def _assert_states(a: dict, b: dict, exact: bool, rtol=1e-5, atol=1e-6):
    assert set(a) == set(b)
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


@pytest.fixture(scope="module")
def text_data():
    return text_data_splits()


def _bert_trainer(tmp_path, text_data, dropout: float = 0.0, **kw) -> MetaLRTrainer:
    tok, train, meta = text_data
    args = _args(
        tmp_path,
        **{
            **dict(
                optim="sgd",
                learning_rate=0.5,
                lr_scheduler_type="constant",
                max_steps=3,
                logging_steps=1,
                meta_lr=0.2,
            ),
            **kw,
        },
    )
    return MetaLRTrainer(
        model=tiny_bert(dropout),
        args=args,
        train_dataset=train,
        meta_dataset=meta,
        data_collator=DataCollatorWithPadding(tok),
        processing_class=tok,
    )


# ---------------------------------------------------------------- start-up refusal
@pytest.mark.parametrize("what", ["fsdp", "deepspeed", "dataparallel"])
def test_unsupported_parallelism_is_refused_at_start_up(tmp_path, monkeypatch, what):
    """FSDP / DeepSpeed / DataParallel cannot be started on this CPU machine, so the flags the Trainer sets for
    them are forced right where it sets them; the check must name what is and is not supported."""
    orig = Trainer.create_accelerator_and_postprocess

    def forced(self):
        orig(self)
        if what == "fsdp":
            self.is_fsdp_enabled = True
        elif what == "deepspeed":
            self.is_deepspeed_enabled = True
        else:
            self.args._n_gpu = 2

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", forced)
    name = {"fsdp": "FSDP", "deepspeed": "DeepSpeed", "dataparallel": "DataParallel over 2 GPUs"}[what]
    with pytest.raises(
        ValueError,
        match=rf"does not support .*{name}.*Supported: a single process.*"
        r"DistributedDataParallel.*torchrun.*accelerate launch --multi_gpu",
    ):
        MetaLRTrainer(
            model=TinyMLP(),
            args=_args(tmp_path),
            train_dataset=make_split(16, seed=1),
            meta_dataset=make_split(8, seed=2),
        )
    # without a meta set it is a plain Trainer and leaves the choice to the Trainer
    MetaLRTrainer(model=TinyMLP(), args=_args(tmp_path), train_dataset=make_split(16, seed=1))


# ---------------------------------------------------------------- gradient accumulation
def test_ga2_equals_ga1_with_double_batch(tmp_path):
    """One meta step per optimizer step over the whole window: GA=2 x b == GA=1 x 2b (params, rates, trajectory).
    The default-like meta batch is the whole meta set in both, so the meta gradients coincide."""
    ga2 = run(str(tmp_path / "ga2"), per_device_batch=4, ga=2)
    ga1 = run(str(tmp_path / "ga1"), per_device_batch=8)
    assert ga2.seen_rows == ga1.seen_rows  # the same examples in every window
    assert not torch.equal(ga1.rates.instance, torch.ones_like(ga1.rates.instance))
    a, b = state_of(ga2), state_of(ga1)
    for k in [
        k for k in a if k.startswith("traj.") and "epoch" in k
    ]:  # epochs are float bookkeeping of the loop
        torch.testing.assert_close(a.pop(k), b.pop(k))
    _assert_states(a, b, exact=False)
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert losses(ga2) == pytest.approx(losses(ga1), rel=1e-5)


def test_bert_with_ga_is_not_hit_by_the_loss_scaling_trap(tmp_path, text_data):
    """BertForSequenceClassification.forward takes **kwargs, so a plain Trainer skips the /GA division (2x
    gradients with GA=2, see reference §1.2). MetaLRTrainer must give GA=2 x 4 == GA=1 x 8."""
    ga2 = _bert_trainer(
        tmp_path / "ga2", text_data, per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    ga1 = _bert_trainer(tmp_path / "ga1", text_data, per_device_train_batch_size=8)
    assert ga2.model_accepts_loss_kwargs  # the trap's precondition is there
    ga2.train()
    ga1.train()
    for (n, p), (_, q) in zip(ga2.model.named_parameters(), ga1.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
    torch.testing.assert_close(ga2.rates.instance, ga1.rates.instance, rtol=1e-4, atol=1e-5)
    l2 = [h["loss"] for h in ga2.state.log_history if "loss" in h]
    l1 = [h["loss"] for h in ga1.state.log_history if "loss" in h]
    assert l2 == pytest.approx(l1, rel=1e-4) and max(l1) < 1.0  # a cross-entropy of 2 classes, not 2x it


# ---------------------------------------------------------------- torch_compile
# how a user compiles: the Trainer's flag, or accelerate's dynamo backend (`accelerate config`, which `accelerate
# launch` passes on as environment variables), whole model or its repeated blocks (regional compilation)
COMPILE_WAYS = {
    "torch_compile": ({"torch_compile": True}, {}),
    "accelerate": ({}, {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}),
    "accelerate_regional": ({}, {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR",
                                 "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "true"}),
}


@pytest.mark.parametrize("way, dropout", [("torch_compile", 0.0), ("torch_compile", 0.1), ("accelerate", 0.1),
                                          ("accelerate_regional", 0.1)])
def test_torch_compile_trains_as_eager_does(tmp_path, text_data, recwarn, monkeypatch, way, dropout):
    """A compiled run (``torch_compile=True`` or accelerate's dynamo backend): the real forward and backward run
    compiled, and the meta step still differentiates that graph twice (the lookahead gradient, then the real
    backward), which a compiled backward donating its buffers refuses. The per-layer products cannot read
    values inside the compiled graph, so the dots come from forward mode, said once in the log, not in a
    warning; that pass replays the real forward's dropout masks, which the compiled graph must draw as eager
    code does. The run matches the eager one (which takes the dots from the per-layer products) step for step."""
    torch._dynamo.reset()  # compile afresh: nothing cached from another test's model
    eager = _bert_trainer(tmp_path / "eager", text_data, dropout, per_device_train_batch_size=8)
    eager.train()
    args, env = COMPILE_WAYS[way]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    compiled = _bert_trainer(tmp_path / "compiled", text_data, dropout, per_device_train_batch_size=8, **args)
    recorded = []  # hooks that would record the layers' outputs inside the compiled graph

    def spy(model):
        recorded.append(model)
        return record_outputs(model)

    with mock.patch.object(schedules, "record_outputs", spy):
        compiled.train()
    assert not recorded
    assert is_compiled(compiled.model_wrapped) and not is_compiled(eager.model_wrapped)
    assert eager._layerwise_check.state == "verified" and compiled._layerwise_check.state == "off"
    assert not [w for w in recwarn if "hf_ddlr" in w.filename], [str(w.message) for w in recwarn]
    assert not torch.equal(compiled.rates.instance, torch.ones_like(compiled.rates.instance))
    # compiled kernels round differently, and a rate that has moved far carries that rounding: up to 2.4e-4 on
    # an example down to 0.13 here (the real forwards draw the Trainer's masks), against 0.13 and 1e-2 in the
    # weights when the meta step's passes replay other masks than the compiled forward drew
    torch.testing.assert_close(compiled.rates.instance, eager.rates.instance, rtol=0, atol=1e-3)
    for (n, p), (_, q) in zip(compiled.model.named_parameters(), eager.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=5e-5, msg=n)


def test_is_compiled_sees_every_way_of_compiling():
    m = TinyMLP()
    assert not is_compiled(m) and not is_compiled(torch.nn.Sequential(m))
    assert is_compiled(torch.compile(m))
    wrapper = torch.nn.Module()
    wrapper.module = torch.compile(TinyMLP())  # DDP holds the model as .module
    assert is_compiled(wrapper)
    in_place = TinyMLP()
    in_place.compile()
    assert is_compiled(in_place)
    regions = TinyMLP()  # blocks compiled one by one (regional compilation), in place or replaced
    regions.l1.compile()
    assert is_compiled(regions)
    regions = TinyMLP()
    regions.l2 = torch.compile(regions.l2)
    assert is_compiled(regions)


# ---------------------------------------------------------------- Trainer features around the step
def _tiny_run(tmp_path, **kw) -> MetaLRTrainer:
    torch.manual_seed(0)
    args = _args(tmp_path, **{**dict(per_device_train_batch_size=8, learning_rate=0.1, optim="sgd",
                                     num_train_epochs=2, logging_steps=1), **kw})
    t = MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=make_split(64, 1, noise=0.2),
                      meta_dataset=make_split(16, 2), eval_dataset=make_split(16, 3))
    t.train()
    return t


@pytest.mark.parametrize("feature", [
    dict(include_num_input_tokens_seen=True),
    dict(eval_on_start=True, eval_strategy="epoch"),
    dict(torch_empty_cache_steps=2),
    dict(dataloader_num_workers=2),
    dict(eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3, save_only_model=True),
], ids=lambda f: next(iter(f)))
def test_trainer_features_around_the_step_leave_the_run_unchanged(tmp_path, feature):
    """Features that act around the optimizer step (token counting, evaluation, cache clearing, loader worker
    processes, model-only checkpoints) neither break the meta step nor change what it learns."""
    base = _tiny_run(tmp_path / "base", meta_batch_size=4)  # meta batches drawn: from the run's own seed
    with_it = _tiny_run(tmp_path / "with", meta_batch_size=4, **feature)
    assert with_it.state.global_step == base.state.global_step == 16
    assert not torch.equal(base.rates.instance, torch.ones_like(base.rates.instance))
    assert torch.equal(with_it.rates.instance, base.rates.instance)
    for (n, p), (_, q) in zip(with_it.model.named_parameters(), base.model.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("optim", ["rmsprop", "adagrad", "adafactor"])
def test_the_trainers_preconditioned_optimizers_get_the_optimizer_aware_lookahead(tmp_path, optim, recwarn):
    """``optim="rmsprop"`` / ``"adagrad"`` / ``"adafactor"`` (transformers' Adafactor): the lookahead follows them
    (no fallback to the paper's plain-SGD lookahead, which warns), and the products are taken in their own
    metric, not Adam's added on top."""
    t = _tiny_run(tmp_path, optim=optim, learning_rate=0.01)
    assert not [w for w in recwarn if "lookahead" in str(w.message)], [str(w.message) for w in recwarn]
    assert t._rate_metric is not None and t._rate_metric.second_moment == {}  # nothing to divide by twice
    assert not torch.equal(t.rates.instance, torch.ones_like(t.rates.instance))


def test_a_scheduler_stepped_on_evaluation_is_what_the_trajectory_records(tmp_path):
    """``reduce_lr_on_plateau`` changes the learning rate at evaluations, not on a schedule known in advance: the
    trajectory (which a replay applies) records the rate each step was taken with."""
    seen = []

    class Seen(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kw):
            seen.append(optimizer.param_groups[0]["lr"])

    torch.manual_seed(0)
    args = _args(tmp_path, per_device_train_batch_size=8, learning_rate=0.1, optim="sgd", num_train_epochs=3,
                 lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="epoch",
                 lr_scheduler_kwargs={"patience": 0, "factor": 0.1, "threshold": 10.0})  # no eval loss improves
    t = MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=make_split(64, 1, noise=0.2),
                      meta_dataset=make_split(16, 2), eval_dataset=make_split(16, 3), callbacks=[Seen()])
    t.train()
    assert len(seen) == 24 and sorted(set(seen), reverse=True) == pytest.approx([0.1, 0.01, 0.001])
    assert [float(x) for x in t.lr_trajectory.learning_rate] == pytest.approx(seen)


def test_neftune_noise_reaches_the_training_passes_and_not_the_meta_loss(tmp_path, text_data):
    """NEFTune adds noise to the input embeddings of training forwards. The real step and the lookahead taken
    from its graph train on the noisy embeddings, as a plain step does; the meta loss is a held-out loss and is
    evaluated without it (``meta_dropout=False``: every train-only randomness off)."""
    t = _bert_trainer(tmp_path, text_data, per_device_train_batch_size=8, meta_batch_size=16, probe_batches=0,
                      neftune_noise_alpha=5.0, layerwise_dots=False)
    calls = []
    t.model.get_input_embeddings().register_forward_hook(
        lambda m, inp, out: calls.append((m.training, out.shape[0], getattr(m, "neftune_noise_alpha", None))))
    t.train()
    noisy = {rows for training, rows, alpha in calls if training}
    clean = {rows for training, rows, alpha in calls if not training and alpha == 5.0}
    assert all(alpha == 5.0 for training, _, alpha in calls if training)
    assert noisy == {8} and clean == {16}  # training micro-batches of 8 with noise; the meta batch of 16 without


@pytest.mark.parametrize("strategy", ["sequential", "group_by_length"])
def test_train_sampling_strategies_key_each_rate_to_its_row(tmp_path, text_data, strategy):
    """The sampler decides which rows a step trains on; the rates that move are those rows' (the index column
    travels with the rows, whatever their order)."""
    moved = []

    class Moved(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            moved.append(set(torch.nonzero(t.rates.instance != 1).flatten().tolist()))

    t = _bert_trainer(tmp_path, text_data, per_device_train_batch_size=8, max_steps=1, probe_batches=0,
                      max_instance_rate=None, train_sampling_strategy=strategy,
                      instance_signal="mean")  # (uncentred: every row of the step moves)
    t.add_callback(Moved())
    t.train()
    assert len(moved) == 1 and len(moved[0]) == 8
    if strategy == "sequential":
        assert moved[0] == set(range(8))
    else:  # a length-grouped epoch starts with the longest sentence
        lengths = [len(ids) for ids in t.train_dataset["input_ids"]]
        assert lengths.index(max(lengths)) in moved[0] and moved[0] != set(range(8))


# ---------------------------------------------------------------- text model, SDPA without forward-mode AD
def test_bert_with_padding_trains_and_sdpa_is_routed_to_math(tmp_path, text_data, monkeypatch):
    t = _bert_trainer(tmp_path / "a", text_data, per_device_train_batch_size=8, lr_level="both")
    assert t.model.config._attn_implementation == "sdpa" and t.model.config.attention_probs_dropout_prob == 0
    t.train()
    assert t.last_meta_gradients.finite
    assert not torch.equal(t.rates.instance, torch.ones(32)) and bool(torch.isfinite(t.rates.instance).all())
    assert all(h.get("meta_loss") is not None for h in t.state.log_history if "loss" in h)
    assert t._schedule.strategy == "jvp"
    # negative control: without the math-kernel routing the CPU flash kernel has no forward-mode AD rule, and the
    # run would leave forward mode for the finite difference (with a warning naming the kernel)
    monkeypatch.setattr(engine, "forward_ad_safe_attention", contextlib.nullcontext)
    t2 = _bert_trainer(tmp_path / "b", text_data, per_device_train_batch_size=8, max_steps=1)
    with pytest.warns(UserWarning, match="needs forward-mode AD.*forward AD"):
        t2.train()
    assert t2._schedule.strategy == "finite_difference" and t2.last_meta_gradients.finite


# ---------------------------------------------------------------- mixed precision
def _one_step(tmp_path, model, bf16: bool, **kw) -> MetaLRTrainer:
    dtypes = []
    t = MetaLRTrainer(
        model=model,
        args=_args(
            tmp_path,
            bf16=bf16,
            optim="sgd",
            learning_rate=0.3,
            max_steps=1,
            per_device_train_batch_size=16,
            weight_decay=0.01,
            learn_weight_decay=True,
            **kw,
        ),
        train_dataset=make_split(32, seed=3),
        meta_dataset=make_split(16, seed=4),
    )
    orig = engine.meta_loss_gradient

    def spy(model, *a, **k):  # which dtype do the meta passes compute in?
        h = model.l2.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        try:
            return orig(model, *a, **k)
        finally:
            h.remove()

    with mock.patch.object(engine, "meta_loss_gradient", spy):
        t.train()
    t.meta_pass_dtypes = dtypes
    return t


@pytest.mark.parametrize(("metric", "min_cos"), [("optimizer", 0.999), ("adam", 0.99)])
def test_bf16_meta_gradients_match_fp32(tmp_path, metric, min_cos):
    """bf16=True on CPU: accelerate wraps model.forward in autocast, and functional_call inherits it. The
    meta-gradients of one step from the same weights are within cosine 0.999 of the fp32 ones. In Adam's metric
    (the default under SGD) the first step divides every coordinate by its own gradient's size, as Adam's first
    step does, so the coordinates with tiny gradients — where bf16's relative error is largest — weigh as much as
    the others: within 0.99 there."""
    torch.manual_seed(0)
    m = TinyMLP(hidden=64)
    fp32 = _one_step(tmp_path / "fp32", copy.deepcopy(m), bf16=False, rate_metric=metric)
    bf16 = _one_step(tmp_path / "bf16", copy.deepcopy(m), bf16=True, rate_metric=metric)
    assert fp32.meta_pass_dtypes == [torch.float32]
    assert bf16.meta_pass_dtypes == [torch.bfloat16]  # autocast really reached the functional meta pass
    g32, g16 = fp32.last_meta_gradients, bf16.last_meta_gradients
    assert g16.finite
    cos = _cos(g32.example_grad, g16.example_grad)
    assert cos > min_cos, cos
    assert g16.meta_loss == pytest.approx(g32.meta_loss, rel=1e-2)
    assert g16.weight_decay_grad == pytest.approx(g32.weight_decay_grad, rel=0.05)


def _tiny_sgd_trainer(tmp_path, n_train: int, **kw) -> MetaLRTrainer:
    """MetaLR with SGD, batch 8, on TinyMLP (hidden 12, seed 0); ``n_train`` train rows (seed 11), 8 meta."""
    torch.manual_seed(0)
    return MetaLRTrainer(
        model=TinyMLP(hidden=12),
        args=_args(tmp_path, optim="sgd", per_device_train_batch_size=8, **kw),
        train_dataset=make_split(n_train, seed=11),
        meta_dataset=make_split(8, seed=12),
    )


def _scaled_run(tmp_path, scaler, steps=4):
    seen = []
    orig = schedules.meta_gradients

    def spy(*a, **k):
        seen.append(k["loss_scale"])
        return orig(*a, **k)

    t = _tiny_sgd_trainer(
        tmp_path, 32, learning_rate=0.3, lr_scheduler_type="constant", max_steps=steps, logging_steps=1,
        lr_level="both", weight_decay=0.01, learn_weight_decay=True,
        max_grad_norm=0.0,  # (clipping unscales only under native fp16 AMP)
    )
    if scaler is not None:  # what fp16 on a GPU gives (accelerate ignores fp16 on CPU); set before prepare()
        t.accelerator.scaler = scaler
    with mock.patch.object(schedules, "meta_gradients", spy):
        t.train()
    t.seen_loss_scales = seen
    return t


def test_fp16_loss_scale_is_applied_and_undone(tmp_path):
    """With a GradScaler (scale 2^10) the real step runs on a scaled loss and the meta passes on losses scaled by
    the same factor; both are unscaled, so parameters and rates equal an unscaled run."""
    plain = _scaled_run(tmp_path / "a", None)
    scaled = _scaled_run(
        tmp_path / "b", torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6)
    )
    assert plain.seen_loss_scales == [1.0] * 4
    assert scaled.seen_loss_scales == [1024.0] * 4
    _assert_states(state_of(scaled), state_of(plain), exact=False)
    assert not torch.equal(plain.rates.instance, torch.ones(32))


def test_overflowing_meta_step_is_skipped_without_touching_rates(tmp_path):
    """An fp16 overflow (here: an infinite loss scale) makes the meta-gradient non-finite: the step is skipped,
    the rates stay, the skip is logged, and the GradScaler skips the real step too."""
    torch.manual_seed(0)
    start = [p.detach().clone() for p in TinyMLP(hidden=12).parameters()]
    t = _scaled_run(
        tmp_path, torch.amp.GradScaler("cpu", init_scale=float("inf"), growth_interval=10**6), steps=3
    )
    assert torch.equal(t.rates.instance, torch.ones(32)) and torch.equal(t.rates.per_class, torch.ones(3))
    assert t.rates.weight_decay == 0.01
    assert sum(h.get("meta_skipped_steps", 0) for h in t.state.log_history) == 3
    assert all(torch.equal(a, b) for a, b in zip(start, t.model.parameters()))


# ---------------------------------------------------------------- checkpoints and exact resume
def _only_checkpoint_without(out: str, checkpoint: str, name: str) -> None:
    """Delete file ``name`` from ``out/checkpoint`` and everything else under ``out``, so that a resume starts
    from that checkpoint as if the file had never been written."""
    os.remove(os.path.join(out, checkpoint, name))
    for d in os.listdir(out):
        if d != checkpoint:
            shutil.rmtree(os.path.join(out, d))


def test_resume_is_bit_exact_and_needs_the_meta_state(tmp_path):
    straight = run(str(tmp_path / "straight"), per_device_batch=8)
    out = str(tmp_path / "resume")
    stopped = run(out, per_device_batch=8, stop_at=3, save_steps=3)  # mid-epoch (4 steps per epoch)
    assert stopped.state.global_step == 3
    ckpt = os.path.join(out, "checkpoint-3")
    assert {META_STATE_NAME, "lr_trajectory.safetensors"} <= set(os.listdir(ckpt))
    resumed = run(out, per_device_batch=8, resume=True, save_steps=3)
    assert resumed.state.global_step == 6
    _assert_states(state_of(resumed), state_of(straight), exact=True)  # params, rates, wd, trajectory tensors
    assert resumed.lr_trajectory == straight.lr_trajectory
    logs = lambda t: [h for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert logs(resumed) == logs(straight)

    # negative control: the same resume without the meta state is not an exact continuation
    _only_checkpoint_without(out, "checkpoint-3", META_STATE_NAME)
    with pytest.warns(UserWarning, match="meta_state.safetensors is missing"):
        broken = run(out, per_device_batch=8, resume=True, save_steps=3)
    assert not torch.allclose(broken.rates.instance, straight.rates.instance)


def test_a_second_train_call_resuming_without_meta_state_restarts_the_rates(tmp_path):
    """train() then train(resume_from_checkpoint=...) on the same trainer: what the checkpoint does not hold
    (here the rates) starts fresh, as the warning says — it equals a new trainer resumed from it."""
    out = str(tmp_path / "run")
    t = _tiny_sgd_trainer(tmp_path / "run", 32, max_steps=6, save_strategy="steps", save_steps=3, lr_level="both")
    t.train()
    assert not torch.equal(t.rates.instance, torch.ones_like(t.rates.instance))
    _only_checkpoint_without(out, "checkpoint-3", META_STATE_NAME)
    ckpt = os.path.join(out, "checkpoint-3")
    with pytest.warns(UserWarning, match="meta_state.safetensors is missing"):
        t.train(resume_from_checkpoint=ckpt)
    fresh = _tiny_sgd_trainer(tmp_path / "fresh", 32, max_steps=6, save_strategy="no", lr_level="both")
    with pytest.warns(UserWarning, match="meta_state.safetensors is missing"):
        fresh.train(resume_from_checkpoint=ckpt)
    _assert_states(state_of(t), state_of(fresh), exact=True)


def _size_run(tmp_path, n: int, resume: bool, **kw):
    t = _tiny_sgd_trainer(tmp_path, n, max_steps=4, save_strategy="steps", save_steps=2, **kw)
    seen = {}

    class Grab(TrainerCallback):
        def on_train_begin(self, args, state, control, **k):
            seen["instance"] = t.rates.instance.clone()

    t.add_callback(Grab())
    if not resume:
        t.add_callback(_Stop(2))
    t.train(resume_from_checkpoint=True if resume else None)
    return t, seen


class _Stop(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def test_resume_on_a_train_set_of_another_size(tmp_path):
    first, _ = _size_run(tmp_path, 32, resume=False)
    saved = first.rates.instance.clone()
    assert not torch.equal(saved, torch.ones(32))
    with pytest.raises(
        ValueError,
        match=r"instance rate table has 32 entries but this train set has 40.*"
        r"resize_rates_on_resume=True",
    ):
        _size_run(tmp_path, 40, resume=True)
    with pytest.warns(UserWarning, match="drops the old instance-rate snapshots"):
        t, seen = _size_run(tmp_path, 40, resume=True, resize_rates_on_resume=True)
    assert torch.equal(seen["instance"][:32], saved)  # the overlap is kept ...
    assert torch.equal(seen["instance"][32:], torch.ones(8))  # ... and the new rows start at 1
    assert t.state.global_step == 4 and t.rates.instance.shape == (40,)
    assert t.lr_trajectory.num_steps == 4 and t.lr_trajectory.instance_rates.shape[1:] == (40,)


# ---------------------------------------------------------------- logging
def test_meta_values_reach_log_history_reporters_and_the_progress_bar(tmp_path, capsys):
    got = []

    class Reporter(TrainerCallback):  # what TensorBoard / W&B / trackio callbacks receive
        def on_log(self, args, state, control, logs=None, **kwargs):
            got.append(dict(logs))

    t = MetaLRTrainer(
        model=TinyMLP(),
        args=_args(
            tmp_path,
            per_device_train_batch_size=8,
            max_steps=4,
            logging_steps=2,
            disable_tqdm=False,
            weight_decay=0.01,
            learn_weight_decay=True,
            lr_level="both",
        ),
        train_dataset=make_split(32, seed=1),
        meta_dataset=make_split(8, seed=2),
        callbacks=[Reporter()],
    )
    t.train()
    keys = {
        "meta_loss",
        "rate_mean",
        "rate_min",
        "rate_max",
        "rate_zero_frac",
        "class_rate_mean",
        "class_rate_zero_frac",
        "meta_weight_decay",
    }
    train_logs = [h for h in t.state.log_history if "loss" in h]
    assert len(train_logs) == 2
    for h in train_logs:
        assert keys <= set(h), keys - set(h)
        assert h["rate_min"] <= h["rate_mean"] <= h["rate_max"] and 0 <= h["rate_zero_frac"] <= 1
        assert h["meta_loss"] > 0
    assert [g for g in got if "loss" in g] == [
        {k: v for k, v in h.items() if k != "step"} for h in train_logs
    ]
    printed = capsys.readouterr()
    assert "'meta_loss'" in printed.out + printed.err  # ProgressCallback.on_log writes the logs under the bar


def test_resume_after_a_max_steps_stop_mid_epoch_matches_a_straight_run(tmp_path):
    """max_steps < one epoch with save_strategy="epoch" (the Trainer saves at that stop), then resume with a
    longer max_steps: the trajectory holds no snapshot of the stop, and describes the longer run."""
    def make(out, max_steps):
        torch.manual_seed(0)
        return MetaLRTrainer(
            model=TinyMLP(hidden=12),
            args=_args(out, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", per_device_train_batch_size=8,
                       max_steps=max_steps, save_strategy="epoch"),
            train_dataset=make_split(32, seed=11), meta_dataset=make_split(8, seed=12),
        )

    straight = make(tmp_path / "straight", 7)
    straight.train()
    make(tmp_path / "resume", 3).train()  # 4 steps per epoch: stops mid-epoch, checkpoint-3 saved
    resumed = make(tmp_path / "resume", 7)
    resumed.train(resume_from_checkpoint=True)
    assert [(s, e) for s, e, _ in resumed.lr_trajectory._instance] == [(0, 0.0), (4, 1.0), (7, 1.75)]
    assert resumed.lr_trajectory == straight.lr_trajectory  # tensors and config (max_steps 7, not 3)
    assert torch.equal(resumed.rates.instance, straight.rates.instance)


def test_a_checkpoint_saved_at_an_epoch_end_holds_that_epochs_rates(tmp_path):
    """save_strategy="steps" with a save at each epoch's last step: the Trainer saves there before it calls
    on_epoch_end, and each checkpoint's trajectory must still hold the epoch it finished, or a run resumed from it
    lacks that epoch's instance table (and a replay of it applies other rates)."""
    def make():
        torch.manual_seed(0)
        return MetaLRTrainer(
            model=TinyMLP(hidden=12),
            args=_args(tmp_path / "run", optim="sgd", learning_rate=0.1, per_device_train_batch_size=8,
                       num_train_epochs=3, save_strategy="steps", save_steps=4),  # 4 steps per epoch
            train_dataset=make_split(32, seed=11), meta_dataset=make_split(8, seed=12),
        )

    straight = make()
    straight.train()
    epochs = [(s, e) for s, e, _ in straight.lr_trajectory._instance]
    assert epochs == [(0, 0.0), (4, 1.0), (8, 2.0), (12, 3.0)]
    for k, step in enumerate((4, 8, 12)):
        saved = LRTrajectory.from_pretrained(tmp_path / "run" / f"checkpoint-{step}")
        assert [(s, e) for s, e, _ in saved._instance] == epochs[:k + 2]
        assert torch.equal(saved.instance_rates[-1], straight.lr_trajectory.instance_rates[k + 1])
    resumed = make()
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert resumed.lr_trajectory == straight.lr_trajectory
    assert torch.equal(resumed.rates.instance, straight.rates.instance)


@pytest.mark.parametrize("save_only_model", [False, True])
def test_load_best_model_at_end_brings_back_its_rates_and_trajectory(tmp_path, save_only_model):
    """Also with ``save_only_model=True``, whose checkpoints hold no optimizer: the rates are saved with the model."""
    torch.manual_seed(0)
    t = MetaLRTrainer(
        model=TinyMLP(hidden=12),
        args=_args(tmp_path, optim="sgd", learning_rate=1.0, per_device_train_batch_size=8, max_steps=8,
                   eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                   load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True,
                   save_only_model=save_only_model),
        train_dataset=make_split(32, seed=11), meta_dataset=make_split(8, seed=12), eval_dataset=make_split(16, seed=5),
    )
    t.train()
    best = t.state.best_model_checkpoint
    best_step = int(best.rsplit("-", 1)[1])
    assert best_step < 8  # the last step is not the best one here, so the test means something
    assert ("optimizer.pt" in os.listdir(best)) is not save_only_model
    saved = safetensors.torch.load_file(os.path.join(best, META_STATE_NAME))
    assert torch.equal(t.rates.instance, saved["instance"])
    last = safetensors.torch.load_file(os.path.join(tmp_path, "checkpoint-8", META_STATE_NAME))
    assert not torch.equal(last["instance"], saved["instance"])  # the rates moved after the best step
    assert t.lr_trajectory.num_steps == best_step and t.lr_trajectory == LRTrajectory.from_pretrained(best)
    if save_only_model:  # a best checkpoint of an earlier version, without the rates: said, trajectory still loaded
        from hf_ddlr._checkpoint import load_best_meta_state

        os.remove(os.path.join(best, META_STATE_NAME))
        t.lr_trajectory = LRTrajectory.from_pretrained(os.path.join(tmp_path, "checkpoint-8"))
        with pytest.warns(UserWarning, match="holds no meta_state.safetensors.*rates stay those of the last step"):
            load_best_meta_state(t)
        assert t.lr_trajectory.num_steps == best_step
