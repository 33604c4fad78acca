"""Import real LXMERT weights, strictly, with a load report; export to HuggingFace's format.

Sources :func:`load_pretrained` understands:

* a HuggingFace directory (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``) of
  ``LxmertModel``, ``LxmertForQuestionAnswering`` or ``LxmertForPreTraining``
  (e.g. ``unc-nlp/lxmert-base-uncased`` downloaded beforehand; nothing is fetched here);
* a weights file (``.safetensors``, ``.bin``, ``.pth``), including the original LXMERT code's
  ``Epoch20_LXRT.pth`` / fine-tuned ``BEST.pth`` (keys prefixed ``module.``, ``bert.`` or
  ``lxrt_encoder.model.bert.``, VQA head ``logit_fc.*``);
* an in-memory state dict in any of those namings, or in ours (``lxmert.encoder.lang_layers.0...``).

Nothing is skipped silently. Every parameter of the model ends in exactly one list of the
:class:`LoadReport`: ``loaded``; ``missing`` (its layer or component is in the checkpoint, the tensor
is not: a renamed or damaged checkpoint); ``fresh`` (no counterpart exists: e.g. the 10th language
layer when importing 9-5-5 weights into 10-6-6, or the answer head when importing an encoder); or
``shape_mismatch``. Unused checkpoint keys are ``unexpected``, except the known pretraining heads
this model does not have, which are listed as ``ignored``. By default (``strict=True``) anything but
``loaded`` and ``ignored`` refuses the load, naming the keys, and leaves the model untouched; allow
exceptions explicitly with ``allow_fresh=True`` and/or ``allow=["glob", ...]`` patterns.

(The paper's code wrapped layers for LayerDrop, which renamed their parameters; the pretrained
weights were then silently not loaded. Here such a checkpoint reports every layer as missing and
every renamed key as unexpected, and is refused.)

Parameter-name mapping (``{i}`` = layer index; ``qkv`` stacks HF's query, key, value rows):

=====================================================  ==============================================
ours                                                   HuggingFace ``LxmertModel``
=====================================================  ==============================================
lxmert.embeddings.{word,position,token_type}.weight    embeddings.{word,position,token_type}_embeddings.weight
lxmert.embeddings.norm.*                               embeddings.LayerNorm.*
lxmert.visual_embeddings.{feat_fc,feat_norm}.*         encoder.visn_fc.{visn_fc,visn_layer_norm}.*
lxmert.visual_embeddings.{box_fc,box_norm}.*           encoder.visn_fc.{box_fc,box_layer_norm}.*
lxmert.encoder.lang_layers.{i}.self_att.attention.qkv  encoder.layer.{i}.attention.self.{query,key,value}
lxmert.encoder.lang_layers.{i}.self_att.attention.out  encoder.layer.{i}.attention.output.dense
lxmert.encoder.lang_layers.{i}.self_att.norm           encoder.layer.{i}.attention.output.LayerNorm
lxmert.encoder.lang_layers.{i}.ffn.{fc1,fc2,norm}      encoder.layer.{i}.{intermediate.dense,output.dense,output.LayerNorm}
lxmert.encoder.visn_layers.{i}.*                       encoder.r_layers.{i}.* (as above)
lxmert.encoder.cross_layers.{i}.cross_att.*            encoder.x_layers.{i}.visual_attention.{att.*,output.*}
lxmert.encoder.cross_layers.{i}.{lang,visn}_self_att.*  encoder.x_layers.{i}.{lang,visn}_self_att.{self.*,output.*}
lxmert.encoder.cross_layers.{i}.{lang,visn}_ffn.*      encoder.x_layers.{i}.{lang,visn}_{inter.dense,output.dense,output.LayerNorm}
lxmert.pooler.dense.*                                  pooler.dense.*
head.{fc1,norm,fc2}.*                                  answer_head.logit_fc.{0,2,3}.*
heads.mlm.transform.{dense,norm}.*, heads.mlm.bias     cls.predictions.transform.{dense,LayerNorm}.*, cls.predictions.bias
heads.mor.transform.{dense,norm}.*                     obj_predict_head.transform.{dense,LayerNorm}.*
heads.mor.{obj,attr,feat}.*                            obj_predict_head.decoder_dict.{obj,attr,feat}.*
heads.match.fc.*                                       cls.seq_relationship.*
heads.qa.{fc1,norm,fc2}.*                              answer_head.logit_fc.{0,2,3}.*
=====================================================  ==============================================

The ``heads.*`` rows apply to :class:`models.lxmert.LxmertForPretraining` (HuggingFace
``LxmertForPreTraining``, the original ``LXRTPretraining``). The MLM decoder is tied to the word
embeddings in all three: a checkpoint's ``cls.predictions.decoder.weight`` is accepted (and listed as
``ignored``) only when it equals the word embeddings it ties to; an untied one is ``unexpected``.
Into a VQA model, the pretraining heads of any format (``cls.*``, ``obj_predict_head.*``, our
``heads.*``) are listed as ``ignored``: that is how a pretrained encoder transfers to fine-tuning.

Kernel parameters (span ``z``, entmax ``alpha_logit``) have no counterpart in any LXMERT
checkpoint; they keep their configured init and are listed in ``LoadReport.kernel`` (not as fresh
or missing). Our own checkpoints carry them and restore them.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from models.config import AttentionConfig, ModelConfig

# Pretraining heads of LxmertForPreTraining / the original LXRTPretraining (and ours, ``heads.*``):
# not part of a VQA model.
_PRETRAIN_HEADS = ("cls.", "obj_predict_head.")
_NATIVE_PRETRAIN_HEADS = ("heads.",)
#: Checkpoint-side names of our heads that have no LXMERT counterpart (never exported).
_OURS_ONLY = ("contrastive_head.",)
# The MLM decoder: tied to the word embeddings, so it is never a parameter of its own here.
_TIED_DECODER = "cls.predictions.decoder.weight"
# Non-parameter buffers some HF versions save (recomputed here, so nothing is lost by ignoring them).
_BUFFERS = ("embeddings.position_ids",)
# Prefixes of the encoder in the formats we read, longest first.
_ENCODER_PREFIXES = ("lxrt_encoder.model.bert.", "model.bert.", "lxmert.", "bert.")
_KERNEL_PARAMS = re.compile(r"\.kernel\.(.+\.)?(z|alpha_logit)$")


class CheckpointError(RuntimeError):
    """A checkpoint would load only partially; the message names the keys. ``.report`` holds them."""

    def __init__(self, message: str, report: LoadReport):
        super().__init__(message)
        self.report = report


@dataclass
class LoadReport:
    """What a weight import did, parameter by parameter.

    Attributes:
        source: Where the weights came from.
        format: ``hf`` (HuggingFace names), ``original`` (original LXMERT code) or ``native`` (ours).
        loaded: Our parameter names that received checkpoint values.
        missing: Our parameters whose layer/component is in the checkpoint but whose tensor is not.
        fresh: Our parameters with no counterpart (extra layers, a new head); they keep their init.
        shape_mismatch: ``(our name, checkpoint shape, our shape)``.
        unexpected: Checkpoint keys nothing consumed.
        ignored: Checkpoint keys of known pretraining heads this model does not have (and HF's
            ``embeddings.position_ids`` buffer).
        partial: Our parameters filled in part through the answer map: ``name -> "n/A rows"``.
        kernel: Attention-kernel parameters (span z, alpha) the checkpoint does not have (no LXMERT
            checkpoint has them; our own do); they keep their init.
        applied: Whether the values were copied into the model.
    """

    source: str = ""
    format: str = ""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    partial: dict[str, str] = field(default_factory=dict)
    kernel: list[str] = field(default_factory=list)
    applied: bool = False
    expected_keys: dict[str, list[str]] = field(default_factory=dict, repr=False)

    @property
    def complete(self) -> bool:
        """True when every parameter was loaded and every checkpoint key was used (or ignored)."""
        return not (self.missing or self.fresh or self.shape_mismatch or self.unexpected or self.partial)

    def fresh_components(self) -> list[str]:
        """Fresh parameters grouped by component, e.g. ``["lang.9", "visn.5", "head"]``."""
        return sorted({_component_of_ours(n) for n in self.fresh}, key=_component_sort_key)

    def __str__(self) -> str:
        lines = [
            f"LoadReport({self.format} from {self.source}): {len(self.loaded)} loaded, "
            f"{len(self.missing)} missing, {len(self.fresh)} fresh, {len(self.shape_mismatch)} shape "
            f"mismatches, {len(self.unexpected)} unexpected, {len(self.ignored)} ignored"
            + ("" if self.applied else " [NOT applied]")
        ]
        if self.fresh:
            lines.append(f"  fresh (no counterpart, initialised anew): {', '.join(self.fresh_components())}")
        for name in self.missing:
            expected = ", ".join(self.expected_keys.get(name, []))
            lines.append(f"  missing: {name}" + (f"  (checkpoint key {expected})" if expected else ""))
        for name, theirs, ours in self.shape_mismatch:
            lines.append(f"  shape mismatch: {name}: checkpoint {tuple(theirs)} vs model {tuple(ours)}")
        for key in self.unexpected:
            lines.append(f"  unexpected: {key}")
        for name, what in self.partial.items():
            lines.append(f"  partial: {name}: {what} from the answer map, the rest fresh")
        if self.ignored:
            heads = sorted({".".join(k.removeprefix("module.").split(".")[: 2 if k.startswith("heads.") else 1])
                            for k in self.ignored})
            lines.append(f"  ignored pretraining heads: {', '.join(heads)} ({len(self.ignored)} tensors)")
        if self.kernel:
            lines.append(f"  attention-kernel parameters kept at their init: {len(self.kernel)} tensors")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The mapping table


def _attention_map(ours: str, hf: str, hf_self: str) -> dict[str, list[str]]:
    """An attention block: ``ours`` is our AttentionBlock prefix, ``hf`` HF's, ``hf_self`` the HF name
    of its q/k/v holder (``self`` in self-attention, ``att`` in cross-attention)."""
    out = {}
    for w in ("weight", "bias"):
        out[f"{ours}.attention.qkv.{w}"] = [f"{hf}.{hf_self}.{n}.{w}" for n in ("query", "key", "value")]
        out[f"{ours}.attention.out.{w}"] = [f"{hf}.output.dense.{w}"]
        out[f"{ours}.norm.{w}"] = [f"{hf}.output.LayerNorm.{w}"]
    return out


def _ffn_map(ours: str, inter: str, output: str) -> dict[str, list[str]]:
    out = {}
    for w in ("weight", "bias"):
        out[f"{ours}.fc1.{w}"] = [f"{inter}.dense.{w}"]
        out[f"{ours}.fc2.{w}"] = [f"{output}.dense.{w}"]
        out[f"{ours}.norm.{w}"] = [f"{output}.LayerNorm.{w}"]
    return out


def hf_key_map(depths: Mapping[str, int], head: bool = True, pretrain_heads: Iterable[str] = ()) -> dict[str, list[str]]:
    """Our parameter name -> the HuggingFace ``LxmertModel`` key(s) it is made of (3 for ``qkv``).

    Args:
        depths: ``{"lang": l_layers, "visn": r_layers, "cross": x_layers}``.
        head: Include the VQA head (``answer_head.logit_fc.*``).
        pretrain_heads: Include these pretraining heads (``mlm | mor | match | qa``) under
            HuggingFace ``LxmertForPreTraining``'s names; ``contrastive`` (no LXMERT counterpart)
            under ``contrastive_head.*``, keys no LXMERT checkpoint has: it loads as fresh.
    """
    m: dict[str, list[str]] = {}
    e, v = "lxmert.embeddings", "lxmert.visual_embeddings"
    for name in ("word", "position", "token_type"):
        m[f"{e}.{name}.weight"] = [f"embeddings.{name}_embeddings.weight"]
    for w in ("weight", "bias"):
        m[f"{e}.norm.{w}"] = [f"embeddings.LayerNorm.{w}"]
        m[f"{v}.feat_fc.{w}"] = [f"encoder.visn_fc.visn_fc.{w}"]
        m[f"{v}.feat_norm.{w}"] = [f"encoder.visn_fc.visn_layer_norm.{w}"]
        m[f"{v}.box_fc.{w}"] = [f"encoder.visn_fc.box_fc.{w}"]
        m[f"{v}.box_norm.{w}"] = [f"encoder.visn_fc.box_layer_norm.{w}"]
    for stack, hf_stack in (("lang", "layer"), ("visn", "r_layers")):
        for i in range(depths[stack]):
            ours, hf = f"lxmert.encoder.{stack}_layers.{i}", f"encoder.{hf_stack}.{i}"
            m.update(_attention_map(f"{ours}.self_att", f"{hf}.attention", "self"))
            m.update(_ffn_map(f"{ours}.ffn", f"{hf}.intermediate", f"{hf}.output"))
    for i in range(depths["cross"]):
        ours, hf = f"lxmert.encoder.cross_layers.{i}", f"encoder.x_layers.{i}"
        m.update(_attention_map(f"{ours}.cross_att", f"{hf}.visual_attention", "att"))
        for mod in ("lang", "visn"):
            m.update(_attention_map(f"{ours}.{mod}_self_att", f"{hf}.{mod}_self_att", "self"))
            m.update(_ffn_map(f"{ours}.{mod}_ffn", f"{hf}.{mod}_inter", f"{hf}.{mod}_output"))
    for w in ("weight", "bias"):
        m[f"lxmert.pooler.dense.{w}"] = [f"pooler.dense.{w}"]
        if head:
            for ours, idx in (("fc1", 0), ("norm", 2), ("fc2", 3)):
                m[f"head.{ours}.{w}"] = [f"answer_head.logit_fc.{idx}.{w}"]
        heads = set(pretrain_heads)
        if "mlm" in heads:
            m[f"heads.mlm.transform.dense.{w}"] = [f"cls.predictions.transform.dense.{w}"]
            m[f"heads.mlm.transform.norm.{w}"] = [f"cls.predictions.transform.LayerNorm.{w}"]
        if "mor" in heads:
            m[f"heads.mor.transform.dense.{w}"] = [f"obj_predict_head.transform.dense.{w}"]
            m[f"heads.mor.transform.norm.{w}"] = [f"obj_predict_head.transform.LayerNorm.{w}"]
            for name in ("obj", "attr", "feat"):
                m[f"heads.mor.{name}.{w}"] = [f"obj_predict_head.decoder_dict.{name}.{w}"]
        if "match" in heads:
            m[f"heads.match.fc.{w}"] = [f"cls.seq_relationship.{w}"]
        if "qa" in heads:
            for ours, idx in (("fc1", 0), ("norm", 2), ("fc2", 3)):
                m[f"heads.qa.{ours}.{w}"] = [f"answer_head.logit_fc.{idx}.{w}"]
        if "contrastive" in heads:  # not LXMERT's: no checkpoint has these keys, so they are fresh
            for name in ("text", "image"):
                m[f"heads.contrastive.{name}.{w}"] = [f"contrastive_head.{name}.{w}"]
    if "mlm" in set(pretrain_heads):
        m["heads.mlm.bias"] = ["cls.predictions.bias"]
    if "contrastive" in set(pretrain_heads):
        m["heads.contrastive.log_scale"] = ["contrastive_head.log_scale"]
    return m


def _pretrain_heads_of(names: Iterable[str]) -> list[str]:
    """The pretraining heads (``mlm``, ``mor``, ...) a model's parameter names show it has."""
    return sorted({n.split(".")[1] for n in names if n.startswith("heads.")})


_OURS_LAYER = re.compile(r"^lxmert\.encoder\.(lang|visn|cross)_layers\.(\d+)\.")
_HF_LAYER = re.compile(r"^encoder\.(layer|r_layers|x_layers)\.(\d+)\.")
_HF_STACK = {"layer": "lang", "r_layers": "visn", "x_layers": "cross"}


def _component_of_ours(name: str) -> str:
    match = _OURS_LAYER.match(name)
    if match:
        return f"{match.group(1)}.{match.group(2)}"
    if name.startswith("head."):
        return "head"
    if name.startswith("heads."):
        return ".".join(name.split(".")[:2])  # heads.mlm, heads.mor, heads.match
    return name.split(".")[1] if name.startswith("lxmert.") else name.split(".")[0]


def _component_of_hf(key: str, answer_head: str = "head") -> str:
    """The component of a HF key; ``answer_head.*`` is ``answer_head`` (``head`` for a VQA model,
    ``heads.qa`` for a pretraining model: in HF both are the same answer head)."""
    match = _HF_LAYER.match(key)
    if match:
        return f"{_HF_STACK[match.group(1)]}.{match.group(2)}"
    if key.startswith("encoder.visn_fc."):
        return "visual_embeddings"
    if key.startswith("answer_head."):
        return answer_head
    if key.startswith("cls.predictions."):
        return "heads.mlm"
    if key.startswith("cls.seq_relationship."):
        return "heads.match"
    if key.startswith("obj_predict_head."):
        return "heads.mor"
    return key.split(".")[0]


def _component_sort_key(comp: str) -> tuple:
    stack, _, idx = comp.partition(".")
    return (stack, int(idx) if idx.isdigit() else -1)


# --------------------------------------------------------------------------------------------------
# Reading sources


def _read_file(path: Path) -> dict[str, Tensor]:
    """A weights file's tensors; anything unreadable raises a :class:`CheckpointError` naming it.

    ``.pth`` / ``.bin`` files are unpickled with ``weights_only=True``: a file that would build
    anything but tensors and plain containers (i.e. run code) is refused, not loaded.
    """
    size = path.stat().st_size
    kind = "safetensors" if path.suffix == ".safetensors" else "torch"

    def refused(why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} ({size} bytes) is not a readable {kind} weights file: {why}",
                               LoadReport(source=str(path)))

    if size == 0:
        raise refused("it is empty")
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file  # a dependency of transformers; only needed here

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, text, another format, or pickled objects: all name the file
        text = str(err)
        if "Weights only load failed" in text:
            text = "it holds objects other than tensors (loading it could run code): " + \
                text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0]
        raise refused(f"{type(err).__name__}: {text[:400]}") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise refused(f"it holds a {type(obj).__name__}, not a state dict")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, Tensor)][:5]
    if bad:
        raise refused(f"entries {bad} are not tensors (a training checkpoint, not weights?)")
    return dict(obj)


def read_checkpoint(source: str | Path | Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict | None, str]:
    """Load a state dict (and the HF config.json, if any) from a directory, a file or a mapping.

    Returns:
        (state dict, config dict or None, description of the source).
    """
    if isinstance(source, Mapping):
        return dict(source), None, "state dict"
    path = Path(source)
    if path.is_dir():
        config = None
        if (path / "config.json").exists():
            try:
                config = json.loads((path / "config.json").read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise CheckpointError(f"{path / 'config.json'} is not valid JSON: {err}",
                                      LoadReport(source=str(path))) from None
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).exists():
                return _read_file(path / name), config, str(path / name)
        shards = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not shards:
            raise FileNotFoundError(f"{path} has no model.safetensors, pytorch_model.bin or *.safetensors")
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(_read_file(shard))
        return state, config, str(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return _read_file(path), None, str(path)


def normalise_keys(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str, dict[str, str]]:
    """Rename a checkpoint's keys to HuggingFace ``LxmertModel`` names (+ ``answer_head.logit_fc``).

    Handles ``module.`` (DataParallel), ``lxmert.`` (HF task models), ``bert.`` and
    ``lxrt_encoder.model.bert.`` (original code), ``logit_fc.`` (original VQA head) and the
    ``gamma``/``beta`` LayerNorm names of old BERT checkpoints. Our own names pass through unchanged.

    Returns:
        (renamed state dict, format: ``hf | original | native``, {new key: original key}).
    """
    out: dict[str, Tensor] = {}
    raw_of: dict[str, str] = {}
    keys = [k.removeprefix("module.") for k in state]
    if any(k.endswith(".attention.qkv.weight") for k in keys):
        renamed = {k.removeprefix("module."): k for k in state}
        return {k: state[raw] for k, raw in renamed.items()}, "native", renamed
    fmt = "hf"
    for raw, value in state.items():
        key = raw
        while key.startswith("module."):
            key = key[len("module.") :]
        for prefix in _ENCODER_PREFIXES:
            if key.startswith(prefix):
                fmt = "hf" if prefix == "lxmert." else "original"
                key = key[len(prefix) :]
                break
        if key.startswith("logit_fc."):  # the original VQAModel's head
            key, fmt = "answer_head." + key, "original"
        if key.endswith(".gamma"):
            key = key[: -len("gamma")] + "weight"
        elif key.endswith(".beta"):
            key = key[: -len("beta")] + "bias"
        out[key] = value
        raw_of[key] = raw
    return out, fmt, raw_of


def answer_map_from_labels(new_labels: Sequence[str], old_labels: Sequence[str]) -> dict[int, int]:
    """``{new index: old index}`` for every answer string present in both vocabularies.

    E.g. VQA's 3,129 ``trainval_label2ans`` against LXMERT's 9,500 pretraining QA answers.
    """
    old = {ans: i for i, ans in enumerate(old_labels)}
    return {i: old[ans] for i, ans in enumerate(new_labels) if ans in old}


# --------------------------------------------------------------------------------------------------
# Import


def _allowed(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_config(config: dict | None, model_cfg: ModelConfig | None, report: LoadReport) -> None:
    """Shapes catch most config differences; the number of heads they cannot."""
    if not config or model_cfg is None:
        return
    pairs = {"num_attention_heads": model_cfg.num_heads, "hidden_size": model_cfg.hidden_size}
    for key, ours in pairs.items():
        if key in config and int(config[key]) != ours:
            raise CheckpointError(
                f"checkpoint config.json has {key}={config[key]} but the model has {ours}; build the model "
                "with models.checkpoint.config_from_hf(path)",
                report,
            )


def load_pretrained(
    model: nn.Module,
    source: str | Path | Mapping[str, Tensor],
    *,
    strict: bool = True,
    allow_fresh: bool = False,
    allow: Iterable[str] = (),
    answer_map: Mapping[int, int] | None = None,
    verbose: bool = True,
) -> LoadReport:
    """Import LXMERT weights into ``model`` (an :class:`models.lxmert.LxmertForVQA` or ``LxmertModel``).

    Args:
        model: The target model (any depth; LayerDrop does not rename anything).
        source: A HuggingFace directory, a weights file, or a state dict (see the module docstring).
        strict: Refuse unless the import is complete (every parameter loaded, every key used); the
            exceptions below must be granted explicitly. ``strict=False`` applies whatever matches
            and only reports.
        allow_fresh: Accept parameters with no counterpart in the checkpoint (extra layers of a
            deeper model, the answer head when importing an encoder); they keep their init.
        allow: Glob patterns (on our parameter names or checkpoint keys) of missing / fresh /
            mismatched / unexpected entries to accept, e.g. ``["head.*"]``.
        answer_map: ``{our answer index: checkpoint answer index}`` to initialise our answer head's
            last layer from the checkpoint's (e.g. the 9,500-answer pretraining QA head); unmapped
            rows keep their init. See :func:`answer_map_from_labels`.
        verbose: Print the report.

    Returns:
        The :class:`LoadReport` (with ``applied=True``).

    Raises:
        CheckpointError: The load is incomplete and not allowed; the message lists the keys. The model
            is left unchanged.
    """
    raw, config, desc = read_checkpoint(source)
    state, fmt, raw_of = normalise_keys(raw)
    report = LoadReport(source=desc, format=fmt)
    model_cfg = getattr(model, "config", None)
    _check_config(config, model_cfg, report)
    allow = list(allow)

    params = dict(model.named_parameters())
    prefix = "" if "head.fc1.weight" in params or any(k.startswith("lxmert.") for k in params) else "lxmert."
    ours_full = {prefix + k: v for k, v in params.items()}  # an LxmertModel has no "lxmert." prefix
    kernel_params = {n for n in ours_full if _KERNEL_PARAMS.search(n)}
    depths = _depths_of(ours_full)
    if fmt == "native":  # our own checkpoints carry the kernel parameters too: restore them
        mapping = {n: [n] for n in ours_full}
        component_of_source = _component_of_ours
    else:
        mapping = hf_key_map(depths, head="head.fc1.weight" in ours_full, pretrain_heads=_pretrain_heads_of(ours_full))
        mapping.update({n: [] for n in kernel_params})
        answer_head = "heads.qa" if "heads.qa.fc1.weight" in ours_full and "head.fc1.weight" not in ours_full else "head"

        def component_of_source(key: str) -> str:
            return _component_of_hf(key, answer_head)
        unknown = sorted(set(ours_full) - set(mapping))
        if unknown:  # a module this table does not know: never skip it silently
            raise CheckpointError(f"no checkpoint mapping for parameters {unknown}", report)

    present = {component_of_source(k) for k in state}
    # How deep the checkpoint is: its config.json says so; without one, the deepest layer present
    # (then a missing *last* layer is indistinguishable from a shallower checkpoint: it is reported
    # as fresh, which strict mode still refuses unless allow_fresh=True).
    source_depth = {s: 0 for s in ("lang", "visn", "cross")}
    for comp in present:
        stack, _, idx = comp.partition(".")
        if stack in source_depth and idx.isdigit():
            source_depth[stack] = max(source_depth[stack], int(idx) + 1)
    if config:
        for stack, key in (("lang", "l_layers"), ("visn", "r_layers"), ("cross", "x_layers")):
            source_depth[stack] = int(config.get(key, source_depth[stack]))

    values: dict[str, Tensor] = {}
    rows: dict[str, tuple[Tensor, Tensor]] = {}  # name -> (our row index, checkpoint value rows)
    used: set[str] = set()
    for name, keys in mapping.items():
        param = ours_full[name]
        comp = _component_of_ours(name)
        report.expected_keys[name] = keys
        if name in kernel_params and not (keys and all(k in state for k in keys)):
            report.kernel.append(name)
            continue
        if all(k in state for k in keys):
            used.update(keys)
            value = state[keys[0]] if len(keys) == 1 else torch.cat([state[k] for k in keys], 0)
            if answer_map is not None and name in ("head.fc2.weight", "head.fc2.bias"):
                ours_idx = torch.tensor(sorted(answer_map), dtype=torch.long)
                theirs_idx = torch.tensor([answer_map[i] for i in sorted(answer_map)], dtype=torch.long)
                if len(ours_idx) and (int(ours_idx.max()) >= param.shape[0] or int(theirs_idx.max()) >= value.shape[0]):
                    raise CheckpointError(f"answer_map indices out of range for {name}", report)
                if value.shape[1:] != param.shape[1:]:
                    report.shape_mismatch.append((name, tuple(value.shape), tuple(param.shape)))
                    continue
                rows[name] = (ours_idx, value[theirs_idx])
                if len(ours_idx) == param.shape[0]:
                    report.loaded.append(name)
                else:
                    report.partial[name] = f"{len(ours_idx)}/{param.shape[0]} rows"
            elif tuple(value.shape) != tuple(param.shape):
                report.shape_mismatch.append((name, tuple(value.shape), tuple(param.shape)))
            else:
                values[name] = value
                report.loaded.append(name)
            continue
        stack, _, idx = comp.partition(".")
        beyond = stack in source_depth and idx.isdigit() and int(idx) >= source_depth[stack]
        if comp not in present and (beyond or comp == "head" or comp.startswith("heads.")):
            report.fresh.append(name)
        else:
            report.missing.append(name)
    has_heads = _pretrain_heads_of(ours_full)
    word = "lxmert.embeddings.word.weight"
    for key in state:
        if key in used:
            continue
        if key == _TIED_DECODER and "mlm" in has_heads and word in ours_full:
            # The tie our MLM head keeps implicitly: only an equal (tied) copy may be dropped.
            source = values.get(word, ours_full[word].detach())
            if tuple(state[key].shape) == tuple(source.shape) and torch.equal(state[key].to(source.dtype), source):
                report.ignored.append(raw_of[key])
            else:
                report.unexpected.append(raw_of[key])
            continue
        # Reported under the checkpoint's own spelling, so it can be found in the file.
        if (
            (key.startswith(_PRETRAIN_HEADS) and fmt != "native")
            or (key.startswith(_NATIVE_PRETRAIN_HEADS) and fmt == "native")
            or key in _BUFFERS
            or (key.startswith("answer_head.") and "head.fc1.weight" not in ours_full
                and "heads.qa.fc1.weight" not in ours_full)
        ):
            report.ignored.append(raw_of[key])
        else:
            report.unexpected.append(raw_of[key])

    problems = [n for n in report.missing if not _allowed(n, allow)]
    problems += [n for n, _, _ in report.shape_mismatch if not _allowed(n, allow)]
    problems += [k for k in report.unexpected if not _allowed(k, allow)]
    if not allow_fresh:
        problems += [n for n in report.fresh if not _allowed(n, allow)]
    if strict and problems:
        shown = "\n  ".join(problems[:40]) + (f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else "")
        raise CheckpointError(
            f"refusing a partial load from {desc}: {len(problems)} parameter(s)/key(s) would not load:\n  {shown}\n"
            f"{report}\nPass allow_fresh=True for layers/heads the checkpoint does not have, allow=[glob, ...] "
            "for specific keys, or strict=False to apply what matches.",
            report,
        )

    with torch.no_grad():
        for name, value in values.items():
            ours_full[name].copy_(value.to(ours_full[name].dtype))
        for name, (idx, value) in rows.items():
            ours_full[name][idx] = value.to(ours_full[name].dtype)
    report.applied = True
    if verbose:
        print(report)
    return report


def _depths_of(named: Mapping[str, Tensor]) -> dict[str, int]:
    depth = {"lang": 0, "visn": 0, "cross": 0}
    for name in named:
        match = _OURS_LAYER.match(name)
        if match:
            depth[match.group(1)] = max(depth[match.group(1)], int(match.group(2)) + 1)
    return depth


# --------------------------------------------------------------------------------------------------
# Export and configs


def to_hf_state_dict(model: nn.Module, *, task_model: bool = False) -> dict[str, Tensor]:
    """Our weights under HuggingFace names.

    Args:
        model: An :class:`models.lxmert.LxmertForVQA`, :class:`models.lxmert.LxmertForPretraining`
            (or ``LxmertModel``).
        task_model: Name them for ``LxmertForQuestionAnswering`` / ``LxmertForPreTraining``
            (``lxmert.`` prefix + the heads: ``answer_head.logit_fc.*``, ``cls.*``,
            ``obj_predict_head.*``, with the tied ``cls.predictions.decoder.weight``) instead of
            ``LxmertModel`` (the heads are then left out).

    Attention-kernel parameters (span z, alpha) have no HF counterpart and are left out.
    """
    params = dict(model.state_dict())
    if not any(k.startswith("lxmert.") for k in params):
        params = {"lxmert." + k: v for k, v in params.items()}
    heads = _pretrain_heads_of(params)
    mapping = hf_key_map(_depths_of(params), head="head.fc1.weight" in params, pretrain_heads=heads)
    out: dict[str, Tensor] = {}
    head_prefixes = ("answer_head.", *_PRETRAIN_HEADS)
    for name, keys in mapping.items():
        if keys[0].startswith(head_prefixes) and not task_model:
            continue
        if keys[0].startswith(_OURS_ONLY):  # heads HuggingFace's LXMERT does not have
            continue
        value = params[name]
        parts = value.chunk(len(keys), 0) if len(keys) > 1 else (value,)
        for key, part in zip(keys, parts):
            hf_key = key if key.startswith(head_prefixes) or not task_model else "lxmert." + key
            out[hf_key] = part.detach().clone().contiguous()
    if task_model and "mlm" in heads:
        out[_TIED_DECODER] = out["lxmert.embeddings.word_embeddings.weight"].clone()
    return out


def hf_config_dict(cfg: ModelConfig) -> dict:
    """A ``transformers.LxmertConfig``-compatible dict for ``cfg`` (for ``config.json``)."""
    return {
        "model_type": "lxmert",
        "architectures": ["LxmertForQuestionAnswering"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.hidden_dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.initializer_range,
        "l_layers": cfg.l_layers,
        "x_layers": cfg.x_layers,
        "r_layers": cfg.r_layers,
        "visual_feat_dim": cfg.visual_feat_dim,
        "visual_pos_dim": cfg.visual_pos_dim,
        "num_qa_labels": cfg.num_answers,
    }


def config_from_hf(source: str | Path | Mapping, **fields) -> ModelConfig:
    """A :class:`ModelConfig` matching a HuggingFace LXMERT ``config.json`` (a directory, the file, or
    its dict); ``fields`` override (e.g. ``num_answers=3129``, ``attention=AttentionConfig(...)``)."""
    if isinstance(source, Mapping):
        hf = dict(source)
    else:
        path = Path(source)
        hf = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    cfg = {
        "vocab_size": hf.get("vocab_size", 30522),
        "hidden_size": hf.get("hidden_size", 768),
        "num_heads": hf.get("num_attention_heads", 12),
        "intermediate_size": hf.get("intermediate_size", 3072),
        "l_layers": hf.get("l_layers", 9),
        "x_layers": hf.get("x_layers", 5),
        "r_layers": hf.get("r_layers", 5),
        "visual_feat_dim": hf.get("visual_feat_dim", 2048),
        "visual_pos_dim": hf.get("visual_pos_dim", 4),
        "max_position_embeddings": hf.get("max_position_embeddings", 512),
        "type_vocab_size": hf.get("type_vocab_size", 2),
        "num_answers": hf.get("num_qa_labels", 9500),
        "hidden_dropout": hf.get("hidden_dropout_prob", 0.1),
        "attention_dropout": hf.get("attention_probs_dropout_prob", 0.1),
        "initializer_range": hf.get("initializer_range", 0.02),
    }
    cfg.update(fields)
    if isinstance(cfg.get("attention"), dict):
        cfg["attention"] = AttentionConfig(**cfg["attention"])
    return ModelConfig(**cfg)


def save_hf(model: nn.Module, directory: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` loadable by
    ``transformers.LxmertForQuestionAnswering.from_pretrained`` (and by :func:`load_pretrained`)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config_dict(model.config), indent=2))
    save_file(to_hf_state_dict(model, task_model=True), str(directory / "model.safetensors"))
    return directory
