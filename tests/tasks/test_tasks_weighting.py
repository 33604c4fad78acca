"""Task weighting strategies: grad_std against a hand-computed case, its zero-gradient and
missing-task behaviour, uncertainty weighting's optimum, GradNorm's balancing, state round trips."""

from __future__ import annotations

import math

import pytest
import torch

from tasks.pretrain.config import PretrainConfig
from tasks.pretrain.objectives import SMOOTH_L1_CHANCE, chance_scales
from tasks.pretrain.weighting import REGISTRY, build, gradient_moments


def linear_losses(theta: torch.Tensor, scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """L_t = <a_t, θ>: the gradient of task t is exactly a_t."""
    return {t: (theta * a).sum() for t, a in scales.items()}


def test_grad_std_matches_the_hand_computed_formula():
    # Two tasks on 4 shared parameters with known gradients:
    #   g_mlm = [3, -3, 3, -3]: std 3 (mean 0), n = 4 terms,  c = 1  -> s = 3 * sqrt(4) / 1  = 6
    #   g_qa  = [1, -1, 1, -1]: std 1,          n = 16 terms, c = 2  -> s = 1 * sqrt(16) / 2 = 2
    #   w ∝ (1/6, 1/2), normalised to sum to T = 2:  w = 2 * (1/6, 1/2) / (2/3) = (0.5, 1.5)
    theta = torch.zeros(4, requires_grad=True)
    grads = {"mlm": torch.tensor([3.0, -3, 3, -3]), "qa": torch.tensor([1.0, -1, 1, -1])}
    strategy = build("grad_std", ["mlm", "qa"], {"mlm": 1.0, "qa": 2.0}, PretrainConfig(weight_every=2))
    weights = strategy.update(0, linear_losses(theta, grads), [theta], {"mlm": 4, "qa": 16})
    assert weights == pytest.approx({"mlm": 0.5, "qa": 1.5}, rel=1e-12)
    assert strategy.signals() == pytest.approx({"s_mlm": 6.0, "grad_std_mlm": 3.0, "s_qa": 2.0, "grad_std_qa": 1.0})
    # the weighted total is what trains: 0.5 * L_mlm + 1.5 * L_qa
    total = strategy.combine(linear_losses(theta, grads))
    (g,) = torch.autograd.grad(total, theta)
    torch.testing.assert_close(g, 0.5 * grads["mlm"] + 1.5 * grads["qa"])
    # weight_every=2: step 1 keeps the weights of step 0 although the gradients changed; step 2 re-measures
    changed = {"mlm": grads["mlm"], "qa": 3 * grads["qa"]}  # s_qa = 3 * 4 / 2 = 6 = s_mlm
    assert strategy.update(1, linear_losses(theta, changed), [theta], {"mlm": 4, "qa": 16}) == pytest.approx(weights)
    assert strategy.update(2, linear_losses(theta, changed), [theta], {"mlm": 4, "qa": 16}) == pytest.approx({"mlm": 1.0, "qa": 1.0})


def test_grad_std_uses_the_population_std_over_all_shared_parameters():
    # Two parameter tensors, one unused by the task (its gradient is None: zeros count).
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, 2, requires_grad=True)
    loss = (a * torch.tensor([1.0, 2.0, 3.0])).sum()
    grads = torch.autograd.grad(loss, [a, b], allow_unused=True)
    std, norm = gradient_moments(list(grads), [3, 4])
    values = torch.tensor([1.0, 2, 3, 0, 0, 0, 0], dtype=torch.float64)
    assert std == pytest.approx(float(values.std(correction=0))) and norm == pytest.approx(math.sqrt(14))


def test_grad_std_weights_stay_finite_with_a_zero_gradient_or_an_absent_task():
    theta = torch.zeros(4, requires_grad=True)
    g = torch.tensor([3.0, -3, 3, -3])
    strategy = build("grad_std", ["mlm", "mor", "qa"], {"mlm": 1.0, "mor": 1.0, "qa": 1.0}, PretrainConfig(weight_every=1))
    # qa's gradient is exactly zero: s_qa = 0 is floored at 0.1 * mean(s) = 0.1 * (6 + 6 + 0) / 3 = 0.4
    losses = {"mlm": (theta * g).sum(), "mor": (theta * g).sum(), "qa": (theta * 0).sum()}
    w = strategy.update(0, losses, [theta], {"mlm": 4, "mor": 4, "qa": 4})
    assert all(math.isfinite(v) and v > 0 for v in w.values())
    inv = [1 / 6, 1 / 6, 1 / 0.4]
    assert [w["mlm"], w["mor"], w["qa"]] == pytest.approx([3 * v / sum(inv) for v in inv])
    assert sum(w.values()) == pytest.approx(3.0)
    # a task with no terms in the batch (n = 0) keeps its last estimate instead of dropping to 0
    w2 = strategy.update(1, {"mlm": (theta * g).sum(), "mor": (theta * g).sum(), "qa": (theta * 0).sum()},
                         [theta], {"mlm": 4, "mor": 4, "qa": 0})  # fmt: skip
    assert w2 == pytest.approx(w)
    # every gradient zero: nothing to balance, equal weights (not 0/0)
    fresh = build("grad_std", ["mlm", "qa"], {"mlm": 1.0, "qa": 1.0}, PretrainConfig(weight_every=1))
    assert fresh.update(0, {"mlm": (theta * 0).sum(), "qa": (theta * 0).sum()}, [theta],
                        {"mlm": 1, "qa": 1}) == {"mlm": 1.0, "qa": 1.0}  # fmt: skip
    # a task that joins later (the schedule) counts as average until measured; inactive tasks get no weight
    late = build("grad_std", ["mlm", "qa"], {"mlm": 1.0, "qa": 1.0}, PretrainConfig(weight_every=5))
    assert late.update(0, {"mlm": (theta * g).sum()}, [theta], {"mlm": 4}) == {"mlm": 1.0}
    assert late.update(1, {"mlm": (theta * g).sum(), "qa": (theta * g).sum()}, [theta],
                       {"mlm": 4, "qa": 4}) == pytest.approx({"mlm": 1.0, "qa": 1.0})  # fmt: skip


def test_chance_scales_are_the_uninformed_output_gradient_norms():
    sizes = {"vocab_size": 30522, "num_object_labels": 1600, "num_attr_labels": 400, "visual_feat_dim": 2048,
             "num_qa_answers": 9500}  # fmt: skip
    c = chance_scales(["mlm", "mor", "match", "qa"], sizes)
    assert c["match"] == pytest.approx(math.sqrt(0.5)) and c["qa"] == pytest.approx(math.sqrt(1 - 1 / 9500))
    assert c["mor"] == pytest.approx(math.sqrt(SMOOTH_L1_CHANCE / 2048 + (1 - 1 / 1600) + (1 - 1 / 400)))
    # softmax CE at the uniform prediction: ||p - y||^2 = 1 - 1/K, checked numerically
    logits = torch.zeros(1, 7, requires_grad=True)
    torch.nn.functional.cross_entropy(logits, torch.tensor([2])).backward()
    assert float(logits.grad.norm()) == pytest.approx(math.sqrt(1 - 1 / 7))
    # SmoothL1 averaged over F standard-normal residuals: E||grad||^2 = (1 - 2 phi(1)) / F
    pred = torch.zeros(20000, 8, requires_grad=True)
    torch.nn.functional.smooth_l1_loss(pred, torch.randn(20000, 8, generator=torch.Generator().manual_seed(0)),
                                       reduction="none").mean(-1).sum().backward()  # fmt: skip
    assert float((pred.grad**2).sum(1).mean()) == pytest.approx(SMOOTH_L1_CHANCE / 8, rel=0.03)


def test_equal_weighting_adds_the_losses():
    theta = torch.ones(2, requires_grad=True)
    strategy = build("equal", ["mlm", "qa"], {"mlm": 1.0, "qa": 1.0}, PretrainConfig())
    losses = {"mlm": theta.sum(), "qa": 2 * theta.sum()}
    assert strategy.update(0, losses, [theta], {"mlm": 1, "qa": 1}) == {"mlm": 1.0, "qa": 1.0}
    assert float(strategy.combine(losses).detach()) == 6.0
    assert not list(strategy.parameters()) and not strategy.needs_grads


def test_uncertainty_weighting_learns_inverse_loss_weights():
    strategy = build("uncertainty", ["mlm", "match"], {"mlm": 1.0, "match": 1.0}, PretrainConfig())
    losses = {"mlm": torch.tensor(4.0), "match": torch.tensor(0.5)}
    assert strategy.update(0, losses, [], {}) == {"mlm": 1.0, "match": 1.0}  # starts as equal weighting
    assert float(strategy.combine(losses).detach()) == pytest.approx(4.5)
    opt = torch.optim.Adam(strategy.parameters(), lr=0.05)
    for _ in range(600):  # Σ exp(-s) L + s is minimised at exp(-s) = 1 / L
        opt.zero_grad()
        strategy.combine(losses).backward()
        opt.step()
    w = strategy.update(1, losses, [], {})
    assert w == pytest.approx({"mlm": 0.25, "match": 2.0}, rel=0.02)
    assert strategy.signals()["log_var_mlm"] == pytest.approx(math.log(4.0), abs=0.02)


def test_gradnorm_moves_weights_toward_equal_weighted_gradient_norms():
    theta = torch.zeros(4, requires_grad=True)
    big, small = torch.full((4,), 4.0), torch.full((4,), 1.0)
    cfg = PretrainConfig(weight_every=1, gradnorm_alpha=0.0, gradnorm_lr=0.05)
    strategy = build("gradnorm", ["mor", "qa"], {"mor": 1.0, "qa": 1.0}, cfg)
    for step in range(40):
        # constant losses (equal training rates): the target is the mean weighted gradient norm
        losses = {"mor": (theta * big).sum() + 2.0, "qa": (theta * small).sum() + 1.0}
        w = strategy.update(step, losses, [theta], {"mor": 8, "qa": 8})
    assert sum(w.values()) == pytest.approx(2.0)
    assert w["qa"] > 1.5 > 0.5 > w["mor"]  # ||g_qa|| = 2, ||g_mor|| = 8: qa must weigh ~4x more
    assert w["qa"] / w["mor"] == pytest.approx(4.0, rel=0.25)
    # alpha > 0: a task whose loss has fallen less (relative to L(0)) gets a larger target
    cfg = PretrainConfig(weight_every=1, gradnorm_alpha=1.5, gradnorm_lr=0.05)
    strategy = build("gradnorm", ["mor", "qa"], {"mor": 1.0, "qa": 1.0}, cfg)
    strategy.update(0, {"mor": (theta * small).sum() + 2.0, "qa": (theta * small).sum() + 2.0}, [theta],
                    {"mor": 8, "qa": 8})  # fmt: skip
    for step in range(1, 40):  # same gradients; mor's loss halved, qa's did not move
        w = strategy.update(step, {"mor": (theta * small).sum() + 1.0, "qa": (theta * small).sum() + 2.0},
                            [theta], {"mor": 8, "qa": 8})  # fmt: skip
    assert w["qa"] > w["mor"]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_strategy_round_trips_its_state(name):
    theta = torch.zeros(3, requires_grad=True)
    cfg = PretrainConfig(weight_every=1)
    a = build(name, ["mlm", "qa"], {"mlm": 1.0, "qa": 0.5}, cfg)
    for step in range(3):
        losses = {"mlm": (theta * torch.tensor([1.0, 2, 3])).sum() + 3, "qa": (theta * torch.tensor([0.0, 1, 0])).sum() + 1}
        a.update(step, losses, [theta], {"mlm": 5, "qa": 2})
        if name == "uncertainty":
            a.log_var.data += 0.1
    b = build(name, ["mlm", "qa"], {"mlm": 1.0, "qa": 0.5}, cfg)
    b.load_state_dict(a.state_dict())
    losses = {"mlm": (theta * torch.tensor([1.0, 2, 3])).sum() + 3, "qa": (theta * torch.tensor([0.0, 1, 0])).sum() + 1}
    assert a.update(5, losses, [theta], {"mlm": 5, "qa": 2}) == pytest.approx(b.update(5, losses, [theta], {"mlm": 5, "qa": 2}))


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(KeyError, match="equal, grad_std, uncertainty, gradnorm"):
        build("pcgrad", ["mlm"], {"mlm": 1.0}, PretrainConfig())
