"""LayerDrop: structured depth dropout and pruning (Fan et al. 2019, https://arxiv.org/abs/1909.11556).

LayerDrop decides, per forward, which layers of each stack run; it never wraps or renames layers, so
parameter names (and pretrained-weight import) are the same with and without it. (The paper's code
wrapped the layers, which renamed their parameters and made the pretrained LXMERT weights load
silently into nothing; it also dropped layers at evaluation and drew them with replacement.)

Semantics (:class:`models.config.LayerDropConfig`):

* ``mode=prob``: in training each layer of a named stack is skipped with probability ``p`` (fairseq).
* ``mode=fixed``: in training exactly ``n_drop`` layers per named stack are skipped, drawn without
  replacement (the paper's "p=1": a 9-5-5 model runs 8-4-4 layers per step).
* Outside training nothing is random: ``eval=all`` runs every layer, ``eval=every_other`` runs
  layers 0, 2, 4, ... of the named stacks (fairseq's "layers to keep"). :func:`prune` builds the
  smaller model that keeps exactly those layers, renumbered, with their weights.

Drop decision k (the k-th training forward) is drawn from a generator seeded by ``(seed, k)`` only:
never torch's global RNG, so every DDP rank drops the same layers in a step (each rank runs the same
number of training forwards). Dropped layers get no gradient: under DDP use
``find_unused_parameters=True``.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from models.config import STACKS, LayerDropConfig

# Mixes the step counter into the seed; any fixed odd constant works, it only has to be the same on
# every rank.
_STEP_MIX = 1_000_003


class LayerDrop:
    """Chooses the layers that run in each forward.

    Args:
        cfg: The LayerDrop semantics.
        depths: Layers per stack, e.g. ``{"lang": 9, "visn": 5, "cross": 5}``.

    Attributes:
        step: Training forwards decided so far (set it when resuming to continue the same sequence).
        last: The layer indices per stack that ran in the latest forward.
    """

    def __init__(self, cfg: LayerDropConfig, depths: dict[str, int]):
        self.cfg = cfg
        self.depths = dict(depths)
        self.stacks = cfg.stack_list() if cfg.mode != "none" or cfg.eval != "all" else []
        self.step = 0
        self._all = {s: list(range(n)) for s, n in self.depths.items()}
        self._eval = self.eval_plan()
        self.last: dict[str, list[int]] = self._all

    def eval_plan(self) -> dict[str, list[int]]:
        """The deterministic keep-list used outside training."""
        if self.cfg.eval == "all":
            return self._all
        return {s: (idx[::2] if s in self.stacks else idx) for s, idx in self._all.items()}

    def plan(self, training: bool) -> dict[str, list[int]]:
        """Layer indices to run per stack (ascending), and record them in :attr:`last`."""
        if not training or self.cfg.mode == "none":
            self.last = self._eval if not training else self._all
            return self.last
        gen = torch.Generator().manual_seed(self.cfg.seed * _STEP_MIX + self.step)
        self.step += 1
        plan = {}
        for stack in STACKS:  # fixed order: the same draws on every rank
            n = self.depths[stack]
            if stack not in self.stacks or n == 0:
                plan[stack] = self._all[stack]
            elif self.cfg.mode == "fixed":
                dropped = set(torch.randperm(n, generator=gen)[: self.cfg.n_drop].tolist())
                plan[stack] = [i for i in range(n) if i not in dropped]
            else:
                keep = (torch.rand(n, generator=gen) >= self.cfg.p).tolist()
                plan[stack] = [i for i in range(n) if keep[i]]
        self.last = plan
        return plan


def set_step(model: nn.Module, step: int) -> int:
    """Set the decision counter of every :class:`LayerDrop` inside ``model`` (e.g. to the number of
    training forwards done before a checkpoint, so a resumed run continues the same drop sequence).

    Returns:
        How many LayerDrop planners were set.
    """
    planners = [m.layerdrop for m in model.modules() if isinstance(getattr(m, "layerdrop", None), LayerDrop)]
    for planner in planners:
        planner.step = int(step)
    return len(planners)


def prune(model: nn.Module, keep: dict[str, list[int]] | None = None) -> nn.Module:
    """A copy of ``model`` with only the kept layers, renumbered 0..n-1, weights carried over.

    The pruned model computes exactly what the full model computes when it skips the other layers
    (e.g. ``layerdrop.eval=every_other`` in eval mode). Its config has the new layer counts and
    LayerDrop switched off.

    Args:
        model: An :class:`models.lxmert.LxmertForVQA` (or anything with ``.config`` and ``.encoder``
            reachable as ``model.lxmert.encoder``).
        keep: Layer indices to keep per stack (``lang | visn | cross``); default: the model's
            ``layerdrop.eval`` keep-list (every other layer of the LayerDrop stacks).

    Returns:
        The pruned model (the input is not modified).
    """
    encoder = model.lxmert.encoder
    keep = keep if keep is not None else encoder.layerdrop.eval_plan()
    pruned = copy.deepcopy(model)
    enc = pruned.lxmert.encoder
    lists = {"lang": "lang_layers", "visn": "visn_layers", "cross": "cross_layers"}
    for stack, attr in lists.items():
        layers = getattr(enc, attr)
        idx = keep.get(stack, list(range(len(layers))))
        bad = [i for i in idx if not 0 <= i < len(layers)]
        if bad or len(set(idx)) != len(idx):
            raise ValueError(f"prune: keep[{stack!r}]={idx} is not a list of distinct layer indices < {len(layers)}")
        setattr(enc, attr, nn.ModuleList([layers[i] for i in sorted(idx)]))
    cfg = pruned.config
    # With flow=mixed, the first flow_merged_from fusion layers are LXMERT cross layers: count the kept ones.
    kept_cross = sorted(keep.get("cross", range(len(encoder.cross_layers))))
    merged_from = sum(i < cfg.flow_merged_from for i in kept_cross) if cfg.flow == "mixed" else cfg.flow_merged_from
    cfg = dataclasses.replace(
        cfg,
        l_layers=len(enc.lang_layers),
        r_layers=len(enc.visn_layers),
        x_layers=len(enc.cross_layers),
        layerdrop=LayerDropConfig(),
        flow_merged_from=merged_from,
    )
    pruned.config = cfg
    enc.config = cfg
    enc.layerdrop = LayerDrop(cfg.layerdrop, cfg.depths)
    return pruned
