"""TRL's DPOTrainer with a rate per preference pair (``MetaDPOTrainer``): the pair's DPO loss and its meta-gradient
against an independent computation, DPOTrainer's own run at rates 1, the rates of pairs whose order was flipped,
the per-layer products, resume, and what is refused."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
import torch.nn.functional as F

trl = pytest.importorskip("trl")

from launching import check_two_process_pairs_run  # noqa: E402
from test_trl_sft import LETTERS, char_tokenizer, tiny_llama  # noqa: E402

from hf_ddlr import MetaDPOConfig, MetaDPOTrainer  # noqa: E402
from hf_ddlr._batches import probe_batches  # noqa: E402
from hf_ddlr._meta_parameters import meta_parameters_choice  # noqa: E402
from hf_ddlr.meta import MetaBatch, MicroBatch, meta_gradients, param_specs  # noqa: E402
from hf_ddlr.meta.losses import dpo_loss, dpo_task, pack_dpo_labels  # noqa: E402

COMMON = dict(report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, bf16=False,
              gradient_checkpointing=False, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
              logging_steps=1, per_device_train_batch_size=8, max_grad_norm=0.0, dataset_num_proc=None)


def preference_pairs(n: int, seed: int, flip: float = 0.0) -> tuple[datasets.Dataset, torch.Tensor]:
    """``n`` pairs of 2-5 letter answers to a random 2-4 letter prompt: the chosen answer draws its letters mostly
    (80 %) from a-m, the rejected one from n-z; the order of a share ``flip`` of the pairs is swapped (the flipped
    rows are returned)."""
    g = torch.Generator().manual_seed(seed)
    flipped = torch.rand(n, generator=g) < flip

    def letters(ids: torch.Tensor) -> str:
        return "".join(LETTERS[int(i)] for i in ids)

    def answer(low: bool) -> str:
        k = int(torch.randint(2, 6, (1,), generator=g))
        own = torch.rand(k, generator=g) < 0.8
        return letters(torch.randint(0, 13, (k,), generator=g) + torch.where(own == low, 0, 13))

    rows = []
    for i in range(n):
        prompt = letters(torch.randint(0, 26, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g))
        good, bad = answer(True), answer(False)
        if flipped[i]:
            good, bad = bad, good
        rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
    return datasets.Dataset.from_list(rows), flipped


def _policy():
    model = tiny_llama()
    model.config._attn_implementation = "eager"  # forward-mode AD through attention
    return model


def _gpt2_float64():
    """A tiny GPT-2 in float64 for the central differences (Llama's RMSNorm computes in float32 whatever the model's
    dtype, which leaves float32 noise in a float64 loss)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(char_tokenizer()), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, eos_token_id=1)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg).double()


def _plain(out, model, train, **kw) -> trl.DPOTrainer:
    """trl.DPOTrainer with its reference model computed per batch (a copy of the initial policy)."""
    return trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=trl.DPOConfig(output_dir=str(out), **kw),
                          train_dataset=train, processing_class=char_tokenizer())


def _meta(out, train, meta, model=None, **kw) -> MetaDPOTrainer:
    return MetaDPOTrainer(model=model or _policy(), args=MetaDPOConfig(output_dir=str(out), **kw), train_dataset=train,
                          meta_dataset=meta, processing_class=char_tokenizer())


def _by_hand(model, input_ids, attention_mask, completion, ref, beta):
    """Every pair's DPO loss written out: log-softmax, the next token's log-probability, summed over the completion."""
    logp = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1], dim=-1)
    token = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1) * completion[:, 1:]
    seq = token.sum(1)
    B = ref.shape[0]
    return -F.logsigmoid(beta * ((seq[:B] - ref[:, 0]) - (seq[B:] - ref[:, 1])))


def _batch(trainer, rows: range = range(6)) -> dict:
    return trainer.data_collator([trainer.train_dataset[i] for i in rows])


# ------------------------------------------------------------------ the loss and its meta-gradient
def test_pair_loss_is_dpo_trainers(tmp_path):
    """Over a batch of DPOTrainer's own collation (reference log-probabilities precomputed by it), the mean of the
    pairs' losses is DPOTrainer.compute_loss's, after some training has moved the policy off its reference."""
    train, _ = preference_pairs(24, 1)
    plain = _plain(tmp_path, _policy(), train, **{**COMMON, "max_steps": 3, "precompute_ref_log_probs": True,
                                                  "beta": 0.3})
    plain.train()
    b = _batch(plain)
    tokens = b["input_ids"].masked_fill(b["completion_mask"] == 0, -100)
    packed = pack_dpo_labels(tokens, torch.stack([b["ref_chosen_logps"], b["ref_rejected_logps"]], 1))
    model = plain.model.eval()
    with torch.no_grad():
        ours = dpo_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, packed, beta=0.3)
        want = plain.compute_loss(model, b)
    assert float(want) > 0.1
    torch.testing.assert_close(ours.mean(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chosen rows then rejected rows"):
        dpo_loss(torch.zeros(4, tokens.shape[1], 30), packed)


@pytest.mark.parametrize("strategy", ["jvp", "exact", "finite_difference"])
def test_pair_meta_gradient_is_central_differences_through_a_real_step(strategy, tmp_path):
    """∂L_meta(θ')/∂e_i of every pair equals central differences of the meta pairs' mean DPO loss after a real
    torch SGD-with-momentum step on (1/N) Σ e_i ℓ_i (a float64 tiny GPT-2, the loss written out independently)."""
    beta, N = 0.5, 4
    plain = _plain(tmp_path, _policy(), preference_pairs(12, 1)[0],
                   **{**COMMON, "max_steps": 1, "precompute_ref_log_probs": True})
    train, meta = _batch(plain, range(N)), _batch(plain, range(N, N + 3))
    model = _gpt2_float64()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)

    def parts(b):
        ref = torch.stack([b["ref_chosen_logps"], b["ref_rejected_logps"]], 1).double()
        tokens = b["input_ids"].masked_fill(b["completion_mask"] == 0, -100)
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}, b["completion_mask"], ref, tokens

    x, cm, ref, tok = parts(train)
    xm, cmm, refm, tokm = parts(meta)
    for _ in range(2):  # a momentum buffer
        opt.zero_grad()
        _by_hand(model, **x, completion=cm, ref=ref, beta=beta).mean().backward()
        opt.step()
    e = torch.tensor([0.5, 1.25, 2.0, 1.0], dtype=torch.float64)
    params = dict(model.named_parameters())
    res = meta_gradients(model, params, [MicroBatch(x, pack_dpo_labels(tok, ref), e.clone(), seed=0)],
                         MetaBatch(xm, pack_dpo_labels(tokm, refm), seed=1), param_specs(opt, params, set()),
                         weight_decay=0.0, normalizer=N, strategy=strategy, task=dpo_task(beta))

    def meta_loss_after(w: torch.Tensor) -> float:
        mod, o = copy.deepcopy((model, opt))
        o.zero_grad()
        ((w * _by_hand(mod, **x, completion=cm, ref=ref, beta=beta)).sum() / N).backward()
        o.step()
        with torch.no_grad():
            return float(_by_hand(mod, **xm, completion=cmm, ref=refm, beta=beta).mean())

    h, brute = 1e-5, torch.empty(N, dtype=torch.float64)
    for i in range(N):
        up, down = e.clone(), e.clone()
        up[i] += h
        down[i] -= h
        brute[i] = (meta_loss_after(up) - meta_loss_after(down)) / (2 * h)
    assert brute.abs().max() > 1e-4
    tol = 5e-5 if strategy == "finite_difference" else 1e-5
    torch.testing.assert_close(res.example_grad.double(), brute, rtol=tol, atol=tol * float(brute.abs().max()))
    assert res.meta_loss == pytest.approx(meta_loss_after(e), rel=1e-6)


# ------------------------------------------------------------------ the trainer
def conversational(pairs: datasets.Dataset) -> datasets.Dataset:
    """The pairs as chat messages (a user prompt, an assistant answer), as preference sets on the Hub hold them."""
    return datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in pairs])


@pytest.mark.parametrize(("accumulation", "chat"), [(1, False), (2, False), (1, True)])
def test_at_rates_one_a_run_is_dpo_trainers_run(tmp_path, accumulation, chat):
    """meta_lr=0 keeps every rate at 1: the policy ends where DPOTrainer's own run ends (its reference model
    computed per batch; here precomputed once), and the training logs carry DPOTrainer's metrics with its values;
    with two micro-batches per step too, and on conversational pairs (the chat template applied by DPOTrainer)."""
    train, _ = preference_pairs(48 if accumulation > 1 else 24, 1)
    meta, _ = preference_pairs(8, 2)
    if chat:
        train, meta = conversational(train), conversational(meta)
    kw = dict(**COMMON, max_steps=3, beta=0.2, gradient_accumulation_steps=accumulation)
    plain_model, meta_model = tiny_llama(), tiny_llama()
    plain = _plain(tmp_path / "p", plain_model, train, **kw)
    plain.train()
    t = _meta(tmp_path / "m", train, meta, model=meta_model, meta_lr=0.0, **kw)
    t.train()
    assert t.args.precompute_ref_log_probs and t._task.task == "dpo"
    assert probe_batches(t) == 0 and meta_parameters_choice(t) == "all"  # as for a causal LM: logits per token
    assert torch.equal(t.rates.instance, torch.ones(len(train)))
    for (n, a), (_, b) in zip(plain_model.named_parameters(), meta_model.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)
    logged = [h for h in t.state.log_history if "loss" in h]
    want = [h for h in plain.state.log_history if "loss" in h]
    assert len(logged) == len(want) == 3 and all("meta_loss" in h for h in logged)
    for ours, theirs in zip(logged, want):
        for key, value in theirs.items():
            if key in ("rewards/accuracies", "grad_norm") and ours["step"] == 1:
                continue  # at the reference point the rewards are 0 up to rounding, which decides "chosen > rejected"
            assert ours[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def _scaled_head_policy(kind: str):
    """A tiny causal LM whose head does more than a matrix product: Gemma-2's final logit soft-capping or Cohere's
    logit scale (both set strong enough to move every log-probability)."""
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=len(char_tokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                  eos_token_id=1, bos_token_id=None)
    if kind == "softcap":
        model = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=16, final_logit_softcapping=1.0))
    else:
        model = CohereForCausalLM(CohereConfig(**common, logit_scale=0.25))
    model.config._attn_implementation = "eager"
    return model


@pytest.mark.parametrize("kind", ["softcap", "logit_scale"])
def test_policy_and_reference_log_probabilities_agree_on_heads_that_scale_the_logits(tmp_path, kind):
    """With rates the policy's log-probabilities come from the model's logits and the reference's from DPOTrainer's
    fused head: on a head that soft-caps or scales its logits they must still be the same numbers, or the loss at
    the reference point is not log 2 and the run leaves DPOTrainer's."""
    train, _ = preference_pairs(16, 1)
    meta, _ = preference_pairs(8, 2)
    kw = dict(**COMMON, max_steps=2, beta=0.2)
    plain_model, meta_model = _scaled_head_policy(kind), _scaled_head_policy(kind)
    plain = _plain(tmp_path / "p", plain_model, train, **kw)
    plain.train()
    t = _meta(tmp_path / "m", train, meta, model=meta_model, meta_lr=0.0, **kw)
    t.train()
    logged = [h for h in t.state.log_history if "loss" in h]
    want = [h for h in plain.state.log_history if "loss" in h]
    assert logged[0]["loss"] == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-5)
    assert [h["loss"] for h in logged] == pytest.approx([h["loss"] for h in want], rel=1e-4, abs=1e-6)
    for (n, a), (_, b) in zip(plain_model.named_parameters(), meta_model.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)


def test_flipped_pairs_get_lower_rates_and_evaluation_is_dpo_trainers(tmp_path):
    """30 % of the pairs in the wrong order, 16 trusted pairs: the flipped pairs end with lower rates than the others
    (AUROC well above chance), and evaluation reports DPOTrainer's metrics."""
    train, flipped = preference_pairs(128, 1, flip=0.3)
    meta, _ = preference_pairs(16, 2)
    test, _ = preference_pairs(32, 3)
    t = MetaDPOTrainer(model=_policy(), eval_dataset=test, train_dataset=train, meta_dataset=meta,
                       processing_class=char_tokenizer(),
                       args=MetaDPOConfig(output_dir=str(tmp_path), **{**COMMON, "optim": "adamw_torch",
                                                                       "learning_rate": 3e-3, "num_train_epochs": 6,
                                                                       "lr_scheduler_type": "linear",
                                                                       "logging_steps": 20}))
    t.train()
    rates = t.rates.instance
    clean, noisy = rates[~flipped], rates[flipped]
    auroc = float((clean[:, None] > noisy[None, :]).float().mean()
                  + 0.5 * (clean[:, None] == noisy[None, :]).float().mean())
    assert auroc > 0.85, auroc  # seen: 0.98 (chance: 0.5)
    metrics = t.evaluate()
    assert {"eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"} <= set(metrics)
    assert metrics["eval_rewards/accuracies"] > 0.7


def test_the_per_layer_products_add_each_pairs_two_rows_and_train_like_forward_mode(tmp_path):
    """Each pair's per-layer product sums its chosen and rejected rows over their tokens: the first step's check
    against forward mode passes and the run trains as one with ``layerwise_dots=False`` (SGD: Adam would turn the
    rounding of gradients near 0 into whole steps)."""
    train, _ = preference_pairs(48, 1, flip=0.3)
    meta, _ = preference_pairs(16, 2)

    def run(layerwise: bool) -> MetaDPOTrainer:
        t = _meta(tmp_path / str(layerwise), train, meta, **{**COMMON, "max_steps": 6, "layerwise_dots": layerwise})
        t.train()
        return t

    tape, forward = run(True), run(False)
    assert tape._layerwise_check.state == "verified" and forward._layerwise_check.state == "unchecked"
    assert not torch.equal(tape.rates.instance, torch.ones(48))
    torch.testing.assert_close(tape.rates.instance, forward.rates.instance, rtol=1e-4, atol=1e-5)
    for (n, a), b in zip(tape.model.named_parameters(), forward.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)


def test_a_lora_policy_trains_only_its_adapters_as_dpo_trainer_does(tmp_path):
    """DPOTrainer's ``peft_config``: the policy becomes a LoRA model, only the adapters move, at rates 1 they end
    where DPOTrainer's own LoRA run ends (its reference computed per batch with the adapter off; here precomputed
    by DPOTrainer's code the same way), and the rates are learned."""
    peft = pytest.importorskip("peft")
    train, _ = preference_pairs(24, 1, flip=0.3)
    meta, _ = preference_pairs(8, 2)

    def lora():
        return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                               task_type="CAUSAL_LM")

    kw = dict(**COMMON, max_steps=3, beta=0.2)
    plain = trl.DPOTrainer(model=_policy(), args=trl.DPOConfig(output_dir=str(tmp_path / "p"), **kw),
                           train_dataset=train, processing_class=char_tokenizer(), peft_config=lora())
    plain.train()
    t = MetaDPOTrainer(model=_policy(), args=MetaDPOConfig(output_dir=str(tmp_path / "m"), meta_lr=0.0, **kw),
                       train_dataset=train, meta_dataset=meta, processing_class=char_tokenizer(), peft_config=lora())
    base = {n: p.detach().clone() for n, p in t.model.named_parameters() if "lora_" not in n}
    t.train()
    assert isinstance(t.model, peft.PeftModel) and torch.equal(t.rates.instance, torch.ones(24))
    for n, p in t.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n
    theirs = dict(plain.model.named_parameters())
    moved = [n for n, p in t.model.named_parameters() if "lora_B" in n and p.abs().max() > 0]
    assert moved
    for n, p in t.model.named_parameters():
        torch.testing.assert_close(p, theirs[n], rtol=1e-5, atol=1e-6, msg=n)
    learned = MetaDPOTrainer(model=_policy(), args=MetaDPOConfig(output_dir=str(tmp_path / "l"), **kw),
                             train_dataset=train, meta_dataset=meta, processing_class=char_tokenizer(),
                             peft_config=lora())
    learned.train()
    assert not torch.equal(learned.rates.instance, torch.ones(24))


def test_a_learned_trajectory_replays_on_the_same_pairs_without_a_meta_set(tmp_path):
    """The pairs' rate trajectory, saved with the policy, replays: a MetaDPOTrainer given ``replay_trajectory`` and
    no meta set trains every pair with the weight the learning run applied to it at that step; a policy given by
    its folder's name loads as DPOTrainer loads it."""
    from transformers import TrainerCallback

    train, _ = preference_pairs(32, 1, flip=0.3)
    meta, _ = preference_pairs(16, 2)
    policy_dir = tmp_path / "policy"
    _policy().save_pretrained(policy_dir)
    kw = {**COMMON, "optim": "adamw_torch", "learning_rate": 3e-3, "num_train_epochs": 2}

    def run(out, **extra):
        applied = {}

        class Applied(TrainerCallback):
            def on_step_end(self, args, state, control, **_):
                for mb in t._window:
                    for i, w in zip(mb.indices.tolist(), mb.weights.tolist()):
                        applied[(state.global_step, i)] = w

        t = MetaDPOTrainer(model=str(policy_dir), args=MetaDPOConfig(output_dir=str(out), **kw, **extra),
                           train_dataset=train, processing_class=char_tokenizer(),
                           **({} if "replay_trajectory" in extra else {"meta_dataset": meta}))
        t.add_callback(Applied())
        t.train()
        return t, applied

    learned, applied = run(tmp_path / "learned")
    learned.save_model()
    replay, replayed = run(tmp_path / "replay", replay_trajectory=str(tmp_path / "learned"))
    assert replay.lr_trajectory.config["mode"] == "replay" and set(replayed) == set(applied)
    assert sum(abs(w - 1) > 1e-3 for w in applied.values()) > len(applied) // 4  # rates really were learned
    for key, w in applied.items():
        assert replayed[key] == pytest.approx(w, rel=1e-5, abs=1e-6), key


def test_a_run_resumed_from_its_checkpoint_ends_bit_for_bit_where_it_would_have(tmp_path):
    """Checkpoints hold the rates and the meta state next to DPOTrainer's: stopped at step 3 and resumed, the run
    ends with the same rates and weights as the run that was never stopped."""
    train, _ = preference_pairs(48, 1, flip=0.3)
    meta, _ = preference_pairs(16, 2)
    kw = {**COMMON, "optim": "adamw_torch", "learning_rate": 3e-3, "max_steps": 6, "save_strategy": "steps",
          "save_steps": 3}
    full = _meta(tmp_path / "full", train, meta, **kw)
    full.train()
    resumed = _meta(tmp_path / "resumed", train, meta, **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert not torch.equal(full.rates.instance, torch.ones(48))
    assert torch.equal(resumed.rates.instance, full.rates.instance)
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n


def ddp_run(out: str, per_device_batch: int, meta_lr: float = 0.1, plain: bool = False):
    """The runs of the DDP test (tests/ddp_pairs_worker.py): 4 steps of ``per_device_batch`` pairs per process,
    MetaDPOTrainer (every process's meta batch the whole meta set) or, ``plain``, trl.DPOTrainer."""
    train, _ = preference_pairs(64, 1, flip=0.3)
    meta, _ = preference_pairs(16, 2)
    kw = {**COMMON, "max_steps": 4, "per_device_train_batch_size": per_device_batch, "optim": "adamw_torch",
          "learning_rate": 3e-3}
    if plain:
        t = _plain(out, _policy(), train, **kw)
    else:
        t = _meta(out, train, meta, meta_batch_size=len(meta), meta_lr=meta_lr, **kw)
    t.train()
    return t


def test_two_processes_hold_the_same_rates_and_train_as_dpo_trainer_does_there(tmp_path):
    """torchrun, 2 processes x 4 pairs (the reference log-probabilities precomputed across both): both processes end
    with the identical rate table and policy; the rates move; and with rates held at 1 the policy ends where
    trl.DPOTrainer's own 2-process run ends (its reference model computed per batch)."""
    check_two_process_pairs_run("test_trl_dpo", tmp_path, n_train=64)


@pytest.mark.parametrize(("option", "fix"), [
    (dict(loss_type=["ipo"]), "loss_type='sigmoid'"),
    (dict(ld_alpha=0.5), "ld_alpha=None"),
    (dict(loss_weights=[2.0]), r"loss_weights=\[2.0\].*loss_weights=None"),
    (dict(use_weighting=True), "use_weighting=False"),
    (dict(sync_ref_model=True), "sync_ref_model=False"),
])
def test_what_the_per_pair_loss_does_not_cover_is_refused_naming_the_fix(tmp_path, option, fix):
    train, _ = preference_pairs(8, 1)
    meta, _ = preference_pairs(4, 2)
    with pytest.raises(ValueError, match=fix):
        _meta(tmp_path, train, meta, **{**COMMON, **option})
    with pytest.raises(ValueError, match="'labels' column"):
        _meta(tmp_path, train.add_column("labels", [0] * 8), meta, **COMMON)


def test_trusted_pairs_in_another_format_than_the_train_pairs_are_refused(tmp_path):
    """Trusted pairs without the train pairs' prompt, with an answer missing, or conversational beside plain-text
    train pairs: refused at construction, naming the meta set (not a KeyError inside TRL, nor a silent run under
    another chat template)."""
    train, _ = preference_pairs(16, 1)
    meta, _ = preference_pairs(4, 2)
    with pytest.raises(ValueError, match=r"meta dataset's columns \['chosen', 'rejected'\] are not the train set's"):
        _meta(tmp_path, train, meta.remove_columns("prompt"), **COMMON)
    with pytest.raises(ValueError, match=r"Row 1 of the meta dataset has no value in \['rejected'\]"):
        rows = meta.to_list()
        rows[1]["rejected"] = None
        _meta(tmp_path, train, datasets.Dataset.from_list(rows), **COMMON)
    chat = meta.map(lambda r: {k: [{"role": "user" if k == "prompt" else "assistant", "content": r[k]}]
                               for k in ("prompt", "chosen", "rejected")})
    with pytest.raises(ValueError, match="train set's rows are plain text but the meta set's are conversational"):
        _meta(tmp_path, train, chat, **COMMON)
