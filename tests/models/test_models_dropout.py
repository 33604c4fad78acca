"""The CPU dropout: the same Bernoulli distribution and scaling as nn.Dropout, identity in eval."""

import torch

from models.dropout import Dropout, dropout


def test_drops_at_rate_p_scales_the_rest_and_backprops_through_the_mask():
    torch.manual_seed(0)
    x = torch.ones(200, 500, requires_grad=True)
    y = dropout(x, 0.3, training=True)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # d(x * mask)/dx = mask


def test_identity_outside_training_and_repeatable_under_a_seed():
    x = torch.randn(4, 5)
    module = Dropout(0.5).eval()
    assert module(x) is x and dropout(x, 0.0, training=True) is x
    torch.manual_seed(3)
    a = Dropout(0.5).train()(x)
    torch.manual_seed(3)
    assert torch.equal(a, Dropout(0.5).train()(x))
    assert dropout(x.bfloat16(), 0.5, True).dtype == torch.bfloat16
