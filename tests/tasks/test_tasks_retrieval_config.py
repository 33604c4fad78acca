"""The retrieval stage's set as ``retrieval.*`` keys build it: synthetic with a candidate-set size, and
COCO-style caption + obj36 files."""

from __future__ import annotations

import numpy as np
from tasks_fixtures import write_tsv

from sweeps.config import ExperimentConfig, apply_overrides
from tasks.retrieval import RetrievalSet, write_lxmert_captions
from tasks.retrieval.adapter import retrieval_set_path


def test_synthetic_set_and_candidate_subset_from_the_keys(easyvqa_cache):
    cfg = apply_overrides(ExperimentConfig(), {"data.name": "easyvqa", "data.cache_dir": str(easyvqa_cache),
                                               "retrieval.images": "12", "retrieval.per_image": "3"})  # fmt: skip
    rset = RetrievalSet.open(retrieval_set_path(cfg))
    assert (rset.n_images, rset.n_texts) == (12, 36)
    sub = rset.subset(5)  # what retrieval.candidates=5 scores
    assert (sub.n_images, sub.n_texts) == (5, 15) and sub.text_image.max() == 4


def test_files_set_from_the_keys(tmp_path):
    rng = np.random.default_rng(1)
    ids = [f"COCO_val2014_{i:012d}" for i in (42, 7, 391895)]
    write_tsv(tmp_path / "val2014_obj36.tsv", ids, rng)
    write_lxmert_captions(tmp_path / "captions.json", {ids[0]: ["a dog", "a brown dog"], ids[2]: ["a bike"]})
    cfg = apply_overrides(ExperimentConfig(), {
        "data.name": "easyvqa", "data.cache_dir": str(tmp_path / "cache"), "retrieval.source": "files",
        "retrieval.captions": str(tmp_path / "captions.json"), "retrieval.features": str(tmp_path / "val2014_obj36.tsv"),
        "retrieval.images": "0"})  # fmt: skip
    rset = RetrievalSet.open(retrieval_set_path(cfg))
    assert rset.image_ids == [ids[0], ids[2]] and rset.text_image.tolist() == [0, 0, 1]
