"""Hooks the training loop calls on every module that defines them (no isinstance checks).

* ``aux_loss() -> 0-d Tensor``: added to the training loss (e.g. the span penalty).
* ``post_step()``: called after every optimizer step (e.g. clamp span z to [0, 1]).
* ``stats() -> dict[str, Tensor(H)]``: per-head values for logging (``span`` in tokens, ``alpha``).

Usage in a training step::

    loss = task_loss + hooks.aux_loss(model)
    loss.backward(); optimizer.step(); hooks.post_step(model)
    mlflow_metrics = hooks.collect_stats(model)   # {"cross/2/cross/alpha": [1.4, 1.7, ...], ...}
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

# <stack>_layers.<i>.<block> in a module path -> (stack, layer, attention name).
_SITE = re.compile(r"(lang|visn|cross)_layers\.(\d+)\.(self_att|cross_att|lang_self_att|visn_self_att)\b")


def _modules_with(model: nn.Module, hook: str):
    for name, module in model.named_modules():
        if module is not model and callable(getattr(module, hook, None)):
            yield name, module


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of ``aux_loss()`` over all submodules (a 0-d tensor; 0 when none defines it)."""
    terms = [m.aux_loss() for _, m in _modules_with(model, "aux_loss")]
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return torch.stack([t.float() for t in terms]).sum()


def post_step(model: nn.Module) -> None:
    """Call ``post_step()`` on every submodule that defines it."""
    for _, m in _modules_with(model, "post_step"):
        m.post_step()


def site_of(module_path: str) -> str:
    """``lxmert.encoder.cross_layers.2.cross_att.attention.kernel`` -> ``cross/2/cross``.

    Paths outside the encoder's attention blocks are returned unchanged (dots -> slashes).
    """
    match = _SITE.search(module_path)
    if match is None:
        return module_path.replace(".", "/")
    stack, layer, block = match.groups()
    return f"{stack}/{layer}/{block.removesuffix('_att')}"


def collect_stats(model: nn.Module) -> dict[str, list[float]]:
    """``{"<stack>/<layer>/<attention>/<stat>": [value per head]}`` from every ``stats()``.

    ``stack`` in ``lang | visn | cross``; ``attention`` in ``self | cross | lang_self | visn_self``.
    """
    out: dict[str, list[float]] = {}
    for name, m in _modules_with(model, "stats"):
        site = site_of(name)
        for stat, values in m.stats().items():
            out[f"{site}/{stat}"] = [float(v) for v in values.reshape(-1)]
    return out
