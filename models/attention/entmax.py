"""alpha-entmax attention (Correia et al. 2019, https://arxiv.org/abs/1909.00015).

``alpha_entmax(x, alpha)`` maps scores ``x`` to ``p_i = [(alpha - 1) x_i - tau]_+ ^ (1 / (alpha - 1))``
with ``tau`` chosen so that ``sum(p) = 1`` (Peters et al. 2019, https://arxiv.org/abs/1905.05702):
alpha -> 1 is softmax, alpha = 1.5 is entmax15, alpha = 2 is sparsemax.

Solvers (all run in float32 whatever the input dtype):

* learned alpha (a tensor, one value per head): Newton's method on ``f(tau) = sum(p(tau)) - 1``.
  ``f`` is convex and decreasing in ``tau``; the start ``tau_0 = max(max - 1, mean - n^(1 - alpha))``
  (the largest score alone; Jensen's inequality over the n candidate keys) has ``f >= 0``, so every
  Newton step stays left of the root and the iterates increase monotonically to it, with no
  bracketing and no overshoot. It converges in 2-6 iterations in float32 where the ``entmax``
  package's bisection spends 50 (or ~24 at float32 precision).
* alpha = 1.5 and alpha = 2: the exact sort-based thresholds (Peters et al. 2019, Martins & Astudillo
  2016, https://arxiv.org/abs/1602.02068).

The backward pass is closed-form and shared: with ``g = p^(2 - alpha)`` on the support,
``dx = g * (dp - sum(g * dp) / sum(g))``; and, for a learned alpha, Correia et al.'s eq. (10) for
``d alpha``. Both are invariant to a per-row rescaling of ``g``, so ``g`` is formed as ``p / t`` from
the forward's ``t = (alpha - 1) x - tau`` (no second ``pow``). The ``entmax`` package is the test
oracle (``entmax_bisect``, ``entmax15``, ``sparsemax``), not a runtime dependency.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.attention.softmax import attention_dropout
from models.config import AttentionConfig

# t below this counts as outside the support when forming p / t (t^(p-1) without a second pow).
_TINY = 1e-30


def _sparsemax_tau(x: Tensor) -> Tensor:
    """Exact sparsemax threshold along the last dim of ``x`` (max already subtracted). Shape (..., 1)."""
    srt, _ = torch.sort(x, dim=-1, descending=True)
    cum = srt.cumsum(-1) - 1
    rho = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
    support = (rho * srt > cum).sum(-1, keepdim=True)
    return cum.gather(-1, support - 1) / support.to(x.dtype)


def _entmax15_tau(x: Tensor) -> Tensor:
    """Exact 1.5-entmax threshold for ``x`` already halved and max-shifted. Shape (..., 1)."""
    srt, _ = torch.sort(x, dim=-1, descending=True)
    rho = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
    mean = srt.cumsum(-1) / rho
    mean_sq = (srt * srt).cumsum(-1) / rho
    delta = (1 - rho * (mean_sq - mean * mean)) / rho
    tau = mean - delta.clamp_min(0).sqrt()
    support = (tau <= srt).sum(-1, keepdim=True)
    return tau.gather(-1, support - 1)


def _newton(x: Tensor, power: Tensor, max_iter: int, tol: float) -> tuple[Tensor, Tensor]:
    """alpha-entmax by monotone Newton iteration on the threshold.

    Args:
        x: (..., K) float32 scores already multiplied by (alpha - 1) and shifted so the row max is 0.
        power: 1 / (alpha - 1), broadcastable to x's leading dims, e.g. (1, H, 1, 1).
        max_iter: Iteration cap.
        tol: Stop once ``max |sum(p) - 1| < tol`` over all rows.

    Returns:
        (t, t^power): ``t = [x - tau]_+`` at the final threshold and the unnormalised probabilities.
    """
    # Start from a threshold with f(tau) >= 0, as high as cheaply known: tau = -1 (the max alone), or
    # by Jensen over the n candidates (x > -1, the only keys that can enter the support)
    # sum (x - tau)_+^power >= n (mean - tau)^power, which is >= 1 at tau = mean - n^(-1/power).
    # The latter is exact for uniform rows, e.g. at initialisation; it saves 1-4 iterations.
    cand = x > -1
    n = cand.sum(-1, keepdim=True, dtype=x.dtype)
    mean = (x * cand).sum(-1, keepdim=True) / n  # (x * bool: torch.where with a scalar is slower)
    tau = torch.maximum(mean - n.pow(-1.0 / power), torch.full_like(mean, -1.0))
    t = torch.empty_like(x)
    tp = torch.empty_like(x)
    for _ in range(max_iter):
        torch.sub(x, tau, out=t).clamp_min_(0)
        torch.pow(t, power, out=tp)
        f = tp.sum(-1, keepdim=True).sub_(1)
        # One host sync per iteration: cheap next to the pow, and it stops after 2-6 iterations.
        if float(f.abs().max()) < tol:
            return t, tp  # t and t^power already belong to the final tau
        # f'(tau) = -power * sum t^(power - 1) = -power * sum(t^power / t) on the support.
        slope = tp.div_(t.clamp_min_(_TINY)).sum(-1, keepdim=True).mul_(power)
        tau = tau + f / slope
    t = (x - tau).clamp_min_(0)
    return t, t.pow(power)


class _AlphaEntmax(torch.autograd.Function):
    """alpha-entmax along the last dim, with gradients for the scores and (optionally) alpha."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, mode: str, max_iter: int, tol: float) -> Tensor:  # type: ignore[override]
        # x: (..., K) float32; alpha: broadcastable to x[..., :1], e.g. (1, H, 1, 1).
        am1 = alpha - 1
        x = (x - x.amax(-1, keepdim=True)) * am1  # shift first: masked scores stay finite
        if mode == "sparsemax":
            t = (x - _sparsemax_tau(x)).clamp_min_(0)
            p = t
        elif mode == "entmax15":
            t = (x - _entmax15_tau(x)).clamp_min_(0)
            p = t * t
        else:
            t, p = _newton(x, 1.0 / am1, max_iter, tol)
        p = p / p.sum(-1, keepdim=True)
        ctx.save_for_backward(p, t, alpha)
        ctx.mode = mode
        return p

    @staticmethod
    def backward(ctx, dp: Tensor):  # type: ignore[override]
        p, t, alpha = ctx.saved_tensors
        # g = p^(2 - alpha) up to a per-row factor: t^(power - 1) = t^power / t, and p is t^power
        # normalised, so p / t is g rescaled per row; every formula below is invariant to that.
        g = p / t.clamp_min(_TINY)
        gdp = g * dp
        q = gdp.sum(-1, keepdim=True) / g.sum(-1, keepdim=True)  # sum(dp * g) / sum(g)
        d_alpha = None
        if ctx.needs_input_grad[1]:
            # Correia et al. (2019), eq. 10, with the sums taken first (all (..., 1) tensors after):
            # d alpha = [sum dp (p - g~)] / (alpha-1)^2 - [sum dp (p log p - g~ H)] / (alpha-1),
            # where g~ = g / sum(g), H = sum p log p, and sum(dp g~) = q.
            am1 = alpha - 1
            plogp = p * torch.log(p.clamp_min(_TINY))  # exactly 0 where p = 0
            dp_p = (dp * p).sum(-1, keepdim=True)
            dp_plogp = (dp * plogp).sum(-1, keepdim=True)
            ent = plogp.sum(-1, keepdim=True)
            d_alpha = (dp_p - q) / (am1 * am1) - (dp_plogp - q * ent) / am1
            # Reduce to alpha's own (broadcast) shape, e.g. (1, H, 1, 1).
            dims = [i for i, n in enumerate(alpha.shape) if n == 1 and d_alpha.shape[i] != 1]
            if dims:
                d_alpha = d_alpha.sum(dims, keepdim=True)
        dx = gdp.sub_(g * q)  # g * (dp - q)
        return dx, d_alpha, None, None, None


def alpha_entmax(
    x: Tensor, alpha: Tensor | float, *, max_iter: int = 30, tol: float = 1e-5
) -> Tensor:
    """alpha-entmax of ``x`` along the last dim, computed in float32.

    Args:
        x: (..., K) scores, any float dtype; masked keys carry a large negative additive mask.
        alpha: A float (1.5 and 2 use the exact sort-based solvers; others Newton) or a tensor
            broadcastable to ``x[..., :1]`` (e.g. (1, H, 1, 1) per head) that may require grad.
        max_iter: Newton iteration cap.
        tol: Newton stopping tolerance on ``|sum(p) - 1|``.

    Returns:
        (..., K) float32 probabilities; rows sum to 1; masked keys get exactly 0.
    """
    x = x.float()
    if isinstance(alpha, Tensor):
        return _AlphaEntmax.apply(x, alpha.float(), "newton", max_iter, tol)
    mode = {1.5: "entmax15", 2.0: "sparsemax"}.get(float(alpha), "newton")
    alpha_t = torch.tensor(float(alpha), device=x.device)
    return _AlphaEntmax.apply(x, alpha_t, mode, max_iter, tol)


#: A learned alpha that moved less than this from its initial value in every head is reported as
#: not engaged: the cell then computes (almost exactly) fixed-alpha entmax.
ALPHA_MOVED = 0.01


class EntmaxAttention(nn.Module):
    """Attention whose normaliser is alpha-entmax with a learned alpha per head (or a fixed one).

    Learned alpha = clamp(1 + sigmoid(w), alpha_min, alpha_max), recomputed in every forward so it
    can never leave (1, 2] (the paper's code squashed alpha only at initialisation). ``post_step``
    keeps ``w`` where the clamp still passes gradient, so a head cannot get stuck at the bound.

    Args:
        num_heads: Heads H (one alpha each).
        cfg: ``alpha_mode``, ``alpha_init``, ``alpha_min``, ``alpha_max``, ``entmax_iters``, ``entmax_tol``.
        span_max: Unused (uniform kernel signature).
        dropout: Dropout on the attention probabilities in training.
    """

    def __init__(self, num_heads: int, cfg: AttentionConfig, *, span_max: int = 0, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.mode = cfg.alpha_mode
        self.alpha_min, self.alpha_max = cfg.alpha_min, cfg.alpha_max
        self.max_iter, self.tol = cfg.entmax_iters, cfg.entmax_tol
        self.alpha_init = cfg.alpha_init
        if self.mode == "learned":
            w0 = math.log((cfg.alpha_init - 1) / (2 - cfg.alpha_init))  # logit(alpha_init - 1)
            self.alpha_logit = nn.Parameter(torch.full((num_heads,), w0))
        else:
            self.register_parameter("alpha_logit", None)

    def alpha(self) -> Tensor:
        """Per-head alpha, shape (H,)."""
        if self.alpha_logit is None:
            value = 1.5 if self.mode == "entmax15" else 2.0
            return torch.full((self.num_heads,), value)
        return (1 + torch.sigmoid(self.alpha_logit)).clamp(self.alpha_min, self.alpha_max)

    def normalise(self, scores: Tensor) -> Tensor:
        """(B, H, Q, K) masked scores -> (B, H, Q, K) float32 probabilities."""
        if self.alpha_logit is None:
            return alpha_entmax(scores, 1.5 if self.mode == "entmax15" else 2.0)
        alpha = self.alpha().view(1, -1, 1, 1)
        return alpha_entmax(scores, alpha, max_iter=self.max_iter, tol=self.tol)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, need_probs: bool = False,
        *, distance: object = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Args/returns as :meth:`models.attention.softmax.SoftmaxAttention.forward` (``distance`` unused)."""
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * (q.shape[-1] ** -0.5)
        if mask is not None:
            scores = scores + mask.float()
        probs = self.normalise(scores)
        out = torch.matmul(attention_dropout(probs.to(v.dtype), self.dropout, self.training), v)
        return out, probs if need_probs else None

    @torch.no_grad()
    def post_step(self) -> None:
        """Keep w inside the range the clamp maps to [alpha_min, alpha_max) with non-zero gradient."""
        if self.alpha_logit is not None:
            # A small margin inside both ends: at the exact bound the clamp's gradient may vanish.
            lo_a, hi_a = self.alpha_min + 1e-4, min(self.alpha_max, 1.999)
            lo = math.log((lo_a - 1) / (2 - lo_a))
            hi = math.log((hi_a - 1) / (2 - hi_a))
            self.alpha_logit.clamp_(lo, hi)

    def stats(self) -> dict[str, Tensor]:
        """``{"alpha": (H,)}``."""
        return {"alpha": self.alpha().detach().float().cpu()}

    def mechanism_parameters(self) -> list[nn.Parameter]:
        """The learned alpha's logits, for their own learning rate (none for a fixed alpha)."""
        return [] if self.alpha_logit is None else [self.alpha_logit]

    def engagement(self) -> dict[str, object] | None:
        """Whether the learned alpha left its starting value (by :data:`ALPHA_MOVED` in some head);
        ``None`` for a fixed alpha, which has no mechanism to engage."""
        if self.alpha_logit is None:
            return None
        alpha = self.alpha().detach().float().cpu()
        moved = float((alpha - self.alpha_init).abs().max())
        return {"mechanism": "alpha", "engaged": moved >= ALPHA_MOVED, "moved": moved,
                "low": float(alpha.min()), "high": float(alpha.max()), "init": self.alpha_init}

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, alpha={self.mode}, dropout={self.dropout}"


__all__ = ["EntmaxAttention", "alpha_entmax"]
