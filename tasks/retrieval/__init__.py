"""Zero-shot image-text retrieval: caption retrieval sets, pair / embedding scoring, recall metrics.

    from tasks.retrieval import RetrievalSet, prepare_synthetic, prepare_files, evaluate
    rset = RetrievalSet.open(prepare_synthetic(DataConfig(name="easyvqa"), n_images=100))
    metrics, scores = evaluate(pretraining_model, rset, scoring="itm")   # i2t_r1 ... t2i_meanr, rsum

See docs/decoupling.md.
"""

from tasks.retrieval.data import (
    CaptionFormatError,
    MissingImagesError,
    RetrievalSet,
    prepare_files,
    prepare_synthetic,
    read_captions,
    write_lxmert_captions,
    write_volta_captions,
)
from tasks.retrieval.metrics import (
    TIES,
    embedding_scores,
    image_to_text_ranks,
    retrieval_metrics,
    score_pairs,
    text_to_image_ranks,
)
from tasks.retrieval.scoring import SCORINGS, embed, evaluate, itm_scorer

__all__ = [
    "SCORINGS",
    "TIES",
    "CaptionFormatError",
    "MissingImagesError",
    "RetrievalSet",
    "embed",
    "embedding_scores",
    "evaluate",
    "image_to_text_ranks",
    "itm_scorer",
    "prepare_files",
    "prepare_synthetic",
    "read_captions",
    "retrieval_metrics",
    "score_pairs",
    "text_to_image_ranks",
    "write_lxmert_captions",
    "write_volta_captions",
]
