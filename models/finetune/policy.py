"""SpotTune's policy: a small LXMERT over the same question and regions that picks, per sample and unit,
the fine-tuned or the frozen copy.

:class:`PolicyNetwork`: embeddings + ``policy_l_layers`` / ``policy_r_layers`` / ``policy_x_layers``
layers (2-1-1 by default, as the reference code) + pooler, then an MLP (Linear(H, 2H), GeLU,
LayerNorm, Linear(2H, 2D)) to two logits per decision (class 1 = fine-tuned). Its attention is plain
softmax whatever the encoder uses (an adaptive kernel in the policy would report stats under the
encoder's site names).

:class:`SpotTunePolicy` turns the logits into decisions: a straight-through Gumbel-Softmax sample in
training, and outside training ``argmax`` (no noise: deterministic), ``sample`` or ``global`` (the
units that more than half of the epoch's training samples fine-tuned). It also carries the optional
losses (``aux_loss``: constrain-k, usage entropy) and the policy-entropy statistic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from models.builders import backbone, init_weights
from models.config import AttentionConfig, ConfigError, FinetuneConfig, LayerDropConfig, ModelConfig
from models.finetune.gates import straight_through_gumbel
from models.heads import VQAHead
from models.lxmert import LxmertModel


def policy_config(cfg: ModelConfig) -> ModelConfig:
    """The policy network's config: the encoder's, with the policy's depths and width, softmax
    attention, no LayerDrop, standard fine-tuning. The feed-forward keeps the encoder's width ratio."""
    ft = cfg.finetune
    hidden = ft.policy_hidden or cfg.hidden_size
    return dataclasses.replace(
        cfg,
        hidden_size=hidden,
        num_heads=ft.policy_heads or cfg.num_heads,
        intermediate_size=max(1, round(cfg.intermediate_size * hidden / cfg.hidden_size)),
        l_layers=ft.policy_l_layers,
        x_layers=ft.policy_x_layers,
        r_layers=ft.policy_r_layers,
        attention=AttentionConfig(),
        layerdrop=LayerDropConfig(),
        finetune=FinetuneConfig(),
    )


class PolicyNetwork(nn.Module):
    """A small LXMERT and an MLP: (question, regions) -> (B, D, 2) logits (class 1 = fine-tuned).

    Args:
        cfg: The policy's own config (:func:`policy_config`).
        num_decisions: D.
    """

    def __init__(self, cfg: ModelConfig, num_decisions: int):
        super().__init__()
        self.config = cfg
        self.num_decisions = num_decisions
        self.lxmert = backbone(cfg)
        self.head = VQAHead(cfg.hidden_size, 2 * num_decisions, cfg.layer_norm_eps)
        init_weights(self, cfg.initializer_range)

    def copy_from(self, encoder: LxmertModel) -> None:
        """Start from ``encoder``'s weights: embeddings, its first layers of each stack and the pooler.

        Every parameter of the policy's encoder must find its counterpart (same name, same shape), or
        this raises naming it; the head stays at its initialisation.
        """
        source = encoder.state_dict()
        target = self.lxmert.state_dict()
        missing = [k for k in target if k not in source]
        shapes = [k for k in target if k in source and source[k].shape != target[k].shape]
        if missing or shapes:
            raise ConfigError(
                "finetune.policy_init=copy: the encoder has no counterpart for the policy's "
                f"{missing[:5]} (missing) / {shapes[:5]} (other shape); set finetune.policy_init=random"
            )
        self.lxmert.load_state_dict({k: source[k] for k in target}, strict=True)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        token_type_ids: Tensor | None,
        visual_feats: Tensor,
        visual_pos: Tensor,
        visual_attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Inputs as :meth:`LxmertModel.forward` -> (B, D, 2) logits."""
        pooled = self.lxmert(
            input_ids, attention_mask, token_type_ids, visual_feats, visual_pos, visual_attention_mask
        ).pooled
        return self.head(pooled).view(-1, self.num_decisions, 2)


class SpotTunePolicy(nn.Module):
    """Decisions from the policy network, the optional policy losses and the policy statistics.

    Args:
        network: The :class:`PolicyNetwork`.
        cfg: ``model.finetune`` (temperature, schedule, eval mode, losses).

    Attributes:
        temperature: Current Gumbel-Softmax temperature (:meth:`set_temperature`).
        eval_mode: ``argmax | sample | global``.
        forced: None, or (D,) decisions used instead of the policy (tests and diagnostics).
        last: (B, D) decisions of the last forward (detached), for per-sample analysis
            (e.g. usage per question type).
    """

    def __init__(self, network: PolicyNetwork, cfg: FinetuneConfig):
        super().__init__()
        self.network = network
        self.num_decisions = network.num_decisions
        self.cfg = cfg
        self.temperature = cfg.temperature
        self.eval_mode = cfg.eval_mode
        self.forced: Tensor | None = None
        self.last: Tensor | None = None
        self._sampled: Tensor | None = None  # (B, D) training decisions with their gradient, for aux_loss
        self.register_buffer("entropy_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("entropy_seen", torch.zeros((), dtype=torch.long))

    def set_temperature(self, epoch: int, step: int) -> float:
        """Set and return the temperature of ``finetune.temperature_schedule`` at (epoch, step)."""
        self.temperature = self.cfg.temperature_at(epoch, step)
        return self.temperature

    def decide(
        self,
        inputs: tuple[Tensor | None, ...],
        batch_size: int,
        global_decisions: Callable[[], Tensor],
    ) -> Tensor:
        """The (B, D) decisions (1 = fine-tuned) for one forward.

        Args:
            inputs: (input_ids, attention_mask, token_type_ids, visual_feats, visual_pos,
                visual_attention_mask) as the encoder gets them.
            batch_size: B.
            global_decisions: Returns the (D,) fixed policy (``eval_mode=global``).
        """
        self._sampled = None
        if self.forced is not None:
            if self.forced.dim() == 2 and self.forced.shape[0] != batch_size:
                raise ValueError(f"forced decisions are for {self.forced.shape[0]} samples; the batch has {batch_size}")
            d = self.forced.to(inputs[0].device).expand(batch_size, -1)
        elif not self.training and self.eval_mode == "global":
            d = global_decisions().to(inputs[0].device).expand(batch_size, -1)
        else:
            logits = self.network(*inputs).float()  # (B, D, 2)
            if self.training:
                d = straight_through_gumbel(logits, self.temperature)
                self._sampled = d
                with torch.no_grad():
                    p = logits.softmax(-1)
                    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)  # (B, D) nats
                    self.entropy_sum += entropy.mean(1).sum().double()
                    self.entropy_seen += batch_size
            elif self.eval_mode == "argmax":
                d = (logits[..., 1] > logits[..., 0]).float()
            else:
                d = straight_through_gumbel(logits, self.temperature).detach()
        self.last = d.detach()
        return d

    def aux_loss(self) -> Tensor:
        """Constrain-k ``scale * (sum_u usage_u - K) ** 2`` + ``entropy_weight * mean_u H(usage_u)``.

        ``usage_u`` is unit u's batch mean of the last training forward's decisions (straight-through,
        so the loss reaches the policy); ``H`` is the binary entropy in nats. 0 when both are off or
        the last forward was not a policy-driven training forward.
        """
        zero = self.entropy_sum.new_zeros((), dtype=torch.float32)
        d = self._sampled
        if d is None or (self.cfg.constrain_scale == 0 and self.cfg.entropy_weight == 0):
            return zero
        usage = d.mean(0)  # (D,)
        loss = zero
        if self.cfg.constrain_scale:
            loss = loss + self.cfg.constrain_scale * (usage.sum() - self.cfg.constrain_k) ** 2
        if self.cfg.entropy_weight:
            u = usage.clamp(1e-6, 1 - 1e-6)
            loss = loss + self.cfg.entropy_weight * (-(u * u.log() + (1 - u) * (1 - u).log())).mean()
        return loss

    def stats(self) -> dict[str, Tensor]:
        """``entropy``: mean policy entropy (nats per decision) over the training samples since the last
        :meth:`reset_usage`; ``temperature``: the current one."""
        seen = int(self.entropy_seen)
        entropy = self.entropy_sum / seen if seen else torch.tensor(float("nan"), dtype=torch.float64)
        return {"entropy": entropy.float().reshape(1), "temperature": torch.tensor([self.temperature])}

    def reset_usage(self) -> None:
        """Zero the entropy accumulators (with the units' usage counts, at the start of each epoch)."""
        self.entropy_sum.zero_()
        self.entropy_seen.zero_()

    def extra_repr(self) -> str:
        return f"decisions={self.num_decisions}, eval_mode={self.eval_mode}"
