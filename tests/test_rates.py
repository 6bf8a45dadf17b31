"""RateTable: the update rules, clamping, no-history reset and state round trip."""

import math

import pytest
import torch

from hf_ddlr.meta import RateTable


def test_normalized_instance_step_is_meta_lr_per_visit_whatever_the_scale():
    for scale in (1e-6, 1.0, 1e3):
        t = RateTable(6, 3, "instance", meta_lr=0.1)
        g = torch.tensor([1.0, -1.0, 2.0, -2.0]) * scale
        t.update(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 0]), g)
        # mean |g| = 1.5 * scale -> steps of 0.1 * g / (1.5 scale)
        torch.testing.assert_close(t.instance, torch.tensor([1 - 0.1 / 1.5, 1 + 0.1 / 1.5, 1 - 0.2 / 1.5,
                                                             1 + 0.2 / 1.5, 1.0, 1.0]))


def test_normalized_class_step_splits_meta_lr_by_share():
    t = RateTable(4, 3, "class", meta_lr=0.3)
    g = torch.tensor([1.0, 1.0, -2.0, 0.0])  # classes 0, 0, 1, 2
    t.update(None, torch.tensor([0, 0, 1, 2]), g)
    # total |g| = 4: class 0 gets +2/4 of the step (gradient +2 -> rate down), class 1 -2/4, class 2 unchanged
    torch.testing.assert_close(t.per_class, torch.tensor([1 - 0.3 * 2 / 4, 1 + 0.3 * 2 / 4, 1.0]))
    assert float((t.per_class - 1).abs().sum()) <= 0.3 + 1e-6


def test_raw_update_clamps_at_zero_and_respects_max_rate():
    t = RateTable(3, 2, "both", meta_lr=10.0, scaling="raw", max_rate=1.5)
    t.update(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([1.0, -1.0]))
    # instance: e_i = w_i * w_c[y_i] = 1, grad_i times w_class = 1 -> 1 - 10 = -9 -> 0; 1 + 10 -> capped 1.5
    assert t.instance.tolist() == [0.0, 1.5, 1.0]
    assert t.per_class.tolist() == [0.0, 1.5]


@pytest.mark.parametrize("max_rate, max_instance_rate, instance_cap, class_cap", [
    (None, 1.0, 1.0, None), (1.5, 1.0, 1.0, 1.5), (0.8, 1.0, 0.8, 0.8), (None, None, None, None)])
def test_instance_cap_bounds_the_instance_table_only(max_rate, max_instance_rate, instance_cap, class_cap):
    """max_instance_rate bounds the per-example rates (the tighter of it and max_rate); class rates keep
    max_rate alone, so they can still speed a class up."""
    t = RateTable(3, 2, "both", meta_lr=0.5, max_rate=max_rate, max_instance_rate=max_instance_rate)
    for _ in range(20):  # the same push every step: example 1 and class 1 up, example 0 and class 0 down
        t.update(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([1.0, -1.0]))
    assert t.instance[0] == 0.0
    expect_inst = instance_cap if instance_cap is not None else 1.0 + 20 * 0.5
    assert t.instance[1].item() == pytest.approx(expect_inst)
    if class_cap is None:
        assert t.per_class[1].item() > 2.0
    else:
        assert t.per_class[1].item() == pytest.approx(class_cap)
    assert t.instance[2] == 1.0  # never visited


def test_non_finite_gradient_leaves_everything_untouched():
    t = RateTable(3, 2, "both", learn_weight_decay=True, weight_decay=1e-3)
    before = {k: v.clone() for k, v in t.state_dict().items()}
    assert not t.update(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([float("nan"), 1.0]), 0.5)
    for k, v in t.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not t.update(torch.tensor([0]), torch.tensor([0]), torch.tensor([1.0]), math.inf)


def test_weight_decay_normalized_is_multiplicative_and_bounded():
    t = RateTable(2, 2, "instance", learn_weight_decay=True, weight_decay=1e-3, meta_wd_lr=0.01)
    for _ in range(5):
        t.update(torch.tensor([0]), torch.tensor([0]), torch.tensor([1.0]), weight_decay_grad=1e-7)
    assert (
        1e-3 * math.exp(-0.05 - 1e-9) <= t.weight_decay < 1e-3
    )  # positive gradient: decreases, by <= 1 %/step


def test_weight_decay_normalized_step_is_an_rms_normalized_log_step_clipped_at_three():
    """log(wd) moves by -meta_wd_lr * g/rms(g), rms the bias-corrected running mean of g^2 (decay 0.99); a
    gradient spike after many small ones moves it by 3 * meta_wd_lr at most. Checked against that rule
    recomputed here, step by step."""
    lr, beta = 0.02, 0.99
    t = RateTable(2, 2, "instance", learn_weight_decay=True, weight_decay=1e-3, meta_wd_lr=lr)
    grads = [1e-4] * 20 + [1.0, -1e-4, -0.5]
    wd, sq, ratios = 1e-3, 0.0, []
    for k, g in enumerate(grads, start=1):
        before = t.weight_decay
        t.update(torch.tensor([0]), torch.tensor([0]), torch.tensor([0.0]), weight_decay_grad=g)
        sq = beta * sq + (1 - beta) * g * g
        ratio = g / math.sqrt(sq / (1 - beta**k))
        ratios.append(ratio)
        wd = wd * math.exp(-lr * max(-3.0, min(3.0, ratio)))
        assert t.weight_decay == pytest.approx(wd, rel=1e-6), k
        assert abs(math.log(t.weight_decay / before)) <= 3 * lr + 1e-9
    assert ratios[20] > 4.0  # the spike: unclipped, the step would have been exp(-4.4 lr)
    assert t.weight_decay / wd == pytest.approx(1.0, rel=1e-6)


def test_state_round_trip_and_resize():
    t = RateTable(5, 2, "both", learn_weight_decay=True, weight_decay=1e-3)
    t.update(torch.tensor([0, 3]), torch.tensor([0, 1]), torch.tensor([0.5, -0.5]), 0.1)
    u = RateTable(5, 2, "both", learn_weight_decay=True, weight_decay=1e-3)
    u.load_state_dict(t.state_dict())
    assert torch.equal(u.instance, t.instance) and torch.equal(u.per_class, t.per_class)
    assert u.weight_decay == t.weight_decay
    small = RateTable(3, 2, "both", learn_weight_decay=True, weight_decay=1e-3)
    with pytest.raises(ValueError, match="5 entries but this train set has 3"):
        small.load_state_dict(t.state_dict())
    small.load_state_dict(t.state_dict(), allow_resize=True)
    assert torch.equal(small.instance, t.instance[:3])


def test_reset_is_the_no_history_ablation():
    t = RateTable(3, 2, "both")
    t.update(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([1.0, -1.0]))
    t.reset()
    assert t.instance.tolist() == [1.0, 1.0, 1.0] and t.per_class.tolist() == [1.0, 1.0]


def test_loads_the_v0_state_dict_and_refuses_a_newer_one():
    """v0 (written before the table had an optimizer) is today's dict without ``format_version``: it restores
    the weight decay's running RMS and update count, so the next update is the one the writer would make."""
    t = RateTable(5, 2, "both", learn_weight_decay=True, weight_decay=1e-3)
    for k in range(3):
        t.update(torch.tensor([0, 3]), torch.tensor([0, 1]), torch.tensor([0.5, -0.5 * k]), 0.1 * (k + 1))
    v0 = t.state_dict()
    assert int(v0.pop("format_version")) == 1
    u = RateTable(5, 2, "both", learn_weight_decay=True, weight_decay=1e-3)
    u.load_state_dict(v0)
    assert u.wd_sq_avg == t.wd_sq_avg > 0 and u.num_updates == t.num_updates == 3
    for table in (t, u):
        table.update(torch.tensor([1, 3]), torch.tensor([1, 1]), torch.tensor([0.25, 0.5]), 0.05)
    for k, v in t.state_dict().items():
        assert torch.equal(u.state_dict()[k], v), k
    with pytest.raises(ValueError, match="format version 2"):
        u.load_state_dict({**t.state_dict(), "format_version": torch.tensor(2)})


@pytest.mark.parametrize("keyed", ["class", "group"])
def test_both_instance_rates_step_on_the_effective_rate_gradient_or_the_chain_rule(keyed):
    """lr_level='both', raw steps: the instance rate moves by meta_lr·∂L/∂e_i ('effective', the default) or by
    meta_lr·w_key·∂L/∂e_i ('chain_rule'); the keyed rate by meta_lr·Σ w_i·∂L/∂e_i either way. An example whose
    class / group rate is 0 keeps learning its own rate only with 'effective'."""
    kw = dict(num_groups=2) if keyed == "group" else {}

    def table(mode):
        t = RateTable(3, 2, "both", meta_lr=0.1, scaling="raw", instance_gradient=mode, **kw)
        t.instance.copy_(torch.tensor([1.0, 0.5, 2.0]))
        t.keyed.copy_(torch.tensor([0.0, 0.5]))  # key 0's rate already at 0
        return t

    g = torch.tensor([1.0, -2.0, 4.0])
    keys = torch.tensor([0, 1, 1])
    eff, chain = table("effective"), table("chain_rule")
    assert RateTable(3, 2, "both", **kw).instance_gradient == "effective"  # the default
    for t in (eff, chain):
        t.update(torch.tensor([0, 1, 2]), keys, g)
    torch.testing.assert_close(eff.instance, torch.tensor([1.0 - 0.1, 0.5 + 0.2, 2.0 - 0.4]))
    torch.testing.assert_close(chain.instance, torch.tensor([1.0, 0.5 + 0.1, 2.0 - 0.2]))  # example 0 frozen
    # the keyed rates: the chain rule through the instance rates in both modes (key 1: 0.5 - 0.1·(-1 + 8))
    for t in (eff, chain):
        torch.testing.assert_close(t.keyed, torch.tensor([0.0, 0.5 - 0.1 * 7.0]).clamp(min=0))


def test_instance_gradient_must_be_known():
    with pytest.raises(ValueError, match="instance_gradient"):
        RateTable(3, 2, "both", instance_gradient="exact")


def test_centered_instance_steps_sum_to_zero_within_each_class_and_leave_the_class_rates():
    """center_instance=True: the instance gradient minus its class's batch mean (class 0: 1, 3 -> mean 2;
    class 1: -2 alone -> 0), normalized by the centred values' mean |.|; the class rates of 'both' step on the
    uncentred gradient."""
    g = torch.tensor([1.0, -2.0, 3.0])
    labels = torch.tensor([0, 1, 0])
    t = RateTable(3, 2, "instance", meta_lr=0.1, center_instance=True)
    t.update(torch.tensor([0, 1, 2]), labels, g)
    centred = torch.tensor([-1.0, 0.0, 1.0])
    torch.testing.assert_close(t.instance, 1 - 0.1 * centred / centred.abs().mean())
    both = RateTable(3, 2, "both", meta_lr=0.1, scaling="raw", center_instance=True)
    both.update(torch.tensor([0, 1, 2]), labels, g)
    torch.testing.assert_close(both.instance, 1 - 0.1 * centred)
    torch.testing.assert_close(both.per_class, torch.tensor([1 - 0.1 * 4.0, 1 + 0.1 * 2.0]))


def test_median_centred_instance_steps_subtract_the_typical_example_of_each_class():
    """center="median": the instance gradient minus the (lower) median of its class's batch gradients (class 0:
    1, 3, 20 -> 3, where the mean would be 8; class 1: -2, 4 -> the lower median -2), so one large gradient does
    not shift its classmates' steps; the mean is still the default."""
    g = torch.tensor([1.0, -2.0, 3.0, 20.0, 4.0])
    labels = torch.tensor([0, 1, 0, 0, 1])
    t = RateTable(5, 2, "instance", meta_lr=0.01, scaling="raw", center_instance=True, center="median")
    t.update(torch.arange(5), labels, g)
    torch.testing.assert_close(t.instance, 1 - 0.01 * torch.tensor([-2.0, 0.0, 0.0, 17.0, 6.0]))
    mean = RateTable(5, 2, "instance", meta_lr=0.01, scaling="raw", center_instance=True)
    mean.update(torch.arange(5), labels, g)
    torch.testing.assert_close(mean.instance, 1 - 0.01 * torch.tensor([-7.0, -3.0, -5.0, 12.0, 3.0]))
    with pytest.raises(ValueError, match="center must be one of"):
        RateTable(5, 2, "instance", center_instance=True, center="mode")


def test_relative_at_cap_steps_a_rate_at_its_cap_on_its_gradient_minus_its_classs_median():
    """at_cap="relative": the rows whose own step would pass the cap of 1 (0, 1 and 4) step on g minus the lower
    median of their label's batch gradients (label 0: -3, -2, -1 -> -2; label 1: -4, 2 -> -4), scaled like the
    step (meta_lr / mean|g| = 0.12 / 2.4); row 0 helps less than its typical classmate and leaves the cap, rows
    1 and 4 stay at it; row 2 (below the cap) and row 3 (going down) keep their own steps. 'clamp' ties 0, 1, 4."""
    g = torch.tensor([-1.0, -3.0, -2.0, 2.0, -4.0])
    labels = torch.tensor([0, 0, 0, 1, 1])
    start = torch.tensor([1.0, 1.0, 0.5, 1.0, 1.0])
    out = {}
    for rule in ("relative", "clamp"):
        t = RateTable(5, 2, "instance", meta_lr=0.12, max_instance_rate=1.0, at_cap=rule)
        t.instance.copy_(start)
        assert t.update(torch.arange(5), labels, g)
        out[rule] = t.instance.clone()
        assert "cap_reference" not in t.optimizer.state[t.instance]  # used by its step only
    torch.testing.assert_close(out["relative"], torch.tensor([0.95, 1.0, 0.6, 0.9, 1.0]))
    torch.testing.assert_close(out["clamp"], torch.tensor([1.0, 1.0, 0.6, 0.9, 1.0]))
    with pytest.raises(ValueError, match="at_cap must be one of"):
        RateTable(5, 2, "instance", at_cap="wrap")


def test_key_scaled_instance_steps_move_every_key_by_meta_lr_and_leave_the_keyed_rates():
    """instance_scale='key': each instance gradient is divided by the mean |.| of its key's gradients in the batch
    (key 0: 1, -3 -> 2; key 1: 100, -300 -> 200; key 2: all 0, unchanged), so both keys' rates move by meta_lr on
    average, where the batch scale ('batch', 101) would move key 0's by a hundredth of that; the keyed rates of
    'both' still step on the unscaled gradient."""
    g = torch.tensor([1.0, 100.0, -3.0, -300.0, 0.0])
    labels = torch.tensor([0, 1, 0, 1, 2])
    idx = torch.arange(5)
    scaled = torch.tensor([0.5, 0.5, -1.5, -1.5, 0.0])  # g / its key's mean |g|
    t = RateTable(5, 3, "instance", meta_lr=0.1, instance_scale="key")
    t.update(idx, labels, g)
    torch.testing.assert_close(t.instance, 1 - 0.1 * scaled / scaled.abs().mean())
    moved = (t.instance - 1).abs()
    assert moved[:4].tolist() == pytest.approx([0.05 / 0.8, 0.05 / 0.8, 0.15 / 0.8, 0.15 / 0.8])
    batch = RateTable(5, 3, "instance", meta_lr=0.1)
    batch.update(idx, labels, g)
    torch.testing.assert_close(batch.instance, 1 - 0.1 * g / g.abs().mean())
    both = RateTable(5, 3, "both", meta_lr=0.1, instance_scale="key")
    both.update(idx, labels, g)
    torch.testing.assert_close(both.instance, t.instance)
    keyed = torch.tensor([1.0 - 3.0, 100.0 - 300.0, 0.0])  # per-key sums of the unscaled gradient
    torch.testing.assert_close(both.per_class, 1 - 0.1 * keyed / g.abs().sum())
    with pytest.raises(ValueError, match="instance_scale must be"):
        RateTable(5, 3, "instance", instance_scale="class")


@pytest.mark.parametrize("level", ["class", "both"])
def test_keyed_rates_step_on_keyed_grad_and_instance_rates_on_example_grad(level):
    """update(..., keyed_grad=k): the class rates take the chain rule of k (times the instance rates), the
    instance rates of 'both' keep stepping on the example gradient; a non-finite k skips the whole update."""
    g = torch.tensor([1.0, -2.0, 4.0])
    k = torch.tensor([-3.0, 1.0, 0.5])
    labels = torch.tensor([0, 1, 1])
    t = RateTable(3, 2, level, meta_lr=0.1, scaling="raw")
    if t.instance is not None:
        t.instance.copy_(torch.tensor([1.0, 0.5, 2.0]))
    t.update(torch.tensor([0, 1, 2]), labels, g, keyed_grad=k)
    w = torch.tensor([1.0, 0.5, 2.0]) if level == "both" else torch.ones(3)
    torch.testing.assert_close(t.per_class, torch.tensor([1 + 0.1 * 3.0, 1 - 0.1 * (0.5 * 1.0 + 2.0 * 0.5)]))
    if level == "both":  # 'effective': meta_lr · g, not k
        torch.testing.assert_close(t.instance, w - 0.1 * g)
    before = {n: v.clone() for n, v in t.state_dict().items()}
    assert not t.update(torch.tensor([0, 1, 2]), labels, g, keyed_grad=torch.tensor([0.0, float("nan"), 0.0]))
    for n, v in t.state_dict().items():
        assert torch.equal(v, before[n]), n


@pytest.mark.parametrize("level", ["instance", "both"])
def test_probes_move_their_instance_rates_in_the_same_normalized_step_and_not_the_keyed_rates(level):
    """update(..., probes=(idx, keys, grad)): the probed rows step with the batch's rows, all divided by the mean
    |g| over every row that moves; the class rates step on the batch alone; a non-finite probe skips it all."""
    t = RateTable(8, 2, level, meta_lr=0.1, max_instance_rate=None)
    g = torch.tensor([1.0, -1.0])
    probes = (torch.tensor([4, 5, 1]), torch.tensor([0, 1, 1]), torch.tensor([2.0, -4.0, 3.0]))
    t.update(torch.tensor([0, 1]), torch.tensor([0, 1]), g, probes=probes)
    # rows 0, 1, 4, 5 move; row 1 is in the batch and probed: its gradient is -1 + 3 = 2
    # mean |g| over the moving rows = (1 + 2 + 2 + 4) / 4 = 2.25
    s = 0.1 / 2.25
    torch.testing.assert_close(t.instance, torch.tensor([1 - s, 1 - 2 * s, 1, 1, 1 - 2 * s, 1 + 4 * s, 1, 1]))
    if level == "both":
        ref = RateTable(8, 2, level, meta_lr=0.1, max_instance_rate=None)
        ref.update(torch.tensor([0, 1]), torch.tensor([0, 1]), g)
        torch.testing.assert_close(t.per_class, ref.per_class)
    before = {n: v.clone() for n, v in t.state_dict().items()}
    bad = (probes[0], probes[1], torch.tensor([0.0, float("nan"), 0.0]))
    assert not t.update(torch.tensor([0, 1]), torch.tensor([0, 1]), g, probes=bad)
    for n, v in t.state_dict().items():
        assert torch.equal(v, before[n]), n


def test_median_normalization_divides_the_applied_instance_rates_by_the_tables_median_above_one():
    """The divisor is max(1, the table's median), over every row (not the batch's), and reaches e_i; 'none' and a
    median at or below 1 leave the rates as they are; the class factor of 'both' is not divided."""
    values = torch.tensor([0.1, 0.2, 1.1, 1.2, 1.3, 1.4, 1.5])  # median 1.2; a batch of the first three: median 0.2
    t = RateTable(7, 2, "both", instance_normalization="median", max_instance_rate=1.5)
    t.instance.copy_(values)
    t.per_class.copy_(torch.tensor([2.0, 0.5]))
    assert t.instance_divisor() == pytest.approx(1.2)
    idx, labels = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 0])
    e = t.effective(idx, labels, t.instance_divisor())
    torch.testing.assert_close(e, torch.tensor([0.1 * 2.0, 0.2 * 0.5, 1.1 * 2.0]) / 1.2)
    t.instance.copy_(values * 0.5)  # median 0.6: nothing to divide
    assert t.instance_divisor() == 1.0
    off = RateTable(7, 2, "instance", max_instance_rate=1.5)
    off.instance.copy_(values)
    assert off.instance_divisor() == 1.0
    assert RateTable(7, 2, "class", instance_normalization="median").instance_divisor() == 1.0
    with pytest.raises(ValueError, match="instance_normalization must be one of"):
        RateTable(7, 2, "instance", instance_normalization="mean")


@pytest.mark.parametrize("level, gradient", [("both", "effective"), ("both", "chain_rule"), ("class", "effective")])
def test_raw_steps_are_the_derivatives_of_the_applied_rates_under_the_median_divisor(level, gradient):
    """instance_normalization="median" applies e_i = w_inst[i]·w_class[y_i] / max(1, median(w_inst)): the raw step
    of a class rate (and, under the chain rule, of an instance rate) is meta_lr times the derivative of that
    e through autograd, the divisor included (the divisor itself held constant, as it is within a step)."""
    idx, y = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 1, 0])
    g = torch.tensor([0.4, -0.2, 0.3, -0.1])  # dL/de_i
    t = RateTable(4, 2, level, meta_lr=0.5, scaling="raw", max_instance_rate=None,
                  instance_normalization="median", instance_gradient=gradient)
    if t.instance is not None:
        t.instance.copy_(torch.tensor([2.0, 3.0, 2.5, 4.0]))  # median 2.5: a divisor above 1
    t.per_class.copy_(torch.tensor([1.2, 0.8]))
    w_inst = (t.instance.clone() if t.instance is not None else torch.ones(4)).requires_grad_()
    w_cls = t.per_class.clone().requires_grad_()
    d = max(1.0, float(w_inst.detach().median())) if t.instance is not None else 1.0
    loss = (g * (w_inst[idx] * w_cls[y] / d)).sum()  # L linear in e with dL/de = g
    gi, gc = torch.autograd.grad(loss, [w_inst, w_cls])
    before_inst = None if t.instance is None else t.instance.clone()
    t.update(idx, y, g)
    torch.testing.assert_close(t.per_class, (w_cls - 0.5 * gc).detach())
    if gradient == "chain_rule":
        torch.testing.assert_close(t.instance, (w_inst - 0.5 * gi).detach())
    elif before_inst is not None:  # "effective": the instance table steps on dL/de_i itself
        torch.testing.assert_close(t.instance, before_inst - 0.5 * g)
