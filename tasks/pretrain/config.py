"""`PretrainConfig`: the multi-task pretraining stage of a trial (objectives, corpus, weighting).

Flat ``str`` / ``int`` / ``float`` / ``bool`` leaves, so it flattens to MLflow params
(``pretrain.weighting``, ``pretrain.tasks``, ...) and takes ``key=value`` overrides like every other
section of ``sweeps.config.ExperimentConfig``. ``validate`` raises :class:`ConfigError` naming the
key (``pretrain.<field>``).

The task schedule (``schedule``) switches tasks on or off by pretraining epoch or by learning
rate: comma-separated rules ``<task>@<quantity><op><number>`` with quantity ``epoch`` (1-based
pretraining epoch) or ``lr`` (the learning rate of the step) and op ``>= > <= <``; a task with
several rules needs all of them. LXMERT switches image QA on for the second half of its 20 epochs:
``qa@epoch>=11``. ``mlm@lr>=1e-5`` would stop masked LM once the schedule has decayed the learning
rate below 1e-5.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from models.configkit import ConfigError, check_types, normalise_lists, split_list

#: The pretraining objectives, in LXMERT's order, then the image-text contrastive loss (not
#: LXMERT's; see tasks.pretrain.objectives).
TASKS: tuple[str, ...] = ("mlm", "mor", "match", "qa", "contrastive")
WEIGHTINGS: tuple[str, ...] = ("equal", "grad_std", "uncertainty", "gradnorm")
CORPORA: tuple[str, ...] = ("synthetic", "lxmert")
SHARED: tuple[str, ...] = ("encoder", "last_layer")
#: LXMERT's pretraining sources (data/lxmert/<name>.json) and their evaluation source.
LXMERT_SOURCES = "mscoco_train,mscoco_nominival,vgnococo"
LXMERT_EVAL_SOURCE = "mscoco_minival"

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_RULE = re.compile(r"^(?P<task>[a-z_]+)@(?P<what>epoch|lr)(?P<op>>=|<=|>|<)(?P<value>[0-9.eE+-]+)$")


@dataclass(frozen=True)
class Rule:
    """One schedule rule: ``task`` is active when ``<what> <op> <value>``."""

    task: str
    what: str
    op: str
    value: float

    def holds(self, epoch: int, lr: float) -> bool:
        return _OPS[self.op](epoch if self.what == "epoch" else lr, self.value)

    def __str__(self) -> str:
        value = int(self.value) if self.what == "epoch" else self.value
        return f"{self.task}@{self.what}{self.op}{value}"


def parse_schedule(text: str | tuple[str, ...], tasks: list[str] | None = None) -> list[Rule]:
    """``"qa@epoch>=11,mlm@lr>=1e-5"`` -> rules; raises :class:`ConfigError` naming ``pretrain.schedule``."""
    rules = []
    for item in split_list(text):
        if not item:
            continue
        m = _RULE.match(item.replace(" ", ""))
        if not m:
            raise ConfigError(
                f"pretrain.schedule: rule {item!r} is not <task>@<epoch|lr><op><number> with op in >=, >, <=, < "
                "(e.g. qa@epoch>=11)"
            )
        try:
            value = float(m["value"])
        except ValueError:
            raise ConfigError(f"pretrain.schedule: rule {item!r}: {m['value']!r} is not a number") from None
        if m["task"] not in TASKS:
            raise ConfigError(f"pretrain.schedule: rule {item!r} names task {m['task']!r}; tasks: {', '.join(TASKS)}")
        if tasks is not None and m["task"] not in tasks:
            raise ConfigError(
                f"pretrain.schedule: rule {item!r} names task {m['task']!r}, which pretrain.tasks does not run"
            )
        rules.append(Rule(m["task"], m["what"], m["op"], value))
    return rules


def active_tasks(tasks: list[str], rules: list[Rule], epoch: int, lr: float) -> list[str]:
    """The tasks of ``tasks`` whose rules all hold at (1-based) ``epoch`` and learning rate ``lr``."""
    return [t for t in tasks if all(r.holds(epoch, lr) for r in rules if r.task == t)]


@dataclass
class PretrainConfig:
    """The pretraining stage of a trial; it runs before VQA fine-tuning when ``enabled``.

    Attributes:
        enabled: Pretrain, then transfer the encoder to the VQA model and fine-tune (grid cells set
            this; presets size the stage with the keys below).
        epochs: Pretraining epochs over the corpus (LXMERT: 20).
        tasks: Comma-separated objectives: ``mlm`` (masked cross-modality LM), ``mor`` (masked
            object prediction: feature regression + detected-label classification), ``match``
            (image-sentence matching), ``qa`` (image question answering), ``contrastive``
            (image-text InfoNCE over the batch's true pairs on the single-modality states; not
            LXMERT's).
        weighting: How the task losses are combined: ``equal`` (LXMERT), ``grad_std`` (gradient
            standard deviation, docs/pretraining.md), ``uncertainty`` (Kendall et al. 2018),
            ``gradnorm`` (Chen et al. 2018).
        weight_every: Steps between weight updates of ``grad_std`` / ``gradnorm`` (each update costs
            one extra backward pass per task).
        shared: The parameters whose per-task gradients ``grad_std`` / ``gradnorm`` read:
            ``encoder`` (every encoder parameter except the word embeddings, which double as the
            MLM decoder) or ``last_layer`` (the last cross-modality layer, GradNorm's choice;
            cheaper).
        grad_std_floor: ``grad_std`` floors each task's normalised gradient std at this fraction
            of the mean over tasks, so a task with a (near-)zero gradient cannot take all the weight.
        gradnorm_alpha: GradNorm's asymmetry alpha (Chen et al. use 0.12-3; 1.5 for NYUv2).
        gradnorm_lr: Learning rate of GradNorm's task weights (Adam).
        schedule: Task on/off rules by epoch or learning rate (module docstring), e.g. ``qa@epoch>=2``.
        corpus: ``synthetic`` (generated from ``corpus_seed``, features by easy-VQA's extractor; needs
            ``data.name=easyvqa``) or ``lxmert`` (LXMERT's caption / QA files + obj36 features under
            ``root``).
        corpus_images: Synthetic: training images (each brings 2 captions and 2 questions).
        corpus_eval_images: Synthetic: held-out images for the per-task evaluation losses.
        corpus_seed: Synthetic: the seed the corpus is drawn from (same seed, same arrays).
        root: LXMERT corpus: LXMERT's ``data`` folder (``lxmert/*.json``, ``mscoco_imgfeat/``,
            ``vg_gqa_imgfeat/``); empty = ``data.root`` (LXMERT keeps both in one folder).
        sources: LXMERT corpus: training sources (``data/lxmert/<source>.json``).
        eval_source: LXMERT corpus: the evaluation source.
        image_limit: LXMERT corpus: first N images per feature file (0 = all; LXMERT's tiny: 500).
        max_seq_len: Tokens per sentence incl. [CLS] / [SEP]; 0 = the fine-tuning data's.
        batch_size: Sentences per pretraining step (LXMERT: 256).
        eval_batch_size: Sentences per evaluation batch.
        lr: Peak learning rate (LXMERT: 1e-4), AdamW, linear warm-up then linear decay.
        warmup_ratio: Warm-up fraction of the pretraining steps (LXMERT: 0.05).
        weight_decay: AdamW weight decay.
        grad_clip: Gradient-norm clip (LXMERT: 1.0); 0 = none.
        mlm_prob: Fraction of tokens masked (80% [MASK], 10% random, 10% kept).
        mor_prob: Fraction of regions masked (80% zeroed, 10% another region's feature, 10% kept).
        mismatch_prob: Fraction of sentences replaced by another image's (matching negatives).
        contrastive_dim: ``contrastive``: embedding size of the contrastive head.
        contrastive_temperature: ``contrastive``: the InfoNCE temperature (CLIP's initial 0.07), fixed
            or the initial value of a learned one.
        contrastive_learn_temperature: ``contrastive``: learn the temperature (its inverse kept at or
            below 100, as CLIP does) or keep it fixed.
        contrastive_negatives: ``contrastive``: extra negatives from earlier batches (a MoCo-style
            queue of this many text and image embeddings, checkpointed with the trial); 0 = the
            batch's own pairs only.
        itm_negatives: ``match`` as Hendricks et al.'s contrastive image-text matching: each true
            pair of the batch is scored by the matching head beside this many texts of other images
            of the batch (InfoNCE over 1 + K pair scores) instead of the binary matched / mismatched
            classification; 0 = LXMERT's binary matching. A batch with fewer texts of other images
            uses as many as every row has (``pretrain/itm_negatives_min`` says how many).
    """

    enabled: bool = False
    epochs: int = 1
    tasks: tuple[str, ...] = ("mlm", "mor", "match", "qa")
    weighting: str = "equal"
    weight_every: int = 10
    shared: str = "encoder"
    grad_std_floor: float = 0.1
    gradnorm_alpha: float = 1.5
    gradnorm_lr: float = 0.025
    schedule: tuple[str, ...] = ()
    corpus: str = "synthetic"
    corpus_images: int = 2000
    corpus_eval_images: int = 200
    corpus_seed: int = 0
    root: str = ""
    sources: tuple[str, ...] = tuple(LXMERT_SOURCES.split(","))
    eval_source: str = LXMERT_EVAL_SOURCE
    image_limit: int = 0
    max_seq_len: int = 0
    batch_size: int = 64
    eval_batch_size: int = 256
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 5.0
    mlm_prob: float = 0.15
    mor_prob: float = 0.15
    mismatch_prob: float = 0.5
    contrastive_dim: int = 256
    contrastive_temperature: float = 0.07
    contrastive_learn_temperature: bool = True
    contrastive_negatives: int = 0
    itm_negatives: int = 0

    def __post_init__(self) -> None:
        normalise_lists(self, "pretrain.")

    @property
    def task_list(self) -> list[str]:
        """``tasks`` as a list, in LXMERT's order."""
        wanted = set(self.tasks)
        return [t for t in TASKS if t in wanted]

    @property
    def rules(self) -> list[Rule]:
        return parse_schedule(self.schedule, self.task_list)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad key (``pretrain.<field>``)."""
        check_types(self, "pretrain.")
        names = list(self.tasks)
        bad = [t for t in names if t not in TASKS]
        if bad or not names:
            raise ConfigError(f"pretrain.tasks={','.join(self.tasks)!r}: expected a subset of {', '.join(TASKS)}")
        if len(set(names)) != len(names):
            raise ConfigError(f"pretrain.tasks={','.join(self.tasks)!r} names a task twice")
        for key, options in (("weighting", WEIGHTINGS), ("corpus", CORPORA), ("shared", SHARED)):
            if getattr(self, key) not in options:
                raise ConfigError(f"pretrain.{key}={getattr(self, key)!r}: expected one of {', '.join(options)}")
        for key in ("epochs", "weight_every", "batch_size", "eval_batch_size", "corpus_images"):
            if getattr(self, key) < 1:
                raise ConfigError(f"pretrain.{key}={getattr(self, key)} must be >= 1")
        for key in ("corpus_eval_images", "contrastive_negatives", "itm_negatives", "image_limit", "max_seq_len",
                    "corpus_seed", "weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise ConfigError(f"pretrain.{key}={getattr(self, key)} must be >= 0")
        if 0 < self.max_seq_len < 3:
            raise ConfigError(f"pretrain.max_seq_len={self.max_seq_len}: needs room for [CLS], a token, [SEP]")
        for key in ("lr", "gradnorm_lr"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"pretrain.{key}={getattr(self, key)} must be > 0")
        for key in ("mlm_prob", "mor_prob", "mismatch_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"pretrain.{key}={getattr(self, key)} must lie in [0, 1]")
        if self.itm_negatives > 0 and "match" not in names:
            raise ConfigError(f"pretrain.itm_negatives={self.itm_negatives} makes the matching objective contrastive: "
                              f"it needs match in pretrain.tasks (now {','.join(self.tasks)})")
        if self.contrastive_dim < 1:
            raise ConfigError(f"pretrain.contrastive_dim={self.contrastive_dim} must be >= 1")
        if not self.contrastive_temperature > 0:
            raise ConfigError(f"pretrain.contrastive_temperature={self.contrastive_temperature} must be > 0")
        if self.contrastive_learn_temperature and self.contrastive_temperature < 0.01:
            raise ConfigError(f"pretrain.contrastive_temperature={self.contrastive_temperature}: a learned temperature "
                              "starts at or above 0.01 (its inverse is kept <= 100)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"pretrain.warmup_ratio={self.warmup_ratio} must lie in [0, 1)")
        if not 0.0 < self.grad_std_floor <= 1.0:
            raise ConfigError(f"pretrain.grad_std_floor={self.grad_std_floor} must lie in (0, 1]")
        if self.gradnorm_alpha < 0:
            raise ConfigError(f"pretrain.gradnorm_alpha={self.gradnorm_alpha} must be >= 0")
        parse_schedule(self.schedule, names)
        if self.corpus == "lxmert" and not self.sources:
            raise ConfigError("pretrain.sources is empty: name LXMERT's pretraining sources")

    def lxmert_root(self, data_root: str = "") -> str:
        """LXMERT's data folder: ``root``, else the fine-tuning data's (LXMERT keeps ``vqa/`` and
        ``lxmert/`` side by side in one ``data`` folder)."""
        return self.root or data_root
