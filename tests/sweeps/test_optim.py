"""LAMB against a public implementation and the paper's formulas; Lookahead and schedules by hand."""

import math

import numpy as np
import pytest
import torch

from sweeps.optim import Lamb, Lookahead, build_optimizer, build_schedule


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))]


def _grads(step, shapes):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(*s, generator=g) for s in shapes]


def test_lamb_matches_torch_optimizer_without_bias_correction():
    torch_optimizer = pytest.importorskip("torch_optimizer")
    ours_p, ref_p = _params(), _params()
    ours = Lamb(ours_p, lr=0.01, weight_decay=0.1, eps=1e-6, max_weight_norm=10.0, bias_correction=False)
    ref = torch_optimizer.Lamb(ref_p, lr=0.01, weight_decay=0.1, eps=1e-6, clamp_value=10.0, debias=False)
    for step in range(6):
        for group, opt in ((ours_p, ours), (ref_p, ref)):
            for p, g in zip(group, _grads(step, [p.shape for p in group])):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_lamb_bias_corrected_step_matches_paper_formula():
    params = _params()
    w0 = [p.detach().numpy().astype(np.float64).copy() for p in params]
    opt = Lamb(params, lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01, max_weight_norm=2.0)
    m = [np.zeros_like(w) for w in w0]
    v = [np.zeros_like(w) for w in w0]
    w = [x.copy() for x in w0]
    for t in range(1, 4):
        grads = _grads(t, [p.shape for p in params])
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            g = g.numpy().astype(np.float64)
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.99 * v[i] + 0.01 * g * g
            u = (m[i] / (1 - 0.9**t)) / (np.sqrt(v[i] / (1 - 0.99**t)) + 1e-6) + 0.01 * w[i]
            phi = min(np.linalg.norm(w[i]), 2.0)
            w[i] = w[i] - 0.05 * phi / np.linalg.norm(u) * u
    for p, expected in zip(params, w):
        np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_lookahead_syncs_every_k_steps_towards_fast_weights():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Lookahead(torch.optim.SGD([p], lr=0.1), k=3, alpha=0.5)
    slow = p.detach().clone()
    fast = p.detach().clone()
    for step in range(1, 8):
        g = torch.tensor([float(step), 1.0])
        p.grad = g.clone()
        opt.step()
        fast = fast - 0.1 * g
        if step % 3 == 0:
            slow = slow + 0.5 * (fast - slow)
            fast = slow.clone()
        torch.testing.assert_close(p.detach(), fast)


def test_lookahead_state_round_trip_continues_identically():
    def run(split):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = build_optimizer(model, "lookahead_lamb", lr=0.01, weight_decay=0.01, lookahead_k=2)
        sched = build_schedule(opt, "cyclic", total_steps=10, lr_min=1e-4, cycle_steps=3)
        for step in range(7):
            if step == split:
                state = (model.state_dict(), opt.state_dict(), sched.state_dict())
                model = torch.nn.Linear(3, 2)
                opt = build_optimizer(model, "lookahead_lamb", lr=0.01, weight_decay=0.01, lookahead_k=2)
                sched = build_schedule(opt, "cyclic", total_steps=10, lr_min=1e-4, cycle_steps=3)
                model.load_state_dict(state[0])
                opt.load_state_dict(state[1])
                sched.load_state_dict(state[2])
            x = torch.linspace(-1, 1, 12).reshape(4, 3) * (step + 1)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        return model.weight.detach().clone()

    torch.testing.assert_close(run(split=-1), run(split=3))


def test_linear_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_schedule(opt, "linear", total_steps=100, warmup_ratio=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[5] < lrs[9] <= 1.0
    assert max(lrs) == pytest.approx(max(lrs[8:12]))
    assert lrs[-1] == pytest.approx(1 / 90)  # (total - step) / (total - warmup) at the last step
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_cyclic_schedule_is_triangular_between_bounds():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = build_schedule(opt, "cyclic", total_steps=1000, lr_min=1e-5, cycle_steps=10)
    lrs = []
    for _ in range(41):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-5)
    assert lrs[10] == pytest.approx(1e-4)
    assert lrs[20] == pytest.approx(1e-5)
    assert lrs[5] == pytest.approx(5.5e-5)
    assert lrs[30] == pytest.approx(1e-4) and lrs[40] == pytest.approx(1e-5)


def test_weight_decay_skips_biases_norms_and_adaptive_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    model.register_parameter("span_z", torch.nn.Parameter(torch.ones(4)))
    opt = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}
    assert not math.isnan(opt.param_groups[0]["lr"])
