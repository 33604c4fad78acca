"""`RetrievalConfig`: the zero-shot retrieval stage of a trial (``retrieval.*``), evaluation only.

When ``retrieval.enabled`` (and ``pretrain.enabled``), a trial runs ``pretrain``, then ``retrieval``
(the pretraining model, every weight handed over, scored once on a caption retrieval set: no
training), then ``finetune`` (``sweeps.config.ExperimentConfig.stages``). Flat leaves, so the section
flattens to MLflow params and takes ``key=value`` overrides like every other section.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.configkit import ConfigError, check_types

#: Where the caption set comes from.
SOURCES: tuple[str, ...] = ("synthetic", "files")
#: How a pair is scored (``tasks.retrieval.SCORINGS``, repeated here so config has no torch import).
SCORINGS: tuple[str, ...] = ("itm", "embedding")
#: Tie rules of ``tasks.retrieval.metrics`` (``tasks.retrieval.TIES``).
TIES: tuple[str, ...] = ("pessimistic", "optimistic")


@dataclass
class RetrievalConfig:
    """The zero-shot image-text retrieval stage (docs/decoupling.md).

    Attributes:
        enabled: Score the pretraining model on a retrieval set after pretraining (needs
            ``pretrain.enabled``).
        source: ``synthetic`` (scenes drawn from the pretraining corpus' generator on a stream it never
            uses, one image per distinct shape, colour, size and place; needs ``data.name=easyvqa``)
            or ``files`` (captions ``captions`` + LXMERT ``*_obj36.tsv`` features ``features``).
        images: Synthetic: images in the set (<= 648). Files: first N captioned images (0 = all).
        per_image: Synthetic: captions per image (1-3).
        captions: Files: an LXMERT caption ``.json`` or a VOLTA ``.jsonl``.
        features: Files: the LXMERT ``*_obj36.tsv`` holding those images' region features.
        caption_source: Files, LXMERT ``.json``: which ``sentf`` source holds the captions.
        candidates: Candidate-set size: score the first N images and their captions (0 = all;
            e.g. 1000 for COCO's 1K test).
        scoring: ``itm`` (every pair through the whole model, the matching head's log-odds; needs
            ``match`` in ``pretrain.tasks``) or ``embedding`` (cosine of the contrastive head's
            single-modality embeddings; needs ``contrastive`` in ``pretrain.tasks``).
        ties: ``pessimistic`` (a negative scoring equal to the positive ranks above it) or ``optimistic``.
        batch_size: Pairs (itm) or texts / images (embedding) per forward.
    """

    enabled: bool = False
    source: str = "synthetic"
    images: int = 100
    per_image: int = 2
    captions: str = ""
    features: str = ""
    caption_source: str = "mscoco"
    candidates: int = 0
    scoring: str = "itm"
    ties: str = "pessimistic"
    batch_size: int = 256

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming every bad key of this section."""
        check_types(self, "retrieval.")
        problems = []
        for key, options in (("source", SOURCES), ("scoring", SCORINGS), ("ties", TIES)):
            if getattr(self, key) not in options:
                problems.append(f"retrieval.{key}={getattr(self, key)!r}: expected one of {', '.join(options)}")
        for key in ("images", "candidates"):
            if getattr(self, key) < 0:
                problems.append(f"retrieval.{key}={getattr(self, key)} must be >= 0")
        if self.batch_size < 1:
            problems.append(f"retrieval.batch_size={self.batch_size} must be >= 1")
        if not 1 <= self.per_image <= 3:
            problems.append(f"retrieval.per_image={self.per_image} must lie in [1, 3] (the synthetic caption templates)")
        if self.source == "synthetic" and not 1 <= self.images <= 648:
            problems.append(f"retrieval.images={self.images}: a synthetic set holds 1 to 648 images")
        if self.enabled and self.source == "files" and not (self.captions and self.features):
            problems.append("retrieval.source=files needs retrieval.captions (LXMERT .json or VOLTA .jsonl) and "
                            "retrieval.features (an LXMERT *_obj36.tsv)")
        if self.source == "synthetic" and self.candidates > self.images:
            problems.append(f"retrieval.candidates={self.candidates} is more than retrieval.images={self.images}")
        if problems:
            raise ConfigError("; ".join(problems))

    def trial_problems(self, pretrain_enabled: bool, pretrain_tasks: list[str], data_name: str) -> list[str]:
        """What this section needs from the rest of the trial (empty when ``enabled`` is off)."""
        if not self.enabled:
            return []
        problems = []
        if not pretrain_enabled:
            problems.append("retrieval.enabled scores the pretraining model: it needs pretrain.enabled=true")
        need = {"itm": "match", "embedding": "contrastive"}[self.scoring] if self.scoring in SCORINGS else None
        if need and need not in pretrain_tasks:
            problems.append(f"retrieval.scoring={self.scoring} needs the {need!r} head: add {need} to pretrain.tasks "
                            f"(now {','.join(pretrain_tasks)})")  # fmt: skip
        if self.source == "synthetic" and data_name != "easyvqa":
            problems.append(f"retrieval.source=synthetic uses easy-VQA's feature extractor: it needs data.name=easyvqa, "
                            f"got {data_name!r} (use retrieval.source=files)")  # fmt: skip
        return problems
