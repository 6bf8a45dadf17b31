"""TRL's RewardTrainer with a rate per preference pair (``MetaRewardTrainer``): the pair's Bradley-Terry loss and its
meta-gradient against an independent computation, RewardTrainer's own run at rates 1, and the rates of pairs whose
order was flipped."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
import torch.nn.functional as F
from launching import check_two_process_pairs_run
from tiny_text import WORDS, tiny_tokenizer
from torch import nn
from transformers import BertConfig, BertForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_ddlr.meta import MetaBatch, MicroBatch, meta_gradients, param_specs
from hf_ddlr.meta.losses import preference_loss, preference_task

trl = pytest.importorskip("trl")
from hf_ddlr import MetaRewardConfig, MetaRewardTrainer  # noqa: E402

COMMON = dict(report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, optim="sgd",
              learning_rate=0.1, lr_scheduler_type="constant", logging_steps=1, per_device_train_batch_size=8,
              max_grad_norm=0.0)


# ------------------------------------------------------------------ the loss and its meta-gradient
class _Scorer(nn.Module):
    """A float64 reward model on feature rows: one reward per row."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(5, 7).double(), nn.Linear(7, 1).double()

    def forward(self, x, labels=None):
        return SequenceClassifierOutput(logits=self.l2(torch.tanh(self.l1(x))))


def _pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` pairs as TRL stacks them (the chosen rows, then the rejected ones) and their margins."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * n, 5, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)


def _bt(model: nn.Module, x: torch.Tensor, margin: torch.Tensor, center: float) -> torch.Tensor:
    """Each pair's loss written out from TRL's RewardTrainer.compute_loss (before its mean)."""
    r = model(x).logits.squeeze(-1)
    chosen, rejected = torch.chunk(r, 2)
    return -F.logsigmoid(chosen - rejected - margin) + center * (chosen + rejected) ** 2


@pytest.mark.parametrize("center", [0.0, 0.3])
def test_pair_loss_is_reward_trainers(center):
    model = _Scorer()
    x, m = _pairs(6, 1)
    torch.testing.assert_close(preference_loss(model(x).logits, m, center=center), _bt(model, x, m, center))
    with pytest.raises(ValueError, match="chosen rows then rejected rows"):
        preference_loss(model(x).logits, m[:4])


@pytest.mark.parametrize("strategy", ["jvp", "exact", "finite_difference"])
def test_pair_meta_gradient_is_central_differences_through_a_real_step(strategy):
    """∂L_meta(θ')/∂e_i of every pair equals central differences of the meta pairs' mean loss after a real
    torch SGD-with-momentum step on (1/N) Σ e_i ℓ_i (float64)."""
    center, N = 0.2, 6
    model = _Scorer()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    x, m = _pairs(N, 1)
    xm, mm = _pairs(4, 2)
    for _ in range(2):  # a momentum buffer
        opt.zero_grad()
        _bt(model, *_pairs(N, 3), center).mean().backward()
        opt.step()
    e = torch.tensor([0.5, 1.25, 0.75, 2.0, 1.5, 1.0], dtype=torch.float64)
    task = preference_task(center)
    params = dict(model.named_parameters())
    res = meta_gradients(model, params, [MicroBatch({"x": x}, m, e.clone(), seed=0)],
                         MetaBatch({"x": xm}, mm, seed=1), param_specs(opt, params, set()), weight_decay=0.0,
                         normalizer=N, strategy=strategy, task=task)

    def meta_loss_after(w: torch.Tensor) -> float:
        mod, o = copy.deepcopy((model, opt))
        o.zero_grad()
        ((w * _bt(mod, x, m, center)).sum() / N).backward()
        o.step()
        with torch.no_grad():
            return float(_bt(mod, xm, mm, center).mean())

    h, brute = 1e-5, torch.empty(N, dtype=torch.float64)
    for i in range(N):
        up, down = e.clone(), e.clone()
        up[i] += h
        down[i] -= h
        brute[i] = (meta_loss_after(up) - meta_loss_after(down)) / (2 * h)
    assert brute.abs().max() > 0
    tol = 5e-5 if strategy == "finite_difference" else 1e-5
    torch.testing.assert_close(res.example_grad.double(), brute, rtol=tol, atol=tol * float(brute.abs().max()))
    assert res.meta_loss == pytest.approx(meta_loss_after(e), rel=1e-6)


# ------------------------------------------------------------------ the trainer
def _preference_set(n: int, seed: int, flip: float = 0.0) -> tuple[datasets.Dataset, torch.Tensor]:
    """``n`` pairs of 3-8 word 'answers' from the tiny vocabulary: the chosen one draws its words mostly (80 %)
    from the lower half of the vocabulary, the rejected one from the upper half; the order of a share ``flip`` of
    the pairs is swapped (the flipped rows are returned). Every pair has a margin."""
    g = torch.Generator().manual_seed(seed)
    half = len(WORDS) // 2

    def answer(low: bool) -> str:
        k = int(torch.randint(3, 9, (1,), generator=g))
        own = torch.rand(k, generator=g) < 0.8
        ids = torch.randint(0, half, (k,), generator=g) + torch.where(own == low, 0, half)
        return " ".join(WORDS[int(i)] for i in ids)

    flipped = torch.rand(n, generator=g) < flip
    rows = []
    for i in range(n):
        good, bad = answer(True), answer(False)
        if flipped[i]:
            good, bad = bad, good
        rows.append({"chosen": good, "rejected": bad, "margin": 0.1})
    return datasets.Dataset.from_list(rows), flipped


def _reward_model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(WORDS) + 4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=1, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pad_token_id=0)
    return BertForSequenceClassification(cfg)


def _tokenizer():
    tok = tiny_tokenizer()
    tok.eos_token = "[SEP]"  # RewardTrainer appends it to every answer
    return tok


@pytest.mark.parametrize("center", [None, 0.05])
def test_at_rates_one_a_run_is_reward_trainers_run(center, tmp_path):
    """meta_lr=0 keeps every rate at 1: the reward model ends where RewardTrainer's own run ends (raw text pairs
    with margins, EOS and tokenisation by RewardTrainer, its center_rewards_coefficient), and the training logs
    carry RewardTrainer's metrics."""
    train, _ = _preference_set(24, 1)
    meta, _ = _preference_set(8, 2)
    kw = dict(**COMMON, max_steps=3, center_rewards_coefficient=center)
    plain_model, meta_model = _reward_model(), _reward_model()
    plain = trl.RewardTrainer(model=plain_model, args=trl.RewardConfig(output_dir=str(tmp_path / "p"), **kw),
                              train_dataset=train, processing_class=_tokenizer())
    plain.train()
    t = MetaRewardTrainer(model=meta_model, args=MetaRewardConfig(output_dir=str(tmp_path / "m"), meta_lr=0.0, **kw),
                          train_dataset=train, meta_dataset=meta, processing_class=_tokenizer())
    t.train()
    assert torch.equal(t.rates.instance, torch.ones(24)) and t._task.task == "preference"
    for (n, a), (_, b) in zip(plain_model.named_parameters(), meta_model.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)
    logged = [h for h in t.state.log_history if "loss" in h]
    assert all({"accuracy", "margin", "mean_reward", "num_tokens", "meta_loss"} <= set(h) for h in logged)
    want = [h["loss"] for h in plain.state.log_history if "loss" in h]
    assert [h["loss"] for h in logged] == pytest.approx(want, rel=1e-5)


def test_flipped_pairs_get_lower_rates_and_evaluation_is_reward_trainers(tmp_path):
    """30 % of the pairs in the wrong order, 16 trusted pairs: the rates move, stay finite, and the flipped pairs
    end with lower rates than the others (AUROC above chance); evaluation reports RewardTrainer's metrics."""
    train, flipped = _preference_set(96, 1, flip=0.3)
    meta, _ = _preference_set(16, 2)
    test, _ = _preference_set(32, 3)
    args = MetaRewardConfig(output_dir=str(tmp_path), **{**COMMON, "optim": "adamw_torch", "learning_rate": 3e-3,
                                                          "num_train_epochs": 6, "logging_steps": 10})
    t = MetaRewardTrainer(model=_reward_model(), args=args, train_dataset=train, meta_dataset=meta,
                          eval_dataset=test, processing_class=_tokenizer())
    t.train()
    rates = t.rates.instance
    assert torch.isfinite(rates).all() and not torch.equal(rates, torch.ones_like(rates))
    clean, noisy = rates[~flipped], rates[flipped]
    auroc = float((clean[:, None] > noisy[None, :]).float().mean() + 0.5 * (clean[:, None] == noisy[None, :]).float().mean())
    assert auroc > 0.65, auroc  # seen: 0.74 (chance: 0.5)
    metrics = t.evaluate()
    assert {"eval_loss", "eval_accuracy", "eval_margin"} <= set(metrics)


def test_a_labels_column_is_refused_naming_the_fix(tmp_path):
    train, _ = _preference_set(8, 1)
    meta, _ = _preference_set(4, 2)
    with pytest.raises(ValueError, match="'labels' column"):
        MetaRewardTrainer(model=_reward_model(), args=MetaRewardConfig(output_dir=str(tmp_path), **COMMON),
                          train_dataset=train.add_column("labels", [0] * 8), meta_dataset=meta,
                          processing_class=_tokenizer())


def test_the_pairs_margins_become_the_targets_and_a_set_that_is_not_a_dataset_is_refused_by_name():
    """The targets column: each pair's ``margin`` (0 without one); a meta set that is not a ``datasets.Dataset``
    is refused with the type it needs, not with an error from reading its length."""
    from hf_ddlr.reward import _with_targets

    pairs = datasets.Dataset.from_dict({"chosen": ["a", "b"], "rejected": ["c", "d"], "margin": [2, 0.5]})
    assert list(_with_targets(pairs, "train")["labels"]) == [2.0, 0.5]
    assert list(_with_targets(pairs.remove_columns("margin"), "train")["labels"]) == [0.0, 0.0]
    with pytest.raises(TypeError, match="needs the meta set as a datasets.Dataset, got generator"):
        _with_targets((row for row in pairs), "meta")


def ddp_run(out: str, per_device_batch: int, meta_lr: float = 0.1, plain: bool = False):
    """The runs of the DDP test: 4 steps of ``per_device_batch`` pairs per process, MetaRewardTrainer (every
    process's meta batch the whole meta set) or, ``plain``, trl.RewardTrainer."""
    train, _ = _preference_set(64, 1, flip=0.3)
    meta, _ = _preference_set(16, 2)
    kw = {**COMMON, "max_steps": 4, "per_device_train_batch_size": per_device_batch, "optim": "adamw_torch",
          "learning_rate": 3e-3}
    if plain:
        t = trl.RewardTrainer(model=_reward_model(), args=trl.RewardConfig(output_dir=out, **kw), train_dataset=train,
                              processing_class=_tokenizer())
    else:
        t = MetaRewardTrainer(model=_reward_model(), train_dataset=train, meta_dataset=meta, processing_class=_tokenizer(),
                              args=MetaRewardConfig(output_dir=out, meta_batch_size=len(meta), meta_lr=meta_lr, **kw))
    t.train()
    return t


def test_two_processes_hold_the_same_rates_and_train_as_reward_trainer_does_there(tmp_path):
    """torchrun, 2 processes x 4 pairs: both processes end with the identical rate table and model; the rates move;
    and with rates held at 1 the model ends where trl.RewardTrainer's own 2-process run ends."""
    check_two_process_pairs_run("test_trl_reward", tmp_path, n_train=64)


def test_a_run_resumed_from_its_checkpoint_ends_bit_for_bit_where_it_would_have(tmp_path):
    """Checkpoints hold the rates and the meta state next to RewardTrainer's: stopped at step 3 and resumed, the
    run ends with the same rates and weights as the run that was never stopped."""
    train, _ = _preference_set(48, 1, flip=0.3)
    meta, _ = _preference_set(16, 2)

    def trainer(out):
        kw = {**COMMON, "optim": "adamw_torch", "learning_rate": 3e-3, "max_steps": 6, "save_strategy": "steps",
              "save_steps": 3}
        return MetaRewardTrainer(model=_reward_model(), args=MetaRewardConfig(output_dir=str(out), **kw),
                                 train_dataset=train, meta_dataset=meta, processing_class=_tokenizer())

    full = trainer(tmp_path / "full")
    full.train()
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert not torch.equal(full.rates.instance, torch.ones(48))
    assert torch.equal(resumed.rates.instance, full.rates.instance)
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n


def test_the_per_layer_products_add_each_pairs_two_rows_and_train_like_forward_mode(tmp_path):
    """Without gradient checkpointing (RewardConfig turns it on) the per-layer products serve a reward model: each
    pair's product is the sum over its chosen and rejected rows. The first step's check against forward mode passes
    and the run trains as one with ``layerwise_dots=False`` (fp32: RewardConfig's bf16 autocast off)."""
    train, _ = _preference_set(64, 1, flip=0.3)
    meta, _ = _preference_set(16, 2)

    def run(layerwise: bool) -> MetaRewardTrainer:
        kw = {**COMMON, "optim": "adamw_torch", "learning_rate": 3e-3, "max_steps": 6, "layerwise_dots": layerwise,
              "gradient_checkpointing": False, "bf16": False}
        t = MetaRewardTrainer(model=_reward_model(), args=MetaRewardConfig(output_dir=str(tmp_path / str(layerwise)), **kw),
                              train_dataset=train, meta_dataset=meta, processing_class=_tokenizer())
        t.train()
        return t

    tape, forward = run(True), run(False)
    assert tape._layerwise_check.state == "verified" and forward._layerwise_check.state == "unchecked"
    assert not torch.equal(tape.rates.instance, torch.ones(64))
    torch.testing.assert_close(tape.rates.instance, forward.rates.instance, rtol=1e-4, atol=1e-5)
    for (n, a), b in zip(tape.model.named_parameters(), forward.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)


def test_trusted_pairs_without_the_rejected_answer_are_refused_by_name(tmp_path):
    train, _ = _preference_set(8, 1)
    meta, _ = _preference_set(4, 2)
    with pytest.raises(ValueError, match=r"meta dataset's columns \['chosen'\] are not the train set's text "
                                         r"columns \['chosen', 'rejected'\]"):
        MetaRewardTrainer(model=_reward_model(), args=MetaRewardConfig(output_dir=str(tmp_path), **COMMON),
                          train_dataset=train, meta_dataset=meta.remove_columns("rejected"),
                          processing_class=_tokenizer())


def test_trusted_pairs_without_margins_beside_train_pairs_with_them_train(tmp_path):
    """``margin`` is optional in RewardTrainer and the collator takes it out before the model: trusted pairs
    without it (beside train pairs with margins) are not refused as if the model needed it; their targets are 0."""
    train, _ = _preference_set(8, 1)
    meta, _ = _preference_set(4, 2)
    assert "margin" in train.column_names
    t = MetaRewardTrainer(model=_reward_model(), args=MetaRewardConfig(output_dir=str(tmp_path), **COMMON, max_steps=1),
                          train_dataset=train, meta_dataset=meta.remove_columns("margin"), processing_class=_tokenizer())
    assert list(t.meta_dataset.with_format(None)["labels"]) == [0.0] * 4
    t.train()
