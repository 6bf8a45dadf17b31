"""Group-level rates (issue 16, part 2): ``lr_level="group"`` with ``group_column`` learns one rate per value of a
train-set column (the run's data-mixture weights); ``"both"`` with it is instance x group. Grouping by the label
is the class table; group rates work for every task; the group id never reaches the model; the rates resume
exactly from a checkpoint and are logged, recorded in the trajectory, plotted and put on the card."""

from __future__ import annotations

import math
import os

import datasets
import pytest
import safetensors.torch
import torch
from ddp_worker import _StopAt  # stops after a step, as an interrupted run would
from tiny import TinyMLP, make_split
from transformers import DataCollatorForSeq2Seq, LlamaConfig, LlamaForCausalLM

from hf_ddlr import MetaLRConfig, MetaLRTrainer
from hf_ddlr._groups import MAX_GROUPS
from hf_ddlr.meta import RateTable
from hf_ddlr.trainer import META_STATE_NAME
from hf_ddlr.trajectory import LRTrajectory, dataset_signature
from hf_ddlr.trajectory.card import write_artifacts

COMMON = dict(report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, optim="sgd",
              learning_rate=0.1, per_device_train_batch_size=8, logging_steps=1)
SOURCES = ["books", "forum", "web"]


def _args(path, **kw) -> MetaLRConfig:
    return MetaLRConfig(output_dir=str(path), **{**COMMON, **kw})


def _sourced(n: int, seed: int, corrupt: str | None = None) -> datasets.Dataset:
    """``make_split`` rows with a ``source`` column (every third row from each source); the rows of ``corrupt``
    have every label flipped to another class."""
    ds = make_split(n, seed=seed)
    src = [SOURCES[i % 3] for i in range(n)]
    labels = [(y + 1) % 3 if s == corrupt else y for y, s in zip(ds["label"], src)]
    return ds.remove_columns("label").add_column("label", labels).add_column("source", src)


def _trainer(path, train, meta=None, model=None, eval_dataset=None, **kw) -> MetaLRTrainer:
    torch.manual_seed(0)
    return MetaLRTrainer(model=model or TinyMLP(), args=_args(path, **kw), train_dataset=train,
                         meta_dataset=meta if meta is not None else make_split(16, seed=2), eval_dataset=eval_dataset)



# ---------------------------------------------------------------- (1) a corrupted source gets the lowest rate
def test_a_corrupted_source_learns_a_lower_rate_than_every_clean_one(tmp_path):
    t = _trainer(tmp_path, _sourced(240, seed=1, corrupt="forum"), make_split(48, seed=2), lr_level="group",
                 group_column="source", num_train_epochs=4, per_device_train_batch_size=16)
    t.train()
    assert t._groups.names == SOURCES and t._groups.sizes == [80, 80, 80]
    rates = dict(zip(SOURCES, t.rates.per_group.tolist()))
    assert rates["forum"] < 0.8 * min(rates["books"], rates["web"]), rates
    # the data mixture: the corrupted source's share of the weighted examples is below its share of the examples
    groups = {g[0]: g for g in t.lr_trajectory.summary()["groups"]}
    assert groups["forum"][4] < groups["forum"][3] == pytest.approx(1 / 3)


# ---------------------------------------------------------------- (2) grouping by the label is the class table
@pytest.mark.parametrize("level", ["class", "both"])
def test_grouping_by_the_label_reproduces_class_rates_bit_for_bit(level, tmp_path):
    train = make_split(64, seed=1, noise=0.3)
    by_class = _trainer(tmp_path / "c", train, lr_level=level, num_train_epochs=2)
    by_class.train()
    by_group = _trainer(tmp_path / "g", train, lr_level="group" if level == "class" else "both", group_column="label",
                        num_train_epochs=2)
    by_group.train()
    assert by_group.rates.per_class is None and by_class.rates.per_group is None
    assert torch.equal(by_group.rates.per_group, by_class.rates.per_class)
    assert not torch.equal(by_class.rates.per_class, torch.ones(3))  # the rates moved
    if level == "both":
        assert torch.equal(by_group.rates.instance, by_class.rates.instance)
    for (name, a), (_, b) in zip(by_class.model.state_dict().items(), by_group.model.state_dict().items()):
        assert torch.equal(a, b), name
    losses = lambda t: [(h["loss"], h.get("meta_loss")) for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert losses(by_group) == losses(by_class)
    rename = {f"group_rate_{k}": h.get(f"class_rate_{k}") for h in by_class.state.log_history[-2:-1]
              for k in ("mean", "min", "max")}
    assert {k: by_group.state.log_history[-2][k] for k in rename} == rename


def test_rate_table_group_lookup_keys_by_group_id():
    """The table reads its keys as group ids: two examples of one group share its rate, whatever their label."""
    table = RateTable(4, 3, "group", num_groups=2, meta_lr=0.5, scaling="raw")
    groups = torch.tensor([0, 0, 1, 1])
    table.update(None, groups, torch.tensor([1.0, 1.0, -1.0, 0.0]))
    assert torch.allclose(table.per_group, torch.tensor([0.0, 1.5]))
    assert torch.allclose(table.effective(None, groups), torch.tensor([0.0, 0.0, 1.5, 1.5]))


# ---------------------------------------------------------------- (3) every task: a causal LM
def _lm_rows(n: int, seed: int, languages: bool) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(4, 60, (int(torch.randint(4, 10, (1,), generator=g)),), generator=g).tolist()
        row = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids}
        if languages:
            row["language"] = ["de", "en", "fr"][i % 3]
        rows.append(row)
    return datasets.Dataset.from_list(rows)


def test_group_rates_train_a_causal_lm(tmp_path):
    from tiny_text import tiny_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                         pad_token_id=0))
    t = MetaLRTrainer(model=model, args=_args(tmp_path, lr_level="both", group_column="language", max_steps=4,
                                              max_grad_norm=0.0),
                      train_dataset=_lm_rows(24, 1, True), meta_dataset=_lm_rows(8, 2, False),
                      data_collator=DataCollatorForSeq2Seq(tiny_tokenizer()))
    t.train()
    assert t._task.task == "causal_lm"
    assert not torch.equal(t.rates.per_group, torch.ones(3)) and not torch.equal(t.rates.instance, torch.ones(24))
    logged = [h for h in t.state.log_history if "loss" in h]
    assert len(logged) == 4 and all(math.isfinite(h["loss"]) for h in logged)
    assert {"group_rate/de", "group_rate/en", "group_rate/fr"} <= set(logged[-1])
    assert logged[-1]["group_rate/en"] == pytest.approx(float(t.rates.per_group[1]))


# ---------------------------------------------------------------- (4) the group never reaches the model
class _Recording(TinyMLP):
    """TinyMLP whose forward takes (and records) any keyword argument but the Trainer's ``num_items_in_batch``."""

    seen: set

    def forward(self, x, labels=None, **kwargs):
        self.seen.update(set(kwargs) - {"num_items_in_batch"})
        return super().forward(x, labels)


@pytest.mark.parametrize("remove_unused_columns", [True, False])
def test_the_group_never_reaches_the_models_forward(remove_unused_columns, tmp_path):
    """With the column removal off the batches carry the (integer) group column: it is dropped before every
    forward (real step, meta passes, evaluation), as the index column is."""
    model = _Recording()
    model.seen = set()
    train = _sourced(32, seed=1).map(lambda r: {"source": SOURCES.index(r["source"])})
    t = _trainer(tmp_path, train, model=model, lr_level="group", group_column="source", max_steps=3,
                 remove_unused_columns=remove_unused_columns, eval_strategy="steps", eval_steps=2, eval_dataset=train)
    t.train()
    assert model.seen == set()
    assert not torch.equal(t.rates.per_group, torch.ones(3))


# ---------------------------------------------------------------- (5) errors
@pytest.mark.parametrize("kw, msg", [
    (dict(lr_level="group"), "lr_level='group' .* needs group_column: set group_column="),
    (dict(lr_level="instance", group_column="source"), "group_column='source' is only used by lr_level='group'"),
    (dict(lr_level="class", group_column="source"), "set lr_level='group' or 'both', or drop group_column"),
])
def test_options_without_a_group_level_or_column_are_refused(kw, msg, tmp_path):
    with pytest.raises(ValueError, match=msg):
        _args(tmp_path, **kw)


def test_a_missing_or_id_like_group_column_is_refused(tmp_path):
    train = _sourced(32, seed=1)
    with pytest.raises(ValueError, match=r"has no 'domain' column \(columns: .*'source'.*add_column") as info:
        _trainer(tmp_path, train, lr_level="group", group_column="domain")
    assert "sample_index" not in str(info.value)  # the trainer's own index column is not offered as a group
    many = make_split(MAX_GROUPS + 1, seed=1)
    many = many.add_column("doc_id", [f"d{i}" for i in range(len(many))])
    with pytest.raises(ValueError, match=f"{MAX_GROUPS + 1} distinct values, more than {MAX_GROUPS}.*id or text"):
        _trainer(tmp_path, many, lr_level="group", group_column="doc_id")
    mixed = train.remove_columns("source").add_column("source", [[1, 2]] * 32)
    with pytest.raises(ValueError, match="holds list values"):
        _trainer(tmp_path, mixed, lr_level="group", group_column="source")


def test_rate_table_refuses_a_group_level_without_groups():
    with pytest.raises(ValueError, match="needs num_groups"):
        RateTable(4, 3, "group")
    with pytest.raises(ValueError, match="has no group table"):
        RateTable(4, 3, "class", num_groups=2)


def test_group_rates_are_allowed_for_every_task_but_class_rates_are_not(tmp_path):
    from hf_ddlr._tasks import check_task_options
    from hf_ddlr.meta import task_loss

    lm = task_loss("causal_lm")
    check_task_options(lm, "group", "jvp", 0.0, "language")
    check_task_options(lm, "both", "jvp", 0.0, "language")
    with pytest.raises(ValueError, match="or group rates"):
        check_task_options(lm, "both", "jvp", 0.0, None)


# ---------------------------------------------------------------- (6) checkpoints
def test_resume_with_group_rates_is_exact(tmp_path):
    train = _sourced(48, seed=1, corrupt="web")
    kw = dict(lr_level="both", group_column="source", num_train_epochs=2, save_strategy="steps", save_steps=4)
    straight = _trainer(tmp_path / "straight", train, **kw)
    straight.train()
    out = tmp_path / "resume"
    stopped = _trainer(out, train, **kw)
    stopped.add_callback(_StopAt(4))
    stopped.train()
    assert stopped.state.global_step == 4
    ckpt = out / "checkpoint-4"
    state = safetensors.torch.load_file(os.path.join(ckpt, META_STATE_NAME))
    assert "per_group" in state and "per_class" not in state
    resumed = _trainer(out, train, **kw)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert torch.equal(resumed.rates.per_group, straight.rates.per_group)
    assert torch.equal(resumed.rates.instance, straight.rates.instance)
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed.lr_trajectory == straight.lr_trajectory
    # a class-level run cannot load the group checkpoint (nor the reverse): the tables are named apart
    wrong = _trainer(tmp_path / "wrong", train, lr_level="both", num_train_epochs=2)
    with pytest.raises(ValueError, match="'per_class' is missing.*group_column"):
        wrong.rates.load_state_dict(state)


def test_rate_table_group_state_round_trips():
    a = RateTable(5, 3, "both", num_groups=4, meta_lr=0.3)
    a.update(torch.tensor([0, 1, 2]), torch.tensor([0, 3, 3]), torch.tensor([0.5, -1.0, 2.0]))
    b = RateTable(5, 3, "both", num_groups=4, meta_lr=0.3)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.per_group, a.per_group) and torch.equal(b.instance, a.instance)
    assert not torch.equal(a.per_group, torch.ones(4))
    with pytest.raises(ValueError, match="per_group rate table has 4 entries but this group column has 2"):
        RateTable(5, 3, "both", num_groups=2).load_state_dict(a.state_dict())


# ---------------------------------------------------------------- (7) trajectory, plots, card
def test_trajectory_records_and_reloads_group_rates_with_their_names(tmp_path):
    t = _trainer(tmp_path / "run", _sourced(48, seed=1, corrupt="web"), lr_level="group", group_column="source",
                 num_train_epochs=2)
    t.train()
    traj = t.lr_trajectory
    assert traj.groups == {"column": "source", "names": SOURCES, "sizes": [16, 16, 16]}
    assert traj.num_group_snapshots == traj.num_steps + 1 and not traj.has_class_rates
    assert torch.equal(traj.final_group_rates, t.rates.per_group.cpu())
    assert torch.equal(traj.group_rates[0], torch.ones(3))
    traj.save_pretrained(tmp_path / "saved")
    loaded = LRTrajectory.from_pretrained(tmp_path / "saved")
    assert loaded == traj and loaded.groups["names"] == SOURCES and loaded.group_name(2) == "web"
    assert torch.equal(loaded.group_rates_at(step=traj.num_steps), t.rates.per_group.cpu())
    assert "group" in loaded.available_plots()
    md = loaded.summary_markdown()
    assert "data-mixture weights) by `source`" in md and "| web | 16 |" in md
    write_artifacts(traj, tmp_path / "card", repo_id="user/run")  # what MetaLRTrainer.create_model_card writes
    card = (tmp_path / "card" / "README.md").read_text()
    assert "per-group learning-rate multipliers (data-mixture weights by `source`)" in card
    assert "| books | 16 |" in card and (tmp_path / "card" / "lr_trajectory_group.png").is_file()


def test_replay_of_group_rates_needs_the_same_groups(tmp_path):
    train = _sourced(48, seed=1)
    learned = _trainer(tmp_path / "learn", train, lr_level="group", group_column="source", num_train_epochs=1)
    learned.train()
    learned.lr_trajectory.save_pretrained(tmp_path / "traj")
    args = _args(tmp_path / "replay", lr_level="group", group_column="source", num_train_epochs=1,
                 replay_trajectory=str(tmp_path / "traj"))
    torch.manual_seed(0)
    replay = MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=train)
    replay.train()
    assert torch.equal(replay.rates.per_group, learned.rates.per_group)
    other = train.remove_columns("source").add_column("source", ["a", "b"] * 24)
    with pytest.raises(ValueError, match=r"keyed by the groups \['books', 'forum', 'web'\]"):
        MetaLRTrainer(model=TinyMLP(), args=_args(tmp_path / "other", lr_level="group", group_column="source",
                                                   replay_trajectory=str(tmp_path / "traj"), check_fingerprint=False),
                      train_dataset=other)


def test_kfold_average_of_group_rates_replays_on_the_full_train_set(tmp_path):
    """Two fold runs with group rates: the average holds the mean of their group-rate snapshots under the same
    group names, and replays on the full train set; folds with other groups are refused."""
    full = _sourced(48, seed=1, corrupt="web")
    folds = [full.select(range(0, 24)), full.select(range(24, 48))]
    trajs = []
    for k, part in enumerate(folds):
        t = _trainer(tmp_path / f"fold{k}", part, lr_level="group", group_column="source", num_train_epochs=2)
        t.train()
        trajs.append(t.lr_trajectory)
    assert not torch.equal(trajs[0].final_group_rates, trajs[1].final_group_rates)
    avg = LRTrajectory.average(trajs, dataset=dataset_signature(full))  # replayed on the full train set
    assert avg.groups["names"] == SOURCES and avg.groups["column"] == "source"
    assert torch.equal(avg.group_rates, (trajs[0].group_rates + trajs[1].group_rates) / 2)
    assert torch.equal(avg.group_steps, trajs[0].group_steps)
    avg.save_pretrained(tmp_path / "avg")
    # the folds ran 2 epochs of 3 steps, the full set's 2 epochs are 12 steps: replayed by epoch, it ends on
    # the folds' last (averaged) snapshot
    args = _args(tmp_path / "replay", lr_level="group", group_column="source", num_train_epochs=2,
                 replay_trajectory=str(tmp_path / "avg"))
    torch.manual_seed(0)
    replay = MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=full)
    replay.train()
    assert torch.allclose(replay.rates.per_group.cpu(), avg.final_group_rates)
    other = _trainer(tmp_path / "other", folds[0].remove_columns("source").add_column("source", ["a", "b"] * 12),
                     lr_level="group", group_column="source", num_train_epochs=2)
    other.train()
    with pytest.raises(ValueError, match="cannot average group rates: trajectory 1 has the groups"):
        LRTrajectory.average([trajs[0], other.lr_trajectory])
