"""hf_ddlr.MetaSFTTrainer: TRL's SFTTrainer with per-example learning rates.

A tiny Llama and a character-level tokenizer with a chat template, built locally; a conversational
prompt-completion task (reverse the user's string). SFTTrainer prepares the train set (chat template,
completion-only labels); the meta set must be prepared the same way, the rates keyed by the rows as given.
"""

from __future__ import annotations

import copy

import datasets
import pytest
import torch

trl = pytest.importorskip("trl")

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402

from hf_ddlr import MetaSFTConfig, MetaSFTTrainer  # noqa: E402
from hf_ddlr.meta.losses import task_loss  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SPECIAL = ["<pad>", "<eos>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<eos>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
COMMON = dict(report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, bf16=False,
              gradient_checkpointing=False, optim="sgd", lr_scheduler_type="constant", max_length=64,
              dataset_num_proc=None)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per letter, the chat roles and <eos>/<pad> as special tokens, and a chat template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL + list(LETTERS))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.add_special_tokens(SPECIAL)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def reverse_task(n: int, seed: int) -> datasets.Dataset:
    """``n`` conversational prompt-completion rows: the user gives 2-7 letters, the assistant reverses them."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, len(LETTERS), (int(torch.randint(2, 8, (1,), generator=g)),), generator=g)
        s = "".join(LETTERS[i] for i in ids)
        rows.append({"prompt": [{"role": "user", "content": s}], "completion": [{"role": "assistant", "content": s[::-1]}]})
    return datasets.Dataset.from_list(rows)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(SPECIAL) + len(LETTERS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
        bos_token_id=None))


def _kwargs(out, **kw) -> dict:
    return {**COMMON, "output_dir": str(out), "per_device_train_batch_size": 8, "learning_rate": 0.5,
            "logging_steps": 1, **kw}


def _args(out, **kw) -> MetaSFTConfig:
    return MetaSFTConfig(**_kwargs(out, **kw))


def _trainer(out, model=None, train=None, meta=True, **kw) -> MetaSFTTrainer:
    return MetaSFTTrainer(model=model or tiny_llama(), args=_args(out, **kw),
                          train_dataset=train if train is not None else reverse_task(32, seed=1),
                          meta_dataset=reverse_task(8, seed=2) if meta else None, processing_class=char_tokenizer())


class _SeenIndices(TrainerCallback):
    """The index column of every training micro-batch, per epoch."""

    def __init__(self, trainer: MetaSFTTrainer) -> None:
        self.trainer, self.epochs = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        seen = [int(i) for mb in self.trainer._window for i in mb.indices]
        if not self.epochs or len(self.epochs[-1]) >= len(self.trainer.train_dataset):
            self.epochs.append([])
        self.epochs[-1] += seen


# ---------------------------------------------------------------- (1) training with rates
def test_meta_sft_trainer_trains_and_rates_move(tmp_path):
    t = _trainer(tmp_path, max_steps=6)
    t.train()
    assert t.state.global_step == 6
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert all(h["meta_loss"] > 0 for h in t.state.log_history if "loss" in h)  # the meta step ran each step
    assert not torch.equal(t.rates.instance, torch.ones(32)) and bool(torch.isfinite(t.rates.instance).all())
    # SFTTrainer's training metrics are still logged (computed from the weighted step's logits)
    logged = t.state.log_history[0]
    assert 0 <= logged["mean_token_accuracy"] <= 1 and logged["entropy"] > 0 and logged["num_tokens"] > 0
    ev = t.evaluate(reverse_task(8, seed=3))  # SFTTrainer's evaluation: raw rows prepared, its loss and metrics
    assert ev["eval_loss"] > 0 and 0 <= ev["eval_mean_token_accuracy"] <= 1


def test_meta_set_is_prepared_like_the_train_set(tmp_path):
    """The meta set gets SFTTrainer's preparation with the train set's options: the same chat template, and
    labels -100 on the prompt (completion-only loss) — identical to the train set's rows for the same data."""
    meta = reverse_task(8, seed=2)
    t = MetaSFTTrainer(model=tiny_llama(), args=_args(tmp_path, max_steps=1), train_dataset=meta,
                       meta_dataset=meta, processing_class=char_tokenizer())
    for i in range(len(meta)):
        m, r = t.meta_dataset[i], t.train_dataset[i]
        assert m["input_ids"] == r["input_ids"] and m["labels"] == r["labels"]
        assert m["labels"][0] == -100 and m["labels"][-1] == 1  # the prompt is masked, the <eos> is a target


# ---------------------------------------------------------------- (2) completion-only loss
def _completion_mean_loss(model, tok, row) -> tuple[float, int]:
    """An independent per-example loss: the mean cross-entropy over the completion's tokens, from the model's
    logits on the example alone (unpadded), the prompt rendered with the chat template's generation prompt."""
    prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)
    full = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=True)
    p, ids = prompt["input_ids"], full["input_ids"]
    assert ids[: len(p)] == p
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    target = torch.tensor(ids[len(p):])
    return float(torch.nn.functional.cross_entropy(logits[len(p) - 1: -1], target)), len(target)


def test_completion_only_loss_counts_the_completion_tokens_only(tmp_path):
    """Each example's loss in the weighted step (ℓ_i / n_i of the window's micro-batches) is the mean over its
    completion tokens only, and its row (index) is the source row it came from."""
    train = reverse_task(32, seed=1)
    t = _trainer(tmp_path, train=train, max_steps=1, learning_rate=0.0)  # weights stay as in the forward
    t.train()
    (mb,) = t._window
    per_example = task_loss("causal_lm").per_example_mean(mb.losses, mb.labels)
    counts = task_loss("causal_lm").counts(mb.labels)
    for j, i in enumerate(mb.indices.tolist()):
        ref, n = _completion_mean_loss(t.model.eval(), t.processing_class, train[i])
        assert int(counts[j]) == n
        assert float(per_example[j]) == pytest.approx(ref, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- (3) meta_lr=0 is SFTTrainer
def test_meta_lr_zero_is_plain_sft_trainer(tmp_path):
    """With meta_lr=0 the rates stay 1: the run is trl.SFTTrainer's (same weights and logged losses), though
    the loss comes from the model's logits rather than SFTTrainer's fused LM head."""
    model = tiny_llama()
    ref_model = copy.deepcopy(model)
    kw = dict(max_steps=6, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    ref = trl.SFTTrainer(model=ref_model, args=trl.SFTConfig(**_kwargs(tmp_path / "ref", **kw)),
                         train_dataset=reverse_task(32, seed=1), processing_class=char_tokenizer())
    ref.train()
    t = _trainer(tmp_path / "meta", model=model, meta_lr=0.0, **kw)
    t.train()
    assert torch.equal(t.rates.instance, torch.ones(32))
    for (n, a), (_, b) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    got = [h["loss"] for h in t.state.log_history if "loss" in h]
    want = [h["loss"] for h in ref.state.log_history if "loss" in h]
    assert len(got) == len(want) == 6
    assert got == pytest.approx(want, rel=1e-5)
    for key in ("mean_token_accuracy", "entropy", "num_tokens"):  # SFTTrainer's metrics, from the logits here
        got = [h[key] for h in t.state.log_history if "loss" in h]
        assert got == pytest.approx([h[key] for h in ref.state.log_history if "loss" in h], rel=1e-5), key


# ---------------------------------------------------------------- (4) packing refused
@pytest.mark.parametrize("kw, name", [(dict(packing=True), "packing=True"), (dict(padding_free=True, max_length=None),
                                                                               "padding_free=True")])
def test_packing_and_padding_free_are_refused(tmp_path, kw, name):
    with pytest.raises(ValueError, match=rf"{name} is not supported with per-example learning rates.*Set "
                                         rf"{name.split('=')[0]}=False"):
        _trainer(tmp_path, max_steps=1, **kw)


def test_a_preparation_that_merges_rows_is_caught_after_it(tmp_path, monkeypatch):
    """Second line of defence, for a preparation step that merges rows without the packing flag: the prepared
    train set must keep the index of one source row per row."""
    import hf_ddlr.trl

    monkeypatch.setattr(hf_ddlr.trl, "_refuse_with_rates", lambda model, args: None)
    with pytest.raises(ValueError, match=r"did not keep one row per example with its 'sample_index' index"):
        _trainer(tmp_path, max_steps=1, packing=True)


def test_packing_is_sft_trainer_without_a_meta_set(tmp_path):
    """Without a meta set nothing is keyed by row: packing is SFTTrainer's."""
    t = _trainer(tmp_path, meta=False, max_steps=1, packing=True)
    assert t.rates is None and len(t.train_dataset) < 32


# ---------------------------------------------------------------- (5) the index column survives preparation
def test_every_source_row_is_seen_once_per_epoch(tmp_path):
    """SFTTrainer's preparation (with its own shuffle) keeps the index of the row as given: every epoch visits
    the indices 0..n-1 once each, and example i's rate is row i's."""
    t = _trainer(tmp_path, num_train_epochs=2, shuffle_dataset=True)
    seen = _SeenIndices(t)
    t.add_callback(seen)
    t.train()
    assert len(seen.epochs) == 2 and all(sorted(e) == list(range(32)) for e in seen.epochs)
    prepared = t.train_dataset.with_format(None)
    assert prepared["sample_index"] != list(range(32))  # the preparation shuffled the rows ...
    source = reverse_task(32, seed=1)
    tok = t.processing_class
    for row in prepared.select(range(4)):  # ... and each prepared row is its index's source row
        ids = tok.apply_chat_template(source[row["sample_index"]]["prompt"] + source[row["sample_index"]]["completion"],
                                      tokenize=True, return_dict=True)["input_ids"]
        assert row["input_ids"] == ids


def test_rows_dropped_by_truncation_keep_rate_one(tmp_path):
    """SFTTrainer drops the rows that truncation to max_length leaves without a target token: the rate table
    still has a rate per row as given, the dropped rows are never visited and keep rate 1 (with a warning)."""
    from transformers.testing_utils import CaptureLogger

    import hf_ddlr.trl

    with CaptureLogger(hf_ddlr.trl.logger) as log:
        t = _trainer(tmp_path, max_steps=4, max_length=8)  # a prompt of 5+ letters leaves no completion token
    kept = set(t.train_dataset.with_format(None)["sample_index"])
    assert 0 < len(kept) < 32 and t.rates.instance.shape == (32,)
    assert f"dropped {32 - len(kept)} of the 32 training examples" in log.out
    # the trusted rows it drops are said too; all of them dropped is refused at construction, naming the meta set
    left = len(t.meta_dataset)
    assert 0 < left < 8 and f"meta set dropped {8 - left} of its 8 trusted rows" in log.out
    long = reverse_task(8, seed=2).map(lambda r: {"prompt": [{**r["prompt"][0], "content": "x" * 20}]})
    with pytest.raises(ValueError, match=r"preparation of the meta set dropped all of its 8 rows \(no target token "
                                         r"left after truncation to max_length=8\).*Raise max_length"):
        MetaSFTTrainer(model=tiny_llama(), args=_args(tmp_path, max_steps=4, max_length=8),
                       train_dataset=reverse_task(32, seed=1), meta_dataset=long, processing_class=char_tokenizer())
    seen = _SeenIndices(t)
    t.add_callback(seen)
    t.train()
    visited = {i for e in seen.epochs for i in e}
    assert visited <= kept
    dropped = sorted(set(range(32)) - kept)
    assert torch.equal(t.rates.instance[dropped], torch.ones(len(dropped)))
    assert not torch.equal(t.rates.instance[sorted(visited)], torch.ones(len(visited)))


# ---------------------------------------------------------------- args, import, TRL's members
def test_a_metalrconfig_becomes_a_metasftconfig_with_its_meta_options(tmp_path):
    from hf_ddlr import MetaLRConfig

    args = MetaLRConfig(output_dir=str(tmp_path), meta_lr=0.25, lr_level="instance", max_steps=1, report_to=[],
                        use_cpu=True, save_strategy="no")
    t = MetaSFTTrainer(model=tiny_llama(), args=args, train_dataset=reverse_task(16, seed=1),
                       meta_dataset=reverse_task(4, seed=2), processing_class=char_tokenizer())
    assert type(t.args) is MetaSFTConfig and t.args.meta_lr == 0.25 and t.meta_args.meta_lr == 0.25
    assert t.args.max_steps == 1 and t.args.output_dir == str(tmp_path)


def test_a_model_name_is_refused_with_the_fix(tmp_path):
    with pytest.raises(TypeError, match=r"model object, not its name 'org/model'.*from_pretrained\('org/model'\)"):
        MetaSFTTrainer(model="org/model", args=_args(tmp_path), train_dataset=reverse_task(4, seed=1),
                       meta_dataset=reverse_task(4, seed=2))


@pytest.mark.parametrize("trl", ["missing", "1.12.0", "broken"])
def test_a_missing_old_or_broken_trl_is_refused_with_the_fix(trl):
    """In a fresh interpreter: TRL not installed, an older release that imports (pip does not upgrade it for a
    plain `pip install hf_ddlr`), or installed but failing to import. The core library still imports."""
    import subprocess
    import sys

    from hf_ddlr._trl_version import MIN_TRL

    fake = {"missing": "if name == 'trl':\n        raise importlib.metadata.PackageNotFoundError(name)\n    return real(name)",
            "broken": "return real(name)",
            "1.12.0": "return '1.12.0' if name == 'trl' else real(name)"}[trl]
    code = ("import importlib.metadata, sys\nreal = importlib.metadata.version\n"
            f"def version(name):\n    {fake}\nimportlib.metadata.version = version\n"
            + ("sys.modules['trl'] = None\n" if trl != "1.12.0" else "")
            + "import hf_ddlr\nassert hf_ddlr.MetaLRTrainer\n"
            "for name in ('MetaSFTTrainer', 'MetaRewardTrainer', 'MetaDPOTrainer'):\n"
            "    try:\n        getattr(hf_ddlr, name)\n    except ImportError as e:\n        print(name, '->', e)\n"
            "    else:\n        print(name, '-> imported')\n")
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(lines) == 3 and all("MetaSFTTrainer, MetaRewardTrainer, MetaDPOTrainer" in x for x in lines), lines
    want = {"missing": f"need TRL: pip install -U 'trl>={MIN_TRL}'",
            "1.12.0": f"need trl>={MIN_TRL}, found trl 1.12.0",
            "broken": f"is installed but did not import (import of trl halted; None in sys.modules): "
                      f"pip install --force-reinstall 'trl>={MIN_TRL}'"}[trl]
    assert all(want in x for x in lines), lines


def test_the_trl_version_check_compares_releases_not_strings():
    from hf_ddlr._trl_version import MIN_TRL, check_trl_version

    for ok in (MIN_TRL, f"{MIN_TRL}.3", "1.100.0", "2.0.0.dev0"):
        check_trl_version(ok)
    for old in ("1.9.0", "0.29.1", f"{MIN_TRL}.0rc1"):
        with pytest.raises(ImportError, match=rf"need trl>={MIN_TRL}, found trl {old}"):
            check_trl_version(old)


def test_the_sft_trainer_members_used_exist(tmp_path):
    """hf_ddlr.trl calls SFTTrainer._prepare_dataset and reads attributes SFTTrainer sets: checked against the
    installed TRL (private members can change in any release)."""
    import inspect

    params = list(inspect.signature(trl.SFTTrainer._prepare_dataset).parameters)[1:]
    assert params == ["dataset", "processing_class", "args", "packing", "formatting_func", "dataset_name"], params
    t = _trainer(tmp_path, max_steps=1)
    for name in ("_skip_prepare_dataset", "_formatting_func", "_metrics", "_total_train_tokens", "_tp_size",
                 "aux_loss_enabled"):
        assert hasattr(t, name), f"trl {trl.__version__}: SFTTrainer no longer sets {name}"


def test_peft_config_trains_only_the_lora_adapters_with_rates(tmp_path):
    """SFTTrainer's ``peft_config``: the model becomes a peft LoRA model, only the adapters move (the frozen base
    stays as it was), the rates are learned, and the meta step takes the per-layer products through them."""
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                          task_type="CAUSAL_LM")
    t = MetaSFTTrainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=reverse_task(32, seed=1),
                       meta_dataset=reverse_task(8, seed=2), processing_class=char_tokenizer(), peft_config=cfg)
    t.train()
    assert isinstance(t.model, peft.PeftModel) and t._layerwise == "verified"
    trained = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    moved = {n for n, p in t.model.named_parameters() if "lora_B" in n and p.detach().abs().max() > 0}
    assert moved  # lora_B starts at 0: it moved
    base = t.model.get_base_model()
    for n, p in base.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p.detach(), before[n.replace(".base_layer", "")]), n
    assert not torch.equal(t.rates.instance, torch.ones(32)) and bool(torch.isfinite(t.rates.instance).all())


def test_a_meta_set_in_another_format_than_the_train_set_is_refused(tmp_path):
    """TRL prepares the meta set with the train set's function: plain-text rows beside conversational ones (another
    template and masking, so the rates would follow another objective) or other columns are refused at
    construction, naming the meta set, instead of training silently or failing inside TRL."""
    conv = reverse_task(8, seed=2)
    plain = conv.map(lambda r: {"prompt": r["prompt"][0]["content"], "completion": r["completion"][0]["content"]})
    with pytest.raises(ValueError, match="train set's rows are conversational .* but the meta set's are plain text"):
        MetaSFTTrainer(model=tiny_llama(), args=_args(tmp_path), train_dataset=reverse_task(32, seed=1),
                       meta_dataset=plain, processing_class=char_tokenizer())
    with pytest.raises(ValueError, match=r"meta dataset's columns \['text'\] are not the train set's text columns "
                                         r"\['prompt', 'completion'\]"):
        MetaSFTTrainer(model=tiny_llama(), args=_args(tmp_path), train_dataset=reverse_task(32, seed=1),
                       meta_dataset=datasets.Dataset.from_list([{"text": "abc"}] * 4), processing_class=char_tokenizer())
    # not a datasets.Dataset: said as such, not as a set of no columns
    for meta, message in ((conv.to_list(), r"meta dataset is a list: TRL prepares it .* needs a datasets\.Dataset"),
                          (datasets.DatasetDict({"validation": conv}), r"DatasetDict \(splits \['validation'\]\): "
                                                                       r"pass one split")):
        with pytest.raises((TypeError, ValueError), match=message):
            MetaSFTTrainer(model=tiny_llama(), args=_args(tmp_path), train_dataset=reverse_task(32, seed=1),
                           meta_dataset=meta, processing_class=char_tokenizer())
