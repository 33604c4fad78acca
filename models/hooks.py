"""Hooks the training loop calls on every module that defines them (no isinstance checks).

* ``aux_loss() -> 0-d Tensor``: added to the training loss (e.g. the span penalty).
* ``post_step()``: called after every optimizer step (e.g. clamp span z to [0, 1]).
* ``stats() -> dict[str, Tensor(H)]``: per-head values for logging (``span`` in tokens, ``alpha``).
* ``mechanism_parameters() -> list[Parameter]``: the parameters of an adaptive mechanism itself
  (span z, alpha logits), which the optimiser may give their own learning rate.
* ``engagement() -> dict | None``: whether the mechanism ever changed what the module computes
  (``{"mechanism", "engaged", ...evidence}``); ``mechanism_state()`` / ``load_mechanism_state()``
  carry what it needs across a checkpoint.

Usage in a training step::

    loss = task_loss + hooks.aux_loss(model)
    loss.backward(); optimizer.step(); hooks.post_step(model)
    mlflow_metrics = hooks.collect_stats(model)   # {"cross/2/cross/alpha": [1.4, 1.7, ...], ...}
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

# <stack>_layers.<i>[.finetuned][.<block>] in a module path -> (stack, layer, block name). ``finetuned``
# is the fine-tuned branch of a SpotTune layer gate (models.finetune), which stands for its layer.
_SITE = re.compile(
    r"(lang|visn|cross)_layers\.(\d+)(?:\.finetuned)?"
    r"(?:\.(self_att|cross_att|lang_self_att|visn_self_att|ffn|lang_ffn|visn_ffn)\b)?"
)
# A fusion layer built from a flow (models.flow): cross_layers.<i>.att.<stream>.
_FLOW_SITE = re.compile(r"(cross)_layers\.(\d+)\.att\.(lang|visn|shared)\b")


def _modules_with(model: nn.Module, hook: str):
    """Submodules defining ``hook``, skipping SpotTune's frozen copies (marked ``frozen_copy``): their
    weights never change, so a penalty, a clamp or a second set of stats for them would be noise."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        if getattr(module, "frozen_copy", False):
            skip.append(f"{name}.")
            continue
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

    Feed-forwards are ``<stack>/<i>/ffn`` (``lang_ffn``, ``visn_ffn`` in cross layers), a whole layer
    (a SpotTune layer gate) is ``<stack>/<i>/layer``; a flow layer's stream (``cross_layers.2.att.lang...``)
    is ``cross/2/lang`` (``visn``, ``shared``). Paths outside the encoder's layers are returned
    unchanged (dots -> slashes).
    """
    match = _FLOW_SITE.search(module_path)
    if match is not None:
        return "/".join(match.groups())
    match = _SITE.search(module_path)
    if match is None:
        return module_path.replace(".", "/")
    stack, layer, block = match.groups()
    return f"{stack}/{layer}/{block.removesuffix('_att') if block else 'layer'}"


def collect_stats(model: nn.Module) -> dict[str, list[float]]:
    """``{"<stack>/<layer>/<attention>/<stat>": [value per head]}`` from every ``stats()``.

    ``stack`` in ``lang | visn | cross``; ``attention`` in ``self | cross | lang_self | visn_self``
    (LXMERT's layers) or ``lang | visn | shared`` (a flow layer's streams); SpotTune's gated units
    add ``ffn | lang_ffn | visn_ffn | layer`` sites with one value per decision of the unit, and the
    policy ``policy/entropy``, ``policy/temperature``.
    """
    out: dict[str, list[float]] = {}
    for name, m in _modules_with(model, "stats"):
        site = site_of(name)
        for stat, values in m.stats().items():
            out[f"{site}/{stat}"] = [float(v) for v in values.reshape(-1)]
    return out


def mechanism_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter some module declares as its mechanism's own (no duplicates)."""
    seen: dict[int, nn.Parameter] = {}
    for _, m in _modules_with(model, "mechanism_parameters"):
        for p in m.mechanism_parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def mechanism_state(model: nn.Module) -> dict[str, dict[str, float]]:
    """``{module path: state}`` of every module with engagement evidence (plain numbers)."""
    return {name: m.mechanism_state() for name, m in _modules_with(model, "mechanism_state")}


def load_mechanism_state(model: nn.Module, state: dict[str, dict[str, float]]) -> None:
    """Restore :func:`mechanism_state` (modules absent from ``state`` keep theirs)."""
    for name, m in _modules_with(model, "load_mechanism_state"):
        if name in state:
            m.load_mechanism_state(state[name])


def engagement(model: nn.Module) -> dict[str, dict[str, object]]:
    """Per mechanism (``span``, ``alpha``): did it ever change what the model computes?

    Returns ``{mechanism: {"engaged": bool, "sites": n, "engaged_sites": k, "evidence": text}}``;
    a mechanism is engaged when at least one attention site's is. Empty for a model without
    adaptive mechanisms (softmax).
    """
    found: dict[str, list[tuple[str, dict[str, object]]]] = {}
    for name, m in _modules_with(model, "engagement"):
        e = m.engagement()
        if e is not None:
            found.setdefault(str(e["mechanism"]), []).append((site_of(name), e))
    out: dict[str, dict[str, object]] = {}
    for mech, items in found.items():
        k = sum(bool(e["engaged"]) for _, e in items)
        if mech == "span":
            smallest = min(float(e["smallest"]) for _, e in items)
            reach = max(int(e["reach"]) for _, e in items)
            evidence = (f"span below the longest query-key distance at {k} of {len(items)} attention sites; "
                        f"smallest span reached {smallest:.1f} tokens (longest distance {reach})")
        elif mech == "alpha":
            moved = max(float(e["moved"]) for _, e in items)
            low = min(float(e["low"]) for _, e in items)
            high = max(float(e["high"]) for _, e in items)
            init = float(items[0][1]["init"])
            evidence = (f"alpha moved from {init:g} by up to {moved:.3f} (now {low:.3f}-{high:.3f}); "
                        f"{k} of {len(items)} attention sites moved by 0.01 or more")
        else:
            evidence = f"{k} of {len(items)} sites engaged"
        out[mech] = {"engaged": k > 0, "sites": len(items), "engaged_sites": k, "evidence": evidence}
    return out
