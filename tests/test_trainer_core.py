"""MetaLRTrainer end to end on tiny models: the paper's update rule, pass-through, bad input."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import TinyMLP, make_split
from transformers import Trainer, TrainingArguments

from hf_ddlr import MetaLRConfig, MetaLRTrainer

COMMON = dict(report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)


def _args(tmp_path, **kw):
    return MetaLRConfig(output_dir=str(tmp_path), **{**COMMON, **kw})


def _per_example_grads(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    out = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]).logits, y[i : i + 1])
        out.append(dict(zip(names, torch.autograd.grad(loss, list(model.parameters())))))
    return out


# the README's recipe for the paper's rule (eq. 3-7), besides lr_level / meta_lr / learn_weight_decay
PAPER_RULE = dict(meta_lr_scaling="raw", max_instance_rate=None, probe_batches=0, rate_metric="optimizer",
                  lookahead="sgd", meta_grad_average=0.0, instance_signal="mean", center_instance_rates=False)


def test_the_readmes_paper_rule_follows_eq_3_to_7_over_several_steps(tmp_path):
    """Three full-batch plain-SGD steps with exactly the README's recipe (its options, nothing else changed but the
    Trainer's own clipping of the real step, max_grad_norm=0): each step's rates and weight decay are eq. 3-7's,
    computed independently with per-example gradients. Over several steps the meta gradient's running average
    and the lookahead's clipping (defaults both) would show; the one-step test above cannot see them."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    recipe = readme.split("The paper's rule stays available: ", 1)[1].split("(and", 1)[0]
    assert dict(re.findall(r"`(\w+)=([^`]+)`", recipe)) == {k: f'"{v}"' if isinstance(v, str) else str(v)
                                                            for k, v in PAPER_RULE.items()}
    lam, meta_lr, wd, wd_lr, steps = 0.5, 20.0, 0.01, 50.0, 3
    train, meta = make_split(24, seed=1), make_split(10, seed=2)
    torch.manual_seed(0)
    model = TinyMLP()
    start = copy.deepcopy(model)
    args = _args(tmp_path, per_device_train_batch_size=24, max_steps=steps, learning_rate=lam, optim="sgd",
                 lr_scheduler_type="constant", weight_decay=wd, lr_level="instance", meta_lr=meta_lr,
                 learn_weight_decay=True, weight_decay_meta_lr=wd_lr, meta_batch_size=10, max_grad_norm=0.0,
                 **PAPER_RULE)
    trainer = MetaLRTrainer(model=model, args=args, train_dataset=train, meta_dataset=meta)
    trainer.train()

    x, y = torch.tensor(train["x"]), torch.tensor(train["label"])
    xm, ym = torch.tensor(meta["x"]), torch.tensor(meta["label"])
    N, decay = x.shape[0], {"l1.weight", "l2.weight"}
    theta = {n: p.detach().clone() for n, p in start.named_parameters()}
    e, lam_wd = torch.ones(N), wd
    for _ in range(steps):
        net = copy.deepcopy(start)
        net.load_state_dict(theta, strict=False)
        grads = _per_example_grads(net, x, y)
        g_w = {n: sum(e[i] * grads[i][n] for i in range(N)) / N for n in theta}  # the step's weighted gradient
        look = {n: (p - lam * (g_w[n] + (lam_wd * p if n in decay else 0))).requires_grad_() for n, p in theta.items()}
        lm = F.cross_entropy(torch.func.functional_call(start, look, (xm,)).logits, ym)
        g_meta = dict(zip(look, torch.autograd.grad(lm, list(look.values()))))
        dots = torch.stack([sum((g[n] * g_meta[n]).sum() for n in theta) for g in grads])
        e = (e + meta_lr * (lam / N) * dots).clamp(min=0)  # eq. 5-7: w <- max(0, w - meta_lr dL/dw)
        lam_wd = max(0.0, lam_wd - wd_lr * (-lam * sum(float((g_meta[n] * theta[n]).sum()) for n in decay)))
        g_new = {n: sum(e[i] * grads[i][n] for i in range(N)) / N for n in theta}  # the real step, new rates
        theta = {n: p - lam * (g_new[n] + (lam_wd * p if n in decay else 0)) for n, p in theta.items()}
    torch.testing.assert_close(trainer.rates.instance, e, rtol=1e-4, atol=1e-5)
    assert trainer.rates.weight_decay == pytest.approx(lam_wd, rel=1e-4)
    for n, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach(), theta[n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("level, center", [("instance", None), ("class", None), ("both", None),
                                           ("instance", "mean"), ("both", "mean"), ("instance", "median"),
                                           ("instance", "at_cap")])
def test_one_sgd_step_matches_the_paper_equations(tmp_path, level, center):
    """Eq. 3-7 and §2.3 of the paper, computed independently with per-example gradients. With
    ``center_instance_rates`` an instance rate steps on its product minus the mean (``instance_rate_center=
    "median"``: the lower median) product of the batch's examples of its class; the class rates are unchanged by
    it. ``"at_cap"``: rates capped at 1 with ``instance_rate_at_cap="relative"``: every rate starts at the cap, so
    an example whose step goes up steps on its product minus the lower median of its class's, the others on
    their own."""
    lam, meta_lr, wd, wd_lr = 0.5, 20.0, 0.01, 50.0
    train, meta = make_split(24, seed=1), make_split(10, seed=2)
    torch.manual_seed(0)
    model = TinyMLP()
    start = copy.deepcopy(model)
    args = _args(
        tmp_path, per_device_train_batch_size=24, max_steps=1, learning_rate=lam, optim="sgd",
        lr_scheduler_type="constant", weight_decay=wd, lr_level=level, meta_lr=meta_lr, meta_lr_scaling="raw",
        max_instance_rate=1.0 if center == "at_cap" else None,  # the paper's rule: rates unbounded above,
        probe_batches=0, rate_metric="optimizer",  # the step's rows only and the real (plain-SGD) step's products
        learn_weight_decay=True, weight_decay_meta_lr=wd_lr, meta_batch_size=10, lookahead="sgd", max_grad_norm=0.0,
        center_instance_rates=center in ("mean", "median"), instance_rate_center=center if center == "median" else "mean",
        instance_rate_at_cap="relative" if center == "at_cap" else "clamp", instance_signal="mean",
    )
    trainer = MetaLRTrainer(model=model, args=args, train_dataset=train, meta_dataset=meta)
    trainer.train()

    # ---- independent reference
    x, y = torch.tensor(train["x"]), torch.tensor(train["label"])
    xm, ym = torch.tensor(meta["x"]), torch.tensor(meta["label"])
    N = x.shape[0]
    grads = _per_example_grads(start, x, y)
    decay = {"l1.weight", "l2.weight"}  # the Trainer does not decay biases
    theta = dict(start.named_parameters())
    g_mean = {n: sum(g[n] for g in grads) / N for n in theta}
    look = {n: (p - lam * (g_mean[n] + (wd * p if n in decay else 0))).detach().requires_grad_() for n, p in theta.items()}
    lm = F.cross_entropy(torch.func.functional_call(start, look, (xm,)).logits, ym)
    g_meta = dict(zip(look, torch.autograd.grad(lm, list(look.values()))))
    dots = torch.stack([sum((g[n] * g_meta[n]).sum() for n in theta) for g in grads])
    C = 3
    if level in ("instance", "both"):
        inst_dots = dots
        if center:  # the meta-gradient -dots minus its mean (or lower median) over the batch's examples of the
            inst_dots = dots.clone()  # same label, class by class
            for c in y.unique():
                same = sorted((-dots[y == c]).tolist())
                inst_dots[y == c] += sum(same) / len(same) if center == "mean" else same[(len(same) - 1) // 2]
        if center == "at_cap":  # relative where the own step goes up (past the cap of 1), then clamped to it
            assert (dots > 0).any() and (dots < 0).any()
            inst_dots = torch.where(dots > 0, inst_dots, dots)
        expect_inst = (1 + meta_lr * (lam / N) * inst_dots).clamp(min=0, max=None if center != "at_cap" else 1.0)
        torch.testing.assert_close(trainer.rates.instance, expect_inst, rtol=1e-4, atol=1e-5)
    else:
        assert trainer.rates.instance is None
    if level in ("class", "both"):
        class_dots = torch.zeros(C).index_add_(0, y, dots)
        expect_cls = (1 + meta_lr * (lam / N) * class_dots).clamp(min=0)
        torch.testing.assert_close(trainer.rates.per_class, expect_cls, rtol=1e-4, atol=1e-5)
    else:
        assert trainer.rates.per_class is None
    wd_grad = -lam * sum(float((g_meta[n] * theta[n]).sum()) for n in decay)
    expect_wd = max(0.0, wd - wd_lr * wd_grad)
    assert trainer.rates.weight_decay == pytest.approx(expect_wd, rel=1e-4)
    assert trainer.rates.weight_decay != pytest.approx(wd, rel=1e-3)  # it really moved

    # ---- the real step used the new rates and the new weight decay
    e = torch.ones(N)
    if trainer.rates.instance is not None:
        e = e * trainer.rates.instance
    if trainer.rates.per_class is not None:
        e = e * trainer.rates.per_class[y]
    for n, p in trainer.model.named_parameters():
        g = sum(e[i] * grads[i][n] for i in range(N)) / N
        ref = theta[n].detach() - lam * (g + (trainer.rates.weight_decay * theta[n].detach() if n in decay else 0))
        torch.testing.assert_close(p.detach(), ref, rtol=1e-4, atol=1e-6)


def _train_plain_and_meta_without_meta_set(tmp_path, **kw):
    torch.manual_seed(0)
    m1 = TinyMLP(bn=True, dropout=0.2)
    m2 = copy.deepcopy(m1)
    train = make_split(64, seed=3)
    common = dict(per_device_train_batch_size=8, num_train_epochs=2, gradient_accumulation_steps=2,
                  learning_rate=0.05, weight_decay=0.01, **{**COMMON, **kw})
    t1 = Trainer(model=m1, args=TrainingArguments(output_dir=str(tmp_path / "a"), **common), train_dataset=train)
    t1.train()
    t2 = MetaLRTrainer(model=m2, args=MetaLRConfig(output_dir=str(tmp_path / "b"), **common), train_dataset=train)
    t2.train()
    return m1, m2, t2


def test_without_meta_set_it_is_exactly_trainer(tmp_path):
    m1, m2, t2 = _train_plain_and_meta_without_meta_set(tmp_path)
    assert t2.rates is None
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n


def test_meta_step_leaves_batchnorm_stats_as_a_plain_step(tmp_path):
    """After one step the running BN statistics equal a plain Trainer's (they only depend on the real forward)."""
    torch.manual_seed(0)
    m1 = TinyMLP(bn=True)
    m2 = copy.deepcopy(m1)
    train, meta = make_split(32, seed=4), make_split(16, seed=5)
    kw = dict(per_device_train_batch_size=32, max_steps=1, optim="sgd", **COMMON)
    Trainer(model=m1, args=TrainingArguments(output_dir=str(tmp_path / "a"), **kw), train_dataset=train).train()
    t = MetaLRTrainer(model=m2, args=MetaLRConfig(output_dir=str(tmp_path / "b"), **kw), train_dataset=train,
                      meta_dataset=meta)
    t.train()
    assert not torch.equal(t.rates.instance, torch.ones(32))
    assert torch.equal(m1.bn.running_mean, m2.bn.running_mean)
    assert torch.equal(m1.bn.running_var, m2.bn.running_var)
    assert torch.equal(m1.bn.num_batches_tracked, m2.bn.num_batches_tracked)


def test_index_column_added_and_never_reaches_the_model(tmp_path):
    seen = []

    class Strict(TinyMLP):
        def forward(self, x, labels=None):  # no **kwargs: an index column would raise TypeError
            seen.append(x.shape[0])
            return super().forward(x, labels)

    train, meta = make_split(32, seed=6), make_split(8, seed=7)
    assert "sample_index" not in train.column_names
    t = MetaLRTrainer(model=Strict(), args=_args(tmp_path, per_device_train_batch_size=8, max_steps=2),
                      train_dataset=train, meta_dataset=meta, eval_dataset=meta)
    t.train()
    assert "sample_index" in t.train_dataset.column_names
    assert "eval_loss" in t.evaluate()
    assert seen
    # hf_ddlr.data splits carry the column on every split; with remove_unused_columns=False (set_transform
    # pipelines) it must not reach the model in evaluation / prediction either
    t.args.remove_unused_columns = False
    test = make_split(8, seed=8).add_column("sample_index", list(range(8)))
    assert "eval_loss" in t.evaluate(test)
    assert t.predict(test).predictions.shape == (8, 3)


def test_existing_index_column_must_be_row_positions(tmp_path):
    full = make_split(64, seed=6).add_column("sample_index", list(range(64)))
    args = _args(tmp_path, per_device_train_batch_size=8, max_steps=1)
    with pytest.raises(ValueError, match=r"not a permutation of the row positions 0..31 .*remove_columns"):
        MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=full.select(range(32, 64)),
                      meta_dataset=make_split(8, seed=7))
    shuffled = full.select(range(32)).shuffle(seed=0)  # a permutation: kept as it is
    t = MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=shuffled, meta_dataset=make_split(8, seed=7))
    assert t.train_dataset["sample_index"] == shuffled["sample_index"]


def test_user_transform_sees_the_added_index_column(tmp_path):
    def transform(batch):  # a typical with_transform: builds the model inputs, passes the rest through
        return {"x": [[2 * v for v in row] for row in batch["x"]], **{k: batch[k] for k in batch if k != "x"}}

    train = make_split(32, seed=6).with_transform(transform, columns=["x", "label"])
    t = MetaLRTrainer(model=TinyMLP(), args=_args(tmp_path, per_device_train_batch_size=8, max_steps=2,
                                                  remove_unused_columns=False, max_instance_rate=None,
                                                  probe_batches=0, instance_signal="mean"),  # (uncentred)
                      train_dataset=train, meta_dataset=make_split(8, seed=7))
    assert t.train_dataset[3]["sample_index"] == 3
    t.train()
    assert (t.rates.instance != 1).sum() == 16  # the two visited batches got rates (uncapped: every one moves)


def test_torch_meta_dataset_keys_the_model_does_not_take_are_dropped(tmp_path):
    class TorchMeta(torch.utils.data.Dataset):
        def __init__(self, ds):
            self.rows = ds.with_format("torch")

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            r = self.rows[i]
            return {"x": r["x"], "label": r["label"], "is_noisy": torch.tensor(False)}

    t = MetaLRTrainer(model=TinyMLP(), args=_args(tmp_path, per_device_train_batch_size=8, max_steps=2),
                      train_dataset=make_split(32, seed=6), meta_dataset=TorchMeta(make_split(8, seed=7)))
    t.train()
    assert t.lr_trajectory.meta_loss.isfinite().all()


def test_second_train_call_is_a_fresh_run(tmp_path):
    args = _args(tmp_path, per_device_train_batch_size=8, max_steps=3)
    torch.manual_seed(0)
    t = MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=make_split(32, seed=6),
                      meta_dataset=make_split(8, seed=7))
    t.train()
    first = t.lr_trajectory
    assert first.num_steps == 3 and (t.rates.instance != 1).any()
    t.train()  # hyperparameter_search / model_init trials call train() again
    assert t.lr_trajectory is not first and t.lr_trajectory.steps.tolist() == [1, 2, 3]
    assert t.lr_trajectory.instance_rates[0].eq(1).all()  # started again from rates 1


# ---------------------------------------------------------------- bad input
def test_meta_labels_outside_label_space(tmp_path):
    train, meta = make_split(16, seed=1), make_split(8, seed=2, num_labels=5)
    meta = meta.map(lambda r: {"label": 4})
    with pytest.raises(ValueError, match=r"labels \[4\] outside the model's label space 0..2"):
        MetaLRTrainer(model=TinyMLP(), args=_args(tmp_path), train_dataset=train, meta_dataset=meta, num_labels=3)


def test_labels_beyond_a_config_less_models_outputs_are_refused_at_the_first_forward(tmp_path):
    """A model without a config has its label space read from the train labels (0..4 here); a head of 3 outputs
    cannot score labels 3 and 4: the first forward says so and how to fix it, instead of cross-entropy's index
    error (a device-side assert on a GPU). A head as wide as the labels trains."""
    train = make_split(16, seed=1, num_labels=5)
    assert max(train["label"]) == 4
    args = _args(tmp_path, per_device_train_batch_size=8, max_steps=1)
    t = MetaLRTrainer(model=TinyMLP(num_labels=3), args=args, train_dataset=train,
                      meta_dataset=make_split(8, seed=2, num_labels=3))
    with pytest.raises(ValueError, match=r"outputs 3 logits per example, but the labels span 5 classes \(0\.\.4\)"
                                         r"\. Give the model's head num_labels=5 outputs"):
        t.train()
    MetaLRTrainer(model=TinyMLP(num_labels=5), args=args, train_dataset=train,
                  meta_dataset=make_split(8, seed=2, num_labels=3)).train()


def test_ignored_labels_are_refused_with_the_filter_that_drops_them(tmp_path):
    """-100 (an example a plain Trainer's loss ignores) has no class for a rate: refused at construction with the
    filter that drops those rows, on the set's own label column."""
    train = make_split(16, seed=1).map(lambda r, i: {"label": -100 if i == 3 else r["label"]}, with_indices=True)
    with pytest.raises(ValueError, match=r"train dataset has labels \[-100\].*drop those rows first, e\.g\. "
                                         r"train_dataset\.filter\(lambda r: r\['label'\] != -100\)"):
        MetaLRTrainer(model=TinyMLP(), args=_args(tmp_path), train_dataset=train, meta_dataset=make_split(8, seed=2))


def test_train_set_without_labels(tmp_path):
    train = make_split(16, seed=1).remove_columns("label")
    with pytest.raises(ValueError, match="no 'labels'/'label' column"):
        MetaLRTrainer(model=TinyMLP(), args=_args(tmp_path), train_dataset=train, meta_dataset=make_split(8, seed=2))


def test_iterable_sets_are_refused_each_with_its_own_reason(tmp_path):
    stream = make_split(16, seed=1).to_iterable_dataset()
    with pytest.raises(ValueError, match=r"map-style train_dataset .*got IterableDataset.*keyed to the train set's rows"):
        MetaLRTrainer(model=TinyMLP(), args=_args(tmp_path, max_steps=1), train_dataset=stream,
                      meta_dataset=make_split(8, seed=2))
    with pytest.raises(ValueError, match=r"map-style meta_dataset .*sampled from it by position"):
        MetaLRTrainer(model=TinyMLP(), args=_args(tmp_path, max_steps=1), train_dataset=make_split(16, seed=1),
                      meta_dataset=make_split(8, seed=2).to_iterable_dataset())


def test_model_without_logits(tmp_path):
    class NoLogits(TinyMLP):
        def forward(self, x, labels=None):
            return {"scores": super().forward(x).logits}

    t = MetaLRTrainer(model=NoLogits(), args=_args(tmp_path, max_steps=1, per_device_train_batch_size=8),
                      train_dataset=make_split(16, seed=1), meta_dataset=make_split(8, seed=2), num_labels=3)
    before = t.rates.instance.clone()
    with pytest.raises(TypeError, match="without `logits`"):
        t.train()
    assert torch.equal(t.rates.instance, before)


def test_model_returning_a_tuple(tmp_path):
    class TupleOut(TinyMLP):  # return_dict=False style; labels are never passed by MetaLRTrainer
        def forward(self, x, labels=None):
            return (super().forward(x).logits,)

    t = MetaLRTrainer(model=TupleOut(), args=_args(tmp_path, max_steps=2, per_device_train_batch_size=8,
                                                  max_instance_rate=None,  # uncapped: every visited rate moves
                                                  instance_signal="mean"),  # (centred, a label's median would not)
                      train_dataset=make_split(16, seed=1), meta_dataset=make_split(8, seed=2), num_labels=3)
    t.train()
    assert (t.rates.instance != 1).sum() == 16


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(lr_level="instanse"), "lr_level='instanse' is not valid"),
        (dict(meta_lr=-1.0), "meta_lr must be >= 0"),
        (dict(meta_strategy="fast"), "meta_strategy='fast' is not valid"),
        (dict(meta_interval=0), "meta_interval must be a positive integer"),
        (dict(meta_batch_size=200.0), r"meta_batch_size must be a positive integer .* got 200\.0"),
        (dict(meta_batch_size=0), "meta_batch_size must be a positive integer"),
        (dict(learn_weight_decay=True, weight_decay=0.0), "needs a starting value"),
        (dict(keep_history=False, meta_update="delayed"), "would train without rates"),
        (dict(instance_rate_scale="row"), "instance_rate_scale='row' is not valid"),
        (dict(instance_rate_normalization="mean"), "instance_rate_normalization='mean' is not valid"),
        (dict(max_instance_rate=0.0), "max_instance_rate must be a finite number > 0"),
        (dict(max_rate=float("nan")), "max_rate must be a finite number > 0"),
        (dict(probe_batches=-1), "probe_batches must be a number >= 0"),
        (dict(probe_batches=float("nan")), "probe_batches must be a number >= 0"),
        (dict(probe_batches=True), "probe_batches must be a number >= 0"),
        (dict(instance_rate_scale="key", lr_level="class"), "instance_rate_scale='key' sets the scale"),
        (dict(instance_rate_scale="key", meta_lr_scaling="raw"), "instance_rate_scale='key' sets the scale"),
        (dict(probe_batches=2, lr_level="class"), "probe_batches=2 moves instance rates .* lr_level='class' has no"),
        (dict(probe_batches=1, keep_history=False), "keep_history=False resets the instance rates"),
        (dict(instance_rate_gradient="chain_rule"), "lr_level='instance' has no product of the two"),
    ],
)
def test_bad_config(tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg):
        _args(tmp_path, **kw)


def test_non_finite_meta_loss_skips_update(tmp_path):
    train, meta = make_split(16, seed=1), make_split(8, seed=2)
    meta = meta.map(lambda r: {"x": [float("nan")] * 6})
    t = MetaLRTrainer(model=TinyMLP(), args=_args(tmp_path, max_steps=2, per_device_train_batch_size=8,
                                                 logging_steps=1), train_dataset=train, meta_dataset=meta)
    t.train()
    assert torch.equal(t.rates.instance, torch.ones(16))
    assert any(h.get("meta_skipped_steps") for h in t.state.log_history)


@pytest.mark.parametrize("update, ga", [("same_step", 1), ("delayed", 1), ("same_step", 2)])
def test_last_layer_is_exact_when_only_the_head_trains(tmp_path, update, ga):
    """With a frozen body the closed form on the head is the exact meta-gradient: the trainer's last_layer
    (features captured from the real forward, or recomputed under GA) must agree with jvp on one step."""
    def one_step(strategy):
        torch.manual_seed(0)
        model = TinyMLP()
        model.l1.requires_grad_(False)
        args = _args(tmp_path / strategy, per_device_train_batch_size=8, gradient_accumulation_steps=ga,
                     max_steps=1, optim="sgd", learning_rate=0.1, meta_strategy=strategy, meta_update=update,
                     instance_signal="mean")  # (the closed form is of the whole product)
        t = MetaLRTrainer(model=model, args=args, train_dataset=make_split(32, seed=6),
                          meta_dataset=make_split(16, seed=7))
        t.train()
        return t.last_meta_gradients.example_grad

    got, ref = one_step("last_layer"), one_step("jvp")
    assert ref.abs().max() > 0 and got.shape == ref.shape == (8 * ga,)
    assert float(F.cosine_similarity(got.double(), ref.double(), dim=0)) > 0.9999


def test_last_layer_meta_forward_before_the_real_forward_changes_nothing(tmp_path, monkeypatch):
    """``last_layer`` takes its meta batch and the head's input of it before the real forward (no training graph
    held then): the run is the one that takes them at the meta step — the same meta batches in turn (meta batch
    of 4 from a set of 16), the same parameters, dropout replayed."""
    import hf_ddlr.schedules as schedules

    def run(tag: str) -> MetaLRTrainer:
        torch.manual_seed(0)
        args = _args(tmp_path / tag, per_device_train_batch_size=8, max_steps=4, optim="sgd", learning_rate=0.1,
                     meta_strategy="last_layer", meta_batch_size=4)
        t = MetaLRTrainer(model=TinyMLP(bn=True, dropout=0.2), args=args, train_dataset=make_split(32, seed=6),
                          meta_dataset=make_split(16, seed=7))
        t.train()
        return t

    early = run("early")
    monkeypatch.setattr(schedules.SameStepFused, "_take_meta_batch_early", lambda self: None)
    late = run("late")
    assert (early.rates.instance != 1).any()
    torch.testing.assert_close(early.rates.instance, late.rates.instance, rtol=0, atol=0)
    for p, q in zip(early.model.parameters(), late.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_meta_set_smaller_than_the_meta_batch_is_used_whole(tmp_path):
    """A meta set of 10 examples with a meta batch of 32: every meta step uses each meta example once, exactly as
    meta_batch_size=10 (a permutation of the whole set) does — not 32 draws with replacement."""

    def rates(meta_batch_size: int) -> torch.Tensor:
        train, meta = make_split(24, seed=1), make_split(10, seed=2)
        torch.manual_seed(0)
        args = _args(tmp_path / str(meta_batch_size), per_device_train_batch_size=8, max_steps=3, learning_rate=0.5,
                     optim="sgd", lr_scheduler_type="constant", meta_batch_size=meta_batch_size)
        trainer = MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=train, meta_dataset=meta)
        trainer.train()
        return trainer.rates.instance

    whole = rates(10)
    assert (whole != 1).any()
    torch.testing.assert_close(rates(32), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("meta_batch_size", [4, 32])
def test_meta_rows_read_once_give_the_same_run_as_rows_read_every_step(tmp_path, monkeypatch, meta_batch_size):
    """The meta set's rows (and, when every meta batch is the whole set, the collated batch) are read once; the
    run is bit for bit the one that reads and collates them every step. A set with a transform (which may
    draw new values on every read) is read every step."""
    import hf_ddlr._batches as batches

    def run(tag: str, meta) -> MetaLRTrainer:
        torch.manual_seed(0)
        args = _args(tmp_path / tag, per_device_train_batch_size=8, max_steps=3, learning_rate=0.5, optim="sgd",
                     lr_scheduler_type="constant", meta_batch_size=meta_batch_size)
        trainer = MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=make_split(24, seed=1), meta_dataset=meta)
        trainer.train()
        return trainer

    cached = run("cached", make_split(10, seed=2))
    assert cached._meta_set._rows and (cached._meta_set._whole is not None) == (meta_batch_size > 10)
    monkeypatch.setattr(batches, "MAX_CACHED_ROWS", -1)
    fresh = run("fresh", make_split(10, seed=2))
    assert fresh._meta_set._rows is None and fresh._meta_set._whole is None
    assert torch.equal(cached.rates.instance, fresh.rates.instance)
    monkeypatch.undo()
    transformed = make_split(10, seed=2)
    transformed.set_transform(lambda b: {"x": torch.tensor(b["x"]), "label": torch.tensor(b["label"])})
    t = run("transform", transformed)
    assert t._meta_set._rows is None and t._meta_set._whole is None


@pytest.mark.parametrize("meta_interval", [1, 2])
def test_meta_batches_take_the_meta_set_in_turn(tmp_path, monkeypatch, meta_interval):
    """A meta set larger than the meta batch is taken in turn from a shuffled order: each meta batch has distinct
    rows, every ceil(n / m) consecutive meta steps cover the whole set (the last batch of a pass wraps to its
    start), each pass in a new order, and the rows are a function of the step (what a resumed run draws)."""
    import hf_ddlr._batches as batches

    drawn: list[list[int]] = []
    collated = batches.MetaSetSampler._collated

    def record(self, idx):
        drawn.append([int(i) for i in idx])
        return collated(self, idx)

    monkeypatch.setattr(batches.MetaSetSampler, "_collated", record)
    args = _args(tmp_path, per_device_train_batch_size=8, max_steps=9 * meta_interval, learning_rate=0.1, optim="sgd",
                 lr_scheduler_type="constant", meta_batch_size=4, meta_interval=meta_interval)
    trainer = MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=make_split(24, seed=1),
                            meta_dataset=make_split(10, seed=2))
    trainer.train()
    assert len(drawn) == 9
    assert all(len(set(b)) == 4 for b in drawn)
    passes = [sum(drawn[3 * p:3 * p + 3], []) for p in range(3)]  # ceil(10 / 4) = 3 meta steps per pass
    assert all(set(p) == set(range(10)) for p in passes)
    assert all(p[10:] == p[:2] for p in passes)  # the wrap: the pass's last batch ends with its first two rows
    assert len({tuple(p[:10]) for p in passes}) == 3  # a new order every pass
    for k, rows in enumerate(drawn):  # a function of the step alone
        trainer.state.global_step = k * meta_interval
        assert batches.cycled_indices(trainer, 10, 4).tolist() == rows


def test_the_processes_meta_batches_together_are_one_process_batch():
    """Under DDP the processes take consecutive slices of one shared order: their meta batches are disjoint and
    together are the meta batch of one process with ``world_size`` times the rows (orders of their own had the
    ranks score the same examples in one step)."""
    from types import SimpleNamespace

    import hf_ddlr._batches as batches

    def fake(step: int, world: int, rank: int) -> SimpleNamespace:
        return SimpleNamespace(args=SimpleNamespace(seed=3, world_size=world, process_index=rank),
                               state=SimpleNamespace(global_step=step), meta_args=SimpleNamespace(meta_interval=1))

    for step in range(7):  # 16 meta rows, 2 x 3 a step: passes of 3 steps, the third wrapping
        one = batches.cycled_indices(fake(step, 1, 0), 16, 6).tolist()
        r0, r1 = (batches.cycled_indices(fake(step, 2, r), 16, 3).tolist() for r in (0, 1))
        assert r0 + r1 == one, step
        if step % 3 != 2:
            assert not set(r0) & set(r1), step


@pytest.mark.parametrize("cap", [1.0, None])
def test_instance_rates_capped_at_one_by_default(tmp_path, cap):
    """The default max_instance_rate=1 reaches the rate table: no instance rate ends above 1 (some sit at it);
    uncapped, the same run's clean-looking examples climb above 1. The bound is recorded with the trajectory."""
    from hf_ddlr._recording import meta_settings

    kw = {} if cap == 1.0 else {"max_instance_rate": None}
    torch.manual_seed(0)
    t = MetaLRTrainer(model=TinyMLP(), args=_args(tmp_path, max_steps=12, per_device_train_batch_size=8,
                                                 meta_lr=0.5, **kw),
                      train_dataset=make_split(32, seed=1), meta_dataset=make_split(16, seed=2))
    t.train()
    top = float(t.rates.instance.max())
    if cap is None:
        assert top > 1.2
    else:
        assert top == 1.0
    assert meta_settings(t)["max_instance_rate"] == cap


@pytest.mark.parametrize("normalization", ["median", "none"])
def test_real_step_applies_the_instance_rates_divided_by_the_tables_median(tmp_path, normalization):
    """instance_rate_normalization='median': the real SGD step is -lr * sum_i (r_i / median(r)) grad l_i / N, the
    median over every row of the table (here 1.125, not the batch's); 'none' applies the table. Checked against
    per-example gradients taken by hand on a copy of the model (rates frozen: meta_lr=0)."""
    from transformers import TrainerCallback

    n, values = 17, 1.5 - 1.5 * torch.linspace(0, 1, 17) ** 2  # in [0, 1.5], median (the 9th) 1.125
    values = values[torch.randperm(n, generator=torch.Generator().manual_seed(3))]
    torch.manual_seed(0)
    model = TinyMLP()
    start = copy.deepcopy(model)
    args = _args(tmp_path, max_steps=1, per_device_train_batch_size=8, optim="sgd", learning_rate=0.1,
                 weight_decay=0.0, max_grad_norm=0.0, meta_lr=0.0, probe_batches=0, max_instance_rate=1.5,
                 instance_rate_normalization=normalization)
    train = make_split(n, seed=1)
    t = MetaLRTrainer(model=model, args=args, train_dataset=train, meta_dataset=make_split(8, seed=2))
    t.rates.instance.copy_(values)
    seen = []

    class Indices(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen.extend(i for mb in t._window for i in mb.indices.tolist())

    t.add_callback(Indices())
    t.train()
    assert len(seen) == 8
    divisor = float(values.sort().values[n // 2]) if normalization == "median" else 1.0
    assert divisor == pytest.approx(1.125) or normalization == "none"
    x = torch.tensor([train[i]["x"] for i in seen])
    y = torch.tensor([train[i]["label"] for i in seen])
    grads = _per_example_grads(start, x, y)
    for name, p0 in start.named_parameters():
        step = sum(float(values[i]) / divisor * g[name] for i, g in zip(seen, grads)) / len(seen)
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), p0.detach() - 0.1 * step,
                                   rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t.rates.instance, values)  # the table itself is not divided


def test_infinite_bound_on_the_command_line_means_no_bound(tmp_path):
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(MetaLRConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--max_instance_rate", "inf", "--max_rate", "inf", "--report_to", "none"])
    assert cfg.max_instance_rate is None and cfg.max_rate is None
    (cfg,) = HfArgumentParser(MetaLRConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--report_to", "none"])
    assert cfg.max_instance_rate == 1.0 and cfg.max_rate is None


@pytest.mark.parametrize("probes, probed, history", [(0, 0, True), (0.5, 4, True), (1, 8, True), (2, 16, True),
                                                     (None, 0, False)])
def test_probes_move_the_rates_of_rows_outside_the_step(tmp_path, probes, probed, history):
    """probe_batches=k: a meta step also moves the rates of k x (the step's examples) rows taken in turn from a
    shuffled pass of their own (a function of the seed and the step); every other rate stays 1. Their rows go
    through the Trainer's preparation of the train set (here a transform that builds the inputs). Without history
    (the no-history ablation resets every rate before the next step) the default probes nothing (probes asked for
    there are refused: test_bad_config)."""
    from hf_ddlr._batches import probe_indices

    def transform(batch):
        return {"x": [[2 * v for v in row] for row in batch["x"]], **{k: batch[k] for k in batch if k != "x"}}

    train = make_split(32, seed=6).with_transform(transform, columns=["x", "label"])
    torch.manual_seed(0)
    t = MetaLRTrainer(model=TinyMLP(), args=_args(tmp_path, per_device_train_batch_size=8, max_steps=1,
                                                  remove_unused_columns=False, max_instance_rate=None,
                                                  probe_batches=probes, keep_history=history,
                                                  instance_signal="mean"),  # (uncentred: every visited rate moves)
                      train_dataset=train, meta_dataset=make_split(8, seed=7))
    t.train()
    step_rows = set(t._window[0].indices.tolist())
    probe_rows = set(probe_indices(32, probed, 0, t.args.seed + 1).tolist()) if probed else set()
    assert len(probe_rows) == probed
    moved = set(torch.nonzero(t.rates.instance != 1).flatten().tolist())
    assert moved == step_rows | probe_rows
    assert not probed or probe_rows - step_rows  # (the probes are not the step's own rows)


def test_probe_indices_go_through_every_row_once_per_pass_split_over_processes():
    """Consecutive meta steps take consecutive places of shuffled passes: each pass is every row once (a new
    order per pass), the processes take disjoint shares of a step's places, and the same call gives the same rows
    (a resumed run probes what the uninterrupted one would)."""
    from hf_ddlr._batches import probe_indices

    n, per_step = 10, 4
    steps = [[probe_indices(n, per_step, s, seed=3, rank=r, world=2) for r in range(2)] for s in range(5)]
    for s in steps:
        assert not set(s[0].tolist()) & set(s[1].tolist()) and len(s[0]) == len(s[1]) == 2
    flat = torch.cat([torch.stack(s, 1).flatten() for s in steps])  # the places in order: rank 0, 1 alternate
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:20].tolist()) == list(range(10))
    assert flat[:10].tolist() != flat[10:20].tolist()  # a new order each pass
    assert torch.equal(probe_indices(n, per_step, 3, seed=3, rank=1, world=2), steps[3][1])
    assert not torch.equal(probe_indices(n, per_step, 3, seed=4), probe_indices(n, per_step, 3, seed=3))
