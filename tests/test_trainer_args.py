"""What MetaLRTrainer accepts at construction: any TrainingArguments (a subclass with its own fields, TRL's
configs) kept as the user's object, meta options read from it; meta sets that would fail at step 1 refused
with the fix; the replay's fingerprint check reachable from the config."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import datasets
import pytest
import torch
from tiny import TinyMLP, make_split
from tiny_text import text_data_splits, tiny_bert
from transformers import (
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_ddlr import MetaLRConfig, MetaLRTrainer
from hf_ddlr.config import MetaLROptions

COMMON = dict(report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)


@dataclass
class MyArgs(TrainingArguments):
    """A project's own arguments: TrainingArguments plus fields the Trainer knows nothing about."""

    experiment_tag: str = field(default="baseline", metadata={"help": "A name for the run."})
    extra_epochs: int = field(default=0, metadata={"help": "Not used by the Trainer."})


@dataclass
class MyArgsWithMetaLR(TrainingArguments):
    """Arguments that carry two of the meta options themselves (the rest take MetaLRConfig's defaults)."""

    experiment_tag: str = "tuned"
    meta_lr: float = 0.5
    lr_level: str = "both"


# ---------------------------------------------------------------- args of other classes
def test_trainingarguments_subclass_without_meta_set_is_the_trainer(tmp_path):
    """No meta set: MetaLRTrainer with the user's args object trains bit-identically to Trainer with it."""
    args = MyArgs(output_dir=str(tmp_path), experiment_tag="mine", extra_epochs=2, per_device_train_batch_size=8,
                  num_train_epochs=2, learning_rate=0.05, weight_decay=0.01, **COMMON)
    before = args.to_dict()
    torch.manual_seed(0)
    m1 = TinyMLP(bn=True, dropout=0.2)
    m2 = copy.deepcopy(m1)
    train = make_split(48, seed=3)
    Trainer(model=m1, args=args, train_dataset=train).train()
    t = MetaLRTrainer(model=m2, args=args, train_dataset=train)
    assert t.args is args and type(t.args) is MyArgs
    t.train()
    assert t.rates is None and not hasattr(t.args, "meta_lr")  # nothing was added to the user's object
    assert t.args.to_dict() == before
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n


def _my_args_run(out, stop_at=None, resume=False) -> MetaLRTrainer:
    args = MyArgs(output_dir=str(out), experiment_tag="noisy-40", extra_epochs=1, optim="sgd", learning_rate=0.3,
                  lr_scheduler_type="constant", per_device_train_batch_size=8, max_steps=6, logging_steps=1,
                  **{**COMMON, "save_strategy": "steps"}, save_steps=3)
    torch.manual_seed(0)
    t = MetaLRTrainer(model=TinyMLP(hidden=12), args=args, train_dataset=make_split(32, seed=11),
                      meta_dataset=make_split(8, seed=12))
    if stop_at is not None:
        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                control.should_training_stop = state.global_step >= stop_at

        t.add_callback(Stop())
    t.train(resume_from_checkpoint=True if resume else None)
    return t


def test_trainingarguments_subclass_with_meta_set_keeps_its_fields_and_resumes_exactly(tmp_path):
    straight = _my_args_run(tmp_path / "straight")
    assert type(straight.args) is MyArgs and straight.args.experiment_tag == "noisy-40"
    assert straight.meta_args == MetaLROptions()  # every meta option at MetaLRConfig's default
    assert not torch.equal(straight.rates.instance, torch.ones(32))
    # the checkpoint's training arguments are the user's: their class, their fields, no meta options added
    ckpt = tmp_path / "straight" / "checkpoint-3"
    saved = torch.load(ckpt / "training_args.bin", weights_only=False)
    assert type(saved) is MyArgs and saved.experiment_tag == "noisy-40" and saved.extra_epochs == 1
    assert saved.to_dict() == straight.args.to_dict() and "meta_lr" not in saved.to_dict()
    assert '"experiment_tag": "noisy-40"' in saved.to_json_string()

    _my_args_run(tmp_path / "resume", stop_at=3)
    resumed = _my_args_run(tmp_path / "resume", resume=True)
    assert resumed.state.global_step == 6
    for (n, p), (_, q) in zip(resumed.model.named_parameters(), straight.model.named_parameters()):
        assert torch.equal(p, q), n
    assert torch.equal(resumed.rates.instance, straight.rates.instance)
    assert resumed.lr_trajectory == straight.lr_trajectory


def test_meta_options_are_read_from_the_args_where_they_exist(tmp_path):
    args = MyArgsWithMetaLR(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, **COMMON)
    t = MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=make_split(16, seed=1),
                      meta_dataset=make_split(8, seed=2))
    assert (t.meta_args.meta_lr, t.meta_args.lr_level) == (0.5, "both")
    assert t.meta_args.meta_strategy == "jvp" and t.meta_args.keep_history  # the rest: MetaLRConfig's defaults
    assert t.rates.per_class is not None and t.rates.meta_lr == 0.5
    assert t.lr_trajectory.config["meta_lr"] == 0.5


@pytest.mark.parametrize(
    "kw, msg",
    [(dict(lr_level="instanse"), "lr_level='instanse' is not valid"),
     (dict(meta_lr=-1.0), "meta_lr must be >= 0")],
)
def test_meta_options_on_other_args_are_validated_like_metalrconfig(tmp_path, kw, msg):
    args = MyArgsWithMetaLR(output_dir=str(tmp_path), **COMMON, **kw)  # their class knows no rule for them
    with pytest.raises(ValueError, match=msg):
        MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=make_split(16, seed=1),
                      meta_dataset=make_split(8, seed=2))


def test_learn_weight_decay_on_other_args_needs_a_starting_value(tmp_path):
    @dataclass
    class WithWd(TrainingArguments):
        learn_weight_decay: bool = True

    args = WithWd(output_dir=str(tmp_path), weight_decay=0.0, **COMMON)
    with pytest.raises(ValueError, match="needs a starting value: set weight_decay > 0"):
        MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=make_split(16, seed=1),
                      meta_dataset=make_split(8, seed=2))


def test_metaloptions_mix_in_gives_another_config_the_meta_flags():
    @dataclass
    class Mixed(MetaLROptions, MyArgs):
        pass

    (args,) = HfArgumentParser(Mixed).parse_args_into_dataclasses(
        ["--output_dir", "x", "--experiment_tag", "t", "--meta_lr", "0.2", "--lr_level", "class", "--use_cpu"]
    )
    assert (args.experiment_tag, args.meta_lr, args.lr_level, args.output_dir) == ("t", 0.2, "class", "x")
    with pytest.raises(ValueError, match="lr_level='x' is not valid"):
        Mixed(output_dir="x", lr_level="x")


def test_args_that_are_not_trainingarguments_are_refused():
    with pytest.raises(TypeError, match="args must be a TrainingArguments .* got dict"):
        MetaLRTrainer(model=TinyMLP(), args={"output_dir": "x"}, train_dataset=make_split(16, seed=1))


def test_trl_sftconfig_is_accepted_as_args(tmp_path):
    """TRL's configs are TrainingArguments subclasses with their own fields (and bf16 / gradient checkpointing
    on by default): MetaLRTrainer keeps the SFTConfig and learns rates with a meta set."""
    trl = pytest.importorskip("trl")
    tok, train, meta = text_data_splits()
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, optim="sgd",
                         learning_rate=0.5, lr_scheduler_type="constant", logging_steps=1, max_length=64,
                         **COMMON)
    t = MetaLRTrainer(model=tiny_bert(), args=args, train_dataset=train, meta_dataset=meta,
                      data_collator=DataCollatorWithPadding(tok), processing_class=tok)
    assert t.args is args and type(t.args) is trl.SFTConfig
    t.train()
    assert t.state.global_step == 2
    assert all(h.get("meta_loss", 0) > 0 for h in t.state.log_history if "loss" in h)
    assert not torch.equal(t.rates.instance, torch.ones(len(train)))
    assert bool(torch.isfinite(t.rates.instance).all())
    t.save_model()
    saved = torch.load(os.path.join(tmp_path, "training_args.bin"), weights_only=False)
    assert type(saved) is trl.SFTConfig and saved.max_length == 64 and saved.to_dict() == args.to_dict()


# ---------------------------------------------------------------- meta sets that would fail at step 1
def test_untokenised_meta_set_is_refused_at_construction(tmp_path):
    tok, train, _ = text_data_splits()
    raw = datasets.Dataset.from_list([{"text": "w1 w2 w3", "label": 0}, {"text": "w50 w60", "label": 1}])
    with pytest.raises(ValueError, match=r"meta dataset has no 'attention_mask', 'input_ids' columns.*"
                                         r"meta set only \['label', 'text'\].*same function as the train set"):
        MetaLRTrainer(model=tiny_bert(), args=MetaLRConfig(output_dir=str(tmp_path), **COMMON),
                      train_dataset=train, meta_dataset=raw, data_collator=DataCollatorWithPadding(tok))


def test_meta_set_without_a_model_input_is_refused(tmp_path):
    meta = make_split(8, seed=2).rename_column("x", "features")
    with pytest.raises(ValueError, match=r"meta dataset has no 'x' column"):
        MetaLRTrainer(model=TinyMLP(), args=MetaLRConfig(output_dir=str(tmp_path), **COMMON),
                      train_dataset=make_split(16, seed=1), meta_dataset=meta)
    # what the model does not take is not required: the train set's extra columns are dropped anyway
    train = make_split(16, seed=1).add_column("is_noisy", [False] * 16)
    MetaLRTrainer(model=TinyMLP(), args=MetaLRConfig(output_dir=str(tmp_path), **COMMON), train_dataset=train,
                  meta_dataset=make_split(8, seed=2))


def _as_names(ds: datasets.Dataset) -> datasets.Dataset:
    names = ["cat", "dog", "bird"]
    return ds.map(lambda r: {"label": names[r["label"]]})


def test_string_labels_are_refused_at_construction(tmp_path):
    args = MetaLRConfig(output_dir=str(tmp_path), **COMMON)
    with pytest.raises(ValueError, match=r"meta dataset's 'label' column holds strings \(row 0: '\w+'\).*"
                                         r"cast_column\('label', train_dataset.features\['label'\]\).*label2id"):
        MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=make_split(16, seed=1),
                      meta_dataset=_as_names(make_split(8, seed=2)))
    with pytest.raises(ValueError, match=r"train dataset's 'label' column holds strings.*class_encode_column"):
        MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=_as_names(make_split(16, seed=1)),
                      meta_dataset=make_split(8, seed=2))
    floats = make_split(8, seed=2).cast_column("label", datasets.Value("float32"))
    with pytest.raises(ValueError, match=r"meta dataset's 'label' column holds float values"):
        MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=make_split(16, seed=1), meta_dataset=floats)
    # the mapping the message suggests fixes it
    train = make_split(16, seed=1).cast_column("label", datasets.ClassLabel(names=["cat", "dog", "bird"]))
    fixed = _as_names(make_split(8, seed=2)).cast_column("label", train.features["label"])
    MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=train, meta_dataset=fixed)


def test_torch_meta_set_with_string_labels_is_refused(tmp_path):
    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"x": torch.zeros(6), "label": "cat"}

    with pytest.raises(ValueError, match="meta dataset's 'label' column holds strings"):
        MetaLRTrainer(model=TinyMLP(), args=MetaLRConfig(output_dir=str(tmp_path), **COMMON),
                      train_dataset=make_split(16, seed=1), meta_dataset=Rows(), num_labels=3)


class _Rows(torch.utils.data.Dataset):
    """A torch meta set of dict items: ``labels[i]`` is row i's label."""

    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"x": torch.zeros(6), "label": torch.tensor(self.labels[i])}


def test_torch_meta_set_with_a_label_out_of_range_is_refused_at_construction(tmp_path):
    """A small torch meta set has every label read at construction: one out of the label space would otherwise
    fail inside the loss at the first meta step that samples it."""
    args = MetaLRConfig(output_dir=str(tmp_path), **COMMON)
    with pytest.raises(ValueError, match=r"meta dataset has labels \[5\] outside the model's label space 0\.\.2"):
        MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=make_split(16, seed=1),
                      meta_dataset=_Rows([0, 1, 2, 1, 0, 1, 2, 5]), num_labels=3)
    MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=make_split(16, seed=1),
                  meta_dataset=_Rows([0, 1, 2, 1, 0, 1, 2, 2]), num_labels=3)


@pytest.mark.parametrize("which", ["train", "meta"])
def test_a_torch_set_of_tuples_is_told_to_return_dicts(tmp_path, which):
    """A TensorDataset's (x, y) rows have no field names for the collator or the label: refused at construction
    saying so, not as a missing 'labels' column with a datasets-only rename."""
    sets = {"train": make_split(16, seed=1), "meta": make_split(8, seed=2)}
    sets[which] = torch.utils.data.TensorDataset(torch.randn(8, 6), torch.randint(0, 3, (8,)))
    with pytest.raises(ValueError, match=rf"The {which} dataset's rows are tuples, not dicts.*Return a dict from "
                                         r"__getitem__"):
        MetaLRTrainer(model=TinyMLP(), args=MetaLRConfig(output_dir=str(tmp_path), **COMMON),
                      train_dataset=sets["train"], meta_dataset=sets["meta"], num_labels=3)


@pytest.mark.parametrize("kind", ["datasets", "torch"])
def test_an_empty_meta_set_is_refused_at_construction(tmp_path, kind):
    meta = make_split(8, seed=2).select([]) if kind == "datasets" else _Rows([])
    with pytest.raises(ValueError, match="The meta dataset is empty"):
        MetaLRTrainer(model=TinyMLP(), args=MetaLRConfig(output_dir=str(tmp_path), **COMMON),
                      train_dataset=make_split(16, seed=1), meta_dataset=meta, num_labels=3)


def test_compute_loss_func_is_refused_with_rates(tmp_path):
    """compute_loss_func gives one loss per batch, which no per-example rate can weight: refused, not ignored."""
    def loss_func(outputs, labels, num_items_in_batch=None):
        return torch.nn.functional.cross_entropy(outputs.logits, labels)

    args = MetaLRConfig(output_dir=str(tmp_path), **COMMON)
    with pytest.raises(ValueError, match="does not use compute_loss_func"):
        MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=make_split(16, seed=1),
                      meta_dataset=make_split(8, seed=2), compute_loss_func=loss_func)
    MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=make_split(16, seed=1),  # no meta set: the Trainer's
                  compute_loss_func=loss_func)


def test_a_compute_loss_that_skips_the_weighted_loss_stops_the_run(tmp_path):
    """A subclass whose compute_loss never calls MetaLRTrainer.compute_loss for training would train without any
    rate: the first step says so. One that calls it while training and customises evaluation trains as usual."""
    class Own(MetaLRTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(**{k: v for k, v in inputs.items() if k not in ("labels", "label")})
            loss = torch.nn.functional.cross_entropy(out.logits, inputs["labels"])
            return (loss, out) if return_outputs else loss

    class EvalOnly(Own):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                return MetaLRTrainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    args = MetaLRConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, **COMMON)
    data = dict(train_dataset=make_split(16, seed=1), meta_dataset=make_split(8, seed=2))
    with pytest.raises(RuntimeError, match="Own.compute_loss returned a training loss without calling"):
        Own(model=TinyMLP(), args=args, **data).train()
    fine = EvalOnly(model=TinyMLP(), args=args, eval_dataset=make_split(8, seed=3), **data)
    fine.train()
    assert fine.lr_trajectory.num_steps == 2 and "eval_loss" in fine.evaluate()


def test_labels_under_another_name_are_refused_with_the_rename(tmp_path):
    """The rates read labels from 'labels' / 'label': another column, named by label_names or not, is refused at
    construction with the rename that fixes it; a DatasetDict given for a set is told to pass a split."""
    train, meta = make_split(16, seed=1), make_split(8, seed=2)
    renamed = dict(train_dataset=train.rename_column("label", "sentiment"),
                   meta_dataset=meta.rename_column("label", "sentiment"))
    args = MetaLRConfig(output_dir=str(tmp_path), label_names=["sentiment"], **COMMON)
    with pytest.raises(ValueError, match=r"label_names=\['sentiment'\].*rename_column\('sentiment', 'labels'\)"):
        MetaLRTrainer(model=TinyMLP(), args=args, **renamed)
    plain = MetaLRConfig(output_dir=str(tmp_path), **COMMON)
    with pytest.raises(ValueError, match=r"train dataset has no 'labels'/'label' column \(its columns: \['x', "
                                         r"'sentiment'\]\).*rename_column"):
        MetaLRTrainer(model=TinyMLP(), args=plain, **renamed)
    with pytest.raises(ValueError, match=r"meta dataset is a DatasetDict \(splits \['meta', 'test'\]\): pass one "
                                         r"split, e.g. meta_dataset=dataset_dict\['meta'\]"):
        MetaLRTrainer(model=TinyMLP(), args=plain, train_dataset=train,
                      meta_dataset=datasets.DatasetDict(meta=meta, test=meta))
    MetaLRTrainer(model=TinyMLP(), args=MetaLRConfig(output_dir=str(tmp_path), label_names=["labels"], **COMMON),
                  train_dataset=train, meta_dataset=meta)


@pytest.mark.parametrize("which", ["train", "meta"])
def test_a_dict_of_columns_is_refused_with_the_wrapper_that_fixes_it(tmp_path, which):
    """A dict of columns (e.g. Dataset.to_dict()) has a len() -- its number of keys -- and failed with KeyError 0 at
    the first batch; it is refused at construction, naming its keys and Dataset.from_dict."""
    sets = {"train": make_split(16, seed=1), "meta": make_split(8, seed=2)}
    sets[which] = sets[which].to_dict()
    with pytest.raises(ValueError, match=rf"The {which} dataset is a dict with keys \['label', 'x'\], not a dataset "
                                         r"of rows: wrap a dict of columns as datasets\.Dataset\.from_dict"):
        MetaLRTrainer(model=TinyMLP(), args=MetaLRConfig(output_dir=str(tmp_path), **COMMON),
                      train_dataset=sets["train"], meta_dataset=sets["meta"])


# ---------------------------------------------------------------- replay: check_fingerprint
def test_check_fingerprint_is_an_option_of_the_config(tmp_path):
    train = make_split(40, seed=1)
    orig = MetaLRTrainer(
        model=TinyMLP(), args=MetaLRConfig(output_dir=str(tmp_path / "orig"), optim="sgd", max_steps=2,
                                           per_device_train_batch_size=8, weight_decay=0.01,
                                           learn_weight_decay=True, **COMMON),
        train_dataset=train, meta_dataset=make_split(16, seed=2))
    orig.train()
    orig.save_model()
    other = make_split(40, seed=9)  # same size, other rows: another fingerprint

    def replay(ds, **kw):
        args = MetaLRConfig(output_dir=str(tmp_path / "r"), replay_trajectory=str(tmp_path / "orig"), optim="sgd",
                            max_steps=2, per_device_train_batch_size=8, **COMMON, **kw)
        return MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=ds)

    with pytest.raises(ValueError, match=r"fingerprint mismatch.*set check_fingerprint=False"):
        replay(other)
    t = replay(other, check_fingerprint=False)
    t.train()
    assert t.state.global_step == 2 and t.lr_trajectory.config["mode"] == "replay"
    # the replayed trajectory learned the weight decay: the trainer replays it without touching the user's args
    assert t.meta_args.learn_weight_decay and not t.args.learn_weight_decay
    with pytest.raises(ValueError, match="learned on 40 examples .* has 41"):  # a size mismatch: always refused
        replay(make_split(41, seed=1), check_fingerprint=False)
    (parsed,) = HfArgumentParser(MetaLRConfig).parse_args_into_dataclasses(
        ["--output_dir", "x", "--check_fingerprint", "false"])
    assert parsed.check_fingerprint is False


def test_centred_instance_rates_need_instance_rates(tmp_path):
    with pytest.raises(ValueError, match="center_instance_rates=True .* no instance rates"):
        MetaLRConfig(output_dir=str(tmp_path), **COMMON, lr_level="class", center_instance_rates=True)


def test_instance_rate_center_needs_centring_and_a_known_statistic(tmp_path):
    with pytest.raises(ValueError, match="center_instance_rates is off: set center_instance_rates=True"):
        MetaLRConfig(output_dir=str(tmp_path), **COMMON, center_instance_rates=False, instance_rate_center="median")
    # unset, the centring follows what asks for it
    assert MetaLRConfig(output_dir=str(tmp_path), **COMMON, instance_rate_center="median").center_instance_rates is None
    with pytest.raises(ValueError, match="instance_rate_center='mode' is not valid"):
        MetaLRConfig(output_dir=str(tmp_path), **COMMON, center_instance_rates=True, instance_rate_center="mode")
    args = MetaLRConfig(output_dir=str(tmp_path), **COMMON, center_instance_rates=True, instance_rate_center="median")
    assert args.instance_rate_center == "median"


def test_instance_rate_at_cap_needs_instance_rates_and_a_known_rule(tmp_path):
    with pytest.raises(ValueError, match="instance_rate_at_cap='relative' changes .* no instance rates"):
        MetaLRConfig(output_dir=str(tmp_path), **COMMON, lr_level="class", instance_rate_at_cap="relative")
    with pytest.raises(ValueError, match="instance_rate_at_cap='wrap' is not valid"):
        MetaLRConfig(output_dir=str(tmp_path), **COMMON, instance_rate_at_cap="wrap")
    assert MetaLRConfig(output_dir=str(tmp_path), **COMMON, instance_rate_at_cap="relative").instance_rate_at_cap \
        == "relative"
    assert MetaLRConfig(output_dir=str(tmp_path), **COMMON).instance_rate_at_cap == "auto"  # (resolved by the trainer)
    assert MetaLRConfig(output_dir=str(tmp_path), **COMMON, lr_level="class").instance_rate_at_cap == "auto"


def test_lookahead_step_reaches_the_lookahead_and_the_trajectory(tmp_path):
    """lookahead_step is handed to the lookahead's description of the optimizer and recorded with the run
    (left out of the recorded settings at its default 1, so other runs' settings are as they were)."""
    kw = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, **COMMON)
    t = MetaLRTrainer(model=TinyMLP(), args=MetaLRConfig(lookahead_step=0.0, **kw),
                      train_dataset=make_split(16, seed=1), meta_dataset=make_split(8, seed=2))
    t.train()
    specs = t._lookahead_specs(dict(t.model.named_parameters()))
    assert specs and all(s.step_fraction == 0.0 for s in specs.values())
    assert t.lr_trajectory.config["lookahead_step"] == 0.0
    default = MetaLRTrainer(model=TinyMLP(), args=MetaLRConfig(**kw), train_dataset=make_split(16, seed=1),
                            meta_dataset=make_split(8, seed=2))
    assert "lookahead_step" not in default.lr_trajectory.config
    with pytest.raises(ValueError, match=r"lookahead_step must be in \[0, 1\], got 1.5.*1: the paper's"):
        MetaLRConfig(lookahead_step=1.5, **kw)
