"""The meta objective (``meta_objective``): the bounded and log objectives' meta-gradients against a hand-written
lookahead, its value against the softmax, and where ``"auto"`` resolves to it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_ddlr.meta import MetaBatch, MicroBatch, meta_gradients, param_specs
from hf_ddlr.meta.losses import SINGLE_LABEL, task_loss


class Linear(nn.Module):
    def __init__(self, d: int = 6, c: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(d, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    model = Linear()
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    # a meta set the model fits unevenly: a few meta examples far from their label, so the two objectives differ
    xm, ym = 3 * torch.randn(12, 6), torch.randint(0, 3, (12,))
    params = dict(model.named_parameters())
    lr = 0.5
    specs = param_specs(torch.optim.SGD(model.parameters(), lr=lr), params, [], mode="optimizer")
    window = [MicroBatch({"x": x}, y, torch.rand(20) + 0.5, seed=1)]
    return model, params, specs, window, MetaBatch({"x": xm}, ym, seed=2), lr


def _by_hand(model, window, meta, lr, objective):
    """∂objective(θ'(e))/∂e_i with θ' = θ - lr Σ e_i ∇ℓ_i / n written out (double backward, no engine code)."""
    mb = window[0]
    e = mb.weights.clone().requires_grad_(True)
    W, b = model.fc.weight, model.fc.bias
    loss = (e * F.cross_entropy(mb.inputs["x"] @ W.T + b, mb.labels, reduction="none")).sum() / len(e)
    gW, gb = torch.autograd.grad(loss, [W, b], create_graph=True)
    logits = meta.inputs["x"] @ (W - lr * gW).T + (b - lr * gb)
    p_label = logits.softmax(-1).gather(1, meta.labels[:, None])[:, 0]  # from the softmax itself
    if objective == "loss":
        obj = F.cross_entropy(logits, meta.labels)
    elif objective == "bounded":  # the meta set's expected error: 1 - p(label)
        obj = (1 - p_label).mean()
    else:  # log of each meta example's cross-entropy, -log p(label), averaged
        obj = torch.log(-torch.log(p_label)).mean()
    return torch.autograd.grad(obj, e)[0]


@pytest.mark.parametrize("strategy", ["jvp", "exact", "finite_difference"])
@pytest.mark.parametrize("objective", ["loss", "bounded", "log"])
def test_meta_gradient_of_each_objective_matches_a_hand_written_lookahead(strategy, objective):
    model, params, specs, window, meta, lr = _problem()
    want = _by_hand(model, window, meta, lr, objective)
    got = meta_gradients(model, params, copy.deepcopy(window), meta, specs, weight_decay=0.0, normalizer=20,
                         strategy=strategy, objective=objective)
    if strategy == "finite_difference":  # a one-sided difference in fp32: close in direction, not to 1e-4
        assert float(F.cosine_similarity(got.example_grad, want, dim=0)) > 0.99
    else:
        torch.testing.assert_close(got.example_grad, want, rtol=1e-4, atol=1e-7)
    # the logged meta loss is the task's loss whatever the objective
    with torch.no_grad():
        logits = meta.inputs["x"] @ model.fc.weight.T + model.fc.bias  # (θ' differs from θ by one small step)
    assert got.meta_loss == pytest.approx(float(F.cross_entropy(logits, meta.labels)), rel=0.2)


def test_the_objectives_rank_the_examples_differently():
    """On a meta set with examples the model gets badly wrong, neither the bounded nor the log objective is the
    loss rescaled: the per-example meta-gradients point elsewhere (else the options would change nothing)."""
    model, params, specs, window, meta, lr = _problem()
    a = _by_hand(model, window, meta, lr, "loss")
    for other in ("bounded", "log"):
        b = _by_hand(model, window, meta, lr, other)
        assert float(F.cosine_similarity(a, b, dim=0)) < 0.95, other


def test_bounded_objective_values():
    """Single-label: 1 - p(label) averaged. Token level: 1 - the geometric mean of the target tokens' probabilities,
    averaged over examples (a prompt-only example counts 0)."""
    torch.manual_seed(0)
    logits, y = torch.randn(5, 4), torch.randint(0, 4, (5,))
    losses = SINGLE_LABEL(logits, y, 0.0)
    want = (1 - logits.softmax(-1).gather(1, y[:, None])).mean()
    torch.testing.assert_close(SINGLE_LABEL.meta_objective(losses, y, "bounded"), want)
    torch.testing.assert_close(SINGLE_LABEL.meta_objective(losses, y, "loss"), losses.mean())

    tok = task_loss("token_classification")
    logits, y = torch.randn(3, 5, 4), torch.randint(0, 4, (3, 5))
    y[0, :2] = -100
    y[2] = -100  # no target at all
    losses = tok(logits, y, 0.0)
    p = logits.softmax(-1)
    geo = []
    for i in range(3):
        keep = y[i] != -100
        geo.append(p[i][keep].gather(1, y[i][keep][:, None]).log().mean().exp() if keep.any() else torch.tensor(1.0))
    torch.testing.assert_close(tok.meta_objective(losses, y, "bounded"), (1 - torch.stack(geo)).mean())
    # log: each example's mean target-token loss, -log of the geometric mean above, logged and averaged
    torch.testing.assert_close(tok.meta_objective(losses, y, "log"), torch.log(-torch.stack(geo).log() + 1e-6).mean())
    with pytest.raises(ValueError, match="Unknown meta objective 'median'"):
        tok.meta_objective(losses, y, "median")


def test_last_layer_and_unknown_objectives_are_refused(tmp_path):
    from hf_ddlr import MetaLRConfig

    model, params, specs, window, meta, lr = _problem()
    with pytest.raises(ValueError, match="last_layer"):
        meta_gradients(model, params, window, meta, specs, weight_decay=0.0, normalizer=20, strategy="last_layer",
                       objective="bounded")
    for objective in ("bounded", "log"):
        with pytest.raises(ValueError, match=f"meta_objective='{objective}' needs"):
            MetaLRConfig(output_dir=str(tmp_path), meta_objective=objective, meta_strategy="last_layer", report_to=[])
    with pytest.raises(ValueError, match="meta_objective='median' is not valid"):
        MetaLRConfig(output_dir=str(tmp_path), meta_objective="median", report_to=[])


def test_auto_is_bounded_on_a_pretrained_models_head_and_the_loss_otherwise(tmp_path):
    """``meta_objective="auto"``: a fine-tune of a pretrained model (the head's meta-gradient) steps exactly like an
    explicit ``"bounded"`` run and records it; a model built from its config exactly like ``"loss"``, recording
    nothing new; the two objectives give different rates."""
    from test_meta_parameters import _pretrained, _trained
    from tiny_text import tiny_bert

    auto_pre = _trained(tmp_path, _pretrained(tmp_path))
    bounded = _trained(tmp_path, _pretrained(tmp_path), meta_objective="bounded")
    loss_pre = _trained(tmp_path, _pretrained(tmp_path), meta_objective="loss")
    auto_new = _trained(tmp_path, tiny_bert())
    loss_new = _trained(tmp_path, tiny_bert(), meta_objective="loss")
    assert auto_pre.lr_trajectory.config["meta_objective"] == "bounded"
    assert "meta_objective" not in auto_new.lr_trajectory.config
    assert torch.equal(auto_pre.rates.instance, bounded.rates.instance)
    assert torch.equal(auto_new.rates.instance, loss_new.rates.instance)
    assert not torch.allclose(auto_pre.rates.instance, loss_pre.rates.instance, rtol=1e-4)
    # every parameter of a pretrained model (not its head): the loss
    whole = _trained(tmp_path, _pretrained(tmp_path), meta_parameters="all")
    assert "meta_objective" not in whole.lr_trajectory.config
