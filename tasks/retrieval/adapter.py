"""The zero-shot retrieval task adapter (``retrieval``): an evaluation-only stage after pretraining.

The stage's model is the pretraining model itself (:func:`tasks.pretrain.adapter.pretraining_model`,
same heads), and it takes over the pretraining stage's whole state (``transfer = "model"``: the
matching and contrastive heads are what it scores with). Its budget is 0 epochs, so the loop
evaluates it once (``sweeps.loop.StageRun``) and hands its encoder on to fine-tuning.

Metrics (bare; the loop logs them as ``retrieval/eval_<name>`` at ``retrieval/epoch`` = 0):
``i2t_r1 i2t_r5 i2t_r10 i2t_medr i2t_meanr i2t_tied`` (queries = images), the same with ``t2i_``
(queries = captions), ``rsum``, ``n_images``, ``n_texts``, ``seconds`` (and ``pairs_per_s`` for ITM
scoring). Artifact: ``retrieval/ranks.csv``, every query's rank of its positive.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.base import EvalResult, OptimSpec, StepContext, TaskAdapter


def retrieval_set_path(cfg) -> Path:
    """Build (once) and return the trial's retrieval set (``retrieval.source``)."""
    from tasks.retrieval.data import prepare_files, prepare_synthetic

    r = cfg.retrieval
    if r.source == "synthetic":
        return prepare_synthetic(cfg.data, n_images=r.images, per_image=r.per_image, seed=cfg.pretrain.corpus_seed)
    return prepare_files(r.captions, r.features, cfg.data.resolved().cache_dir, tokenizer=cfg.data.tokenizer,
                         caption_source=r.caption_source, image_limit=r.images, progress=False)  # fmt: skip


class RetrievalAdapter(TaskAdapter):
    """Zero-shot image-to-text and text-to-image retrieval with the pretraining model (``retrieval.*``)."""

    name = "retrieval"
    data_names = ()  # never a trial's last stage: it runs between pretraining and fine-tuning
    primary_metric = "rsum"
    fresh_on_init = ("heads.*",)
    fresh_on_transfer = ()
    transfer = "model"

    def __init__(self, cfg, rank: int = 0, world_size: int = 1, device: torch.device | None = None, log=print):
        import tasks.pretrain as tp
        from tasks.retrieval.data import RetrievalSet

        super().__init__(cfg, rank, world_size, device, log)
        self.rcfg = r = cfg.retrieval
        self.corpus = tp.load(cfg.pretrain, cfg.data)  # memory-mapped: only its sizes are read (the heads')
        rset = RetrievalSet.open(retrieval_set_path(cfg))
        self.rset = rset.subset(r.candidates) if r.candidates else rset
        if self.rset.visual_feat_dim != cfg.model.visual_feat_dim:
            raise ValueError(f"retrieval set {rset.path} has {self.rset.visual_feat_dim}-d region features but "
                             f"model.visual_feat_dim={cfg.model.visual_feat_dim}")  # fmt: skip
        self.ranks: list[dict[str, Any]] = []

    @classmethod
    def prepare(cls, cfg) -> tuple[dict[str, Any], str]:
        from tasks.retrieval.data import RetrievalSet

        t0 = time.time()
        rset = RetrievalSet.open(retrieval_set_path(cfg))
        return {}, (f"retrieval set ({cfg.retrieval.source}): {rset.n_images} images, {rset.n_texts} captions "
                    f"at {rset.path} ({time.time() - t0:.1f} s)")  # fmt: skip

    @classmethod
    def cache_key(cls, cfg) -> str:
        from models.configkit import flatten

        return f"{cls.name}:{flatten(cfg.data)!r}{flatten(cfg.retrieval)!r}{cfg.pretrain.corpus_seed}"

    # -- the stage: no training --------------------------------------------------------------------

    def optim(self) -> OptimSpec:
        return OptimSpec(epochs=0, batch_size=self.rcfg.batch_size, lr=1e-4)

    def build_model(self) -> nn.Module:
        from tasks.pretrain.adapter import pretraining_model

        return pretraining_model(self.cfg, self.corpus)

    def train_length(self) -> int:
        return 0

    def train_batches(self, epoch: int):
        return iter(())

    def sequence_shape(self) -> tuple[int, int]:
        return self.rset.max_seq_len, int(self.rset.feats.shape[1])

    def describe(self) -> dict[str, float]:
        return {"data/retrieval_images": float(self.rset.n_images), "data/retrieval_texts": float(self.rset.n_texts)}

    def tags(self) -> dict[str, str]:
        return {"retrieval.scoring": self.rcfg.scoring, "retrieval.source": self.rcfg.source}

    # -- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ctx: StepContext) -> EvalResult:
        """Score the whole set (every rank scores all of it: the set is small next to training, and
        the metrics need the full matrix) and return rank 0's metrics."""
        from tasks.retrieval.metrics import image_to_text_ranks, text_to_image_ranks
        from tasks.retrieval.scoring import evaluate

        plain = getattr(model, "module", model)  # under DDP: the model itself (encode_unimodal, heads)
        metrics, scores = evaluate(plain, self.rset, self.rcfg.scoring, batch_size=self.rcfg.batch_size,
                                   ties=self.rcfg.ties, log=self.log, autocast=ctx.autocast)  # fmt: skip
        t2i, _ = text_to_image_ranks(scores, self.rset.text_image, self.rcfg.ties)
        i2t, _ = image_to_text_ranks(scores, self.rset.text_image, self.rcfg.ties)
        self.ranks = ([{"query": "text", "index": i, "positive": int(self.rset.text_image[i]), "rank": int(r)}
                       for i, r in enumerate(np.asarray(t2i))]
                      + [{"query": "image", "index": i, "positive": i, "rank": int(r)}
                         for i, r in enumerate(np.asarray(i2t))])  # fmt: skip
        return EvalResult(metrics)

    def epoch_artifacts(self) -> dict[str, Any]:
        from sweeps.tracking import csv_text  # only ever called where the loop logs to MLflow

        return {"ranks.csv": csv_text(self.ranks)} if self.ranks else {}

    def progress(self, metrics: dict[str, float]) -> str:
        if "eval_rsum" not in metrics:
            return ""
        return (f"zero-shot retrieval ({self.rcfg.scoring}, {int(metrics['eval_n_images'])} images x "
                f"{int(metrics['eval_n_texts'])} captions): i2t R@1/5/10 {metrics['eval_i2t_r1']:.1f}/"
                f"{metrics['eval_i2t_r5']:.1f}/{metrics['eval_i2t_r10']:.1f}, t2i R@1/5/10 {metrics['eval_t2i_r1']:.1f}/"
                f"{metrics['eval_t2i_r5']:.1f}/{metrics['eval_t2i_r10']:.1f}, rsum {metrics['eval_rsum']:.1f}")
