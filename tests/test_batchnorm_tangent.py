"""BatchNorm's fused forward-mode tangent equals PyTorch's own forward-mode AD (and a float64 finite difference),
uses the real forward's recorded statistics for the call they were recorded on, and leaves every case it does not
cover (running statistics, half precision, autocast, SyncBatchNorm) to PyTorch."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

from hf_ddlr.meta import frozen_batchnorm
from hf_ddlr.meta.batchnorm_tangent import batchnorm_tangents
from hf_ddlr.meta.primal_reuse import record_outputs

CASES = [  # (module, input shape)
    (lambda: nn.BatchNorm1d(5), (12, 5)),
    (lambda: nn.BatchNorm1d(5), (12, 5, 7)),
    (lambda: nn.BatchNorm2d(4), (10, 4, 6, 5)),
    (lambda: nn.BatchNorm3d(3), (6, 3, 4, 3, 5)),
    (lambda: nn.BatchNorm2d(4, affine=False), (10, 4, 6, 5)),
]


def _bn(make, dtype=torch.float32):
    torch.manual_seed(0)
    m = make().to(dtype)
    if m.affine:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
    return m.train()


def _jvp(m, x, xt, T, fast, recorded=None):
    """(primal, tangent) of ``m`` at x along (xt, T) in one forward-mode pass, with or without the fused path."""
    params = dict(m.named_parameters())
    with torch.no_grad(), frozen_batchnorm(m), fwAD.dual_level():
        dual = {n: fwAD.make_dual(p.detach(), T[n]) for n, p in params.items()}
        xd = fwAD.make_dual(x, xt) if xt is not None else x
        if fast:
            with batchnorm_tangents(m, recorded):
                y = functional_call(m, dual, (xd,))
        else:
            y = functional_call(m, dual, (xd,))
        p, t = fwAD.unpack_dual(y)
    return p, t


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("param_tangent", [True, False])
def test_fused_tangent_equals_pytorch_forward_mode(case, param_tangent):
    make, shape = CASES[case]
    m = _bn(make)
    x = torch.randn(shape) * 3 + 1
    xt = torch.randn(shape)
    T = {n: (torch.randn_like(p) if param_tangent else torch.zeros_like(p)) for n, p in m.named_parameters()}
    p_ref, t_ref = _jvp(m, x, xt, T, fast=False)
    p, t = _jvp(m, x, xt, T, fast=True)
    torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t, t_ref, rtol=1e-4, atol=1e-5)
    assert "forward" not in m.__dict__  # the module is back to its own forward


def test_fused_tangent_equals_a_float64_finite_difference():
    """An independent check: the directional derivative by central differences in float64."""
    m = _bn(lambda: nn.BatchNorm2d(3), torch.float64)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64) * 2 - 1
    xt = torch.randn_like(x)
    T = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    _, t = _jvp(m, x, xt, T, fast=True)
    h = 1e-6

    def at(s):
        params = {n: p.detach() + s * T[n] for n, p in m.named_parameters()}
        with torch.no_grad(), frozen_batchnorm(m):
            return functional_call(m, params, (x + s * xt,))

    torch.testing.assert_close(t, (at(h) - at(-h)) / (2 * h), rtol=1e-6, atol=1e-7)


def _recorded_forward(m, x):
    """The 'real forward' (autograd on, batch statistics) with its BatchNorm output and statistics recorded."""
    with frozen_batchnorm(m), record_outputs(m) as rec:
        m(x.requires_grad_(True))
    return rec


def test_recorded_statistics_are_used_for_the_recorded_call_only():
    m = _bn(lambda: nn.BatchNorm2d(4))
    x = torch.randn(10, 4, 6, 5) * 3 + 1
    xt = torch.randn_like(x)
    T = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    p_ref, t_ref = _jvp(m, x, xt, T, fast=False)
    rec = _recorded_forward(m, x.clone())
    (entry,) = rec[m]
    # PyTorch's native kernel saved (mean, 1/std) for its backward; the output itself is not held
    assert entry.stats is not None and entry.output is None and entry.input_shape == tuple(x.shape)
    p, t = _jvp(m, x, xt, T, fast=True, recorded=rec)
    torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t, t_ref, rtol=1e-4, atol=1e-5)
    # negative control: wrong recorded statistics change the result, so they are what the pass used
    mean, invstd = entry.stats
    _, t_bad = _jvp(m, x, xt, T, fast=True, recorded={m: [entry._replace(stats=(mean + 1, invstd))]})
    assert not torch.allclose(t_bad, t_ref, rtol=1e-3, atol=1e-3)
    # statistics recorded on another input shape (not the recorded call) are not used
    other = entry._replace(stats=(mean + 1, invstd), input_shape=(5, 4, 6, 5))
    p2, t2 = _jvp(m, x, xt, T, fast=True, recorded={m: [other]})
    torch.testing.assert_close(p2, p_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t2, t_ref, rtol=1e-4, atol=1e-5)


def test_cases_it_does_not_cover_are_left_to_pytorch(monkeypatch):
    import hf_ddlr.meta.batchnorm_tangent as bt

    calls = []
    monkeypatch.setattr(bt.torch.ops.aten, "native_batch_norm_backward",
                        lambda *a: calls.append(1) or pytest.fail("the fused path ran"), raising=False)
    x, xt = torch.randn(10, 4, 6, 5), torch.randn(10, 4, 6, 5)

    def check(m, x, xt, T, **kw):
        ref = _jvp(m, x, xt, T, fast=False)
        got = _jvp(m, x, xt, T, fast=True)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b)

    m = _bn(lambda: nn.BatchNorm2d(4))
    T = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    check(m.eval(), x, xt, T)  # running statistics: an affine map PyTorch handles cheaply
    check(m.train(), x, None, T)  # no input tangent
    mb = _bn(lambda: nn.BatchNorm2d(4), torch.bfloat16)
    check(mb, x.bfloat16(), xt.bfloat16(), {n: torch.randn_like(p) for n, p in mb.named_parameters()})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check(m.train(), x, xt, T)
    # outside frozen_batchnorm the module would update its running statistics: PyTorch's forward does that
    m2 = _bn(lambda: nn.BatchNorm2d(4))
    with torch.no_grad(), fwAD.dual_level(), batchnorm_tangents(m2):
        m2(fwAD.make_dual(x, xt))
    assert m2.num_batches_tracked.item() == 1 and not torch.equal(m2.running_mean, torch.zeros(4))
    assert not calls
    # SyncBatchNorm (statistics across processes) is not patched at all
    sync = nn.SyncBatchNorm(4)
    with batchnorm_tangents(sync):
        assert "forward" not in sync.__dict__
