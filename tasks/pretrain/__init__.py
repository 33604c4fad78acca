"""Multi-task pretraining data, objectives and task weighting (LXMERT's pretraining stage).

    from tasks.pretrain import PretrainConfig, prepare, load
    pcfg = PretrainConfig(enabled=True, corpus="synthetic", corpus_images=2000)
    prepare(pcfg, data_cfg)            # once: render + featurise the synthetic scenes (or convert LXMERT's files)
    corpus = load(pcfg, data_cfg)      # PretrainData: .train / .eval PretrainCorpus, .answers, label counts
    for batch in corpus.train.batches(64, Masking(), shuffle=True, seed=0, epoch=0):
        ...                            # masked tokens / regions, mismatched pairs, QA labels

``objectives`` turns a model's :class:`models.PretrainOutput` and a batch into per-task losses;
``weighting`` combines them (equal, gradient std, uncertainty, GradNorm). See docs/pretraining.md.
"""

from __future__ import annotations

from pathlib import Path

from tasks import store as st
from tasks.config import DataConfig
from tasks.pretrain.config import TASKS, WEIGHTINGS, PretrainConfig, active_tasks, parse_schedule
from tasks.pretrain.corpus import ImageStore, Masking, PretrainCorpus, PretrainData

__all__ = [
    "TASKS",
    "WEIGHTINGS",
    "ImageStore",
    "Masking",
    "PretrainConfig",
    "PretrainCorpus",
    "PretrainData",
    "active_tasks",
    "corpus_path",
    "load",
    "parse_schedule",
    "prepare",
]


def _seq_len(pcfg: PretrainConfig, data: DataConfig) -> int:
    return pcfg.max_seq_len or data.resolved().max_seq_len


def corpus_path(pcfg: PretrainConfig, data: DataConfig) -> Path:
    """The cache directory of the corpus ``pcfg`` describes (under ``data.cache_dir``)."""
    data = data.resolved()
    if pcfg.corpus == "synthetic":
        from tasks.pretrain import synthetic

        return synthetic.corpus_dir(data.cache_dir, data, pcfg.corpus_images, pcfg.corpus_eval_images,
                                    pcfg.corpus_seed, _seq_len(pcfg, data))  # fmt: skip
    from tasks.pretrain import lxmert

    return lxmert.corpus_dir(data.cache_dir, Path(pcfg.lxmert_root(data.root)), lxmert.source_list(pcfg.sources),
                             lxmert.source_list(pcfg.eval_source), pcfg.image_limit, data.tokenizer,
                             _seq_len(pcfg, data))  # fmt: skip


def prepare(pcfg: PretrainConfig, data: DataConfig) -> dict:
    """Build the pretraining corpus once (idempotent, atomic, safe from several processes).

    Args:
        pcfg: The pretraining config (``corpus``, sizes, seed, LXMERT sources).
        data: The fine-tuning data config: its cache folder, tokenizer and sequence length, and
            (synthetic corpus) its easy-VQA feature mode, whose extractor and standardisation the
            corpus reuses so that pretrained features mean what fine-tuning features mean.

    Returns:
        ``{"corpus": path}``.

    Raises:
        tasks.ConfigError: a synthetic corpus for a data set other than easy-VQA.
        FileNotFoundError: an LXMERT file is missing (named, with its source).
    """
    pcfg.validate()
    data = data.resolved()
    if pcfg.corpus == "synthetic":
        from tasks import prepare as prepare_task
        from tasks.config import ConfigError
        from tasks.pretrain import synthetic

        if data.name != "easyvqa":
            raise ConfigError(
                f"pretrain.corpus=synthetic needs data.name=easyvqa (its features come from easy-VQA's "
                f"extractor), not {data.name!r}; use pretrain.corpus=lxmert for VQA v2"
            )
        feature_store = Path(prepare_task(data)["features"])
        path = corpus_path(pcfg, data)
        st.build_once(path, lambda tmp: synthetic.build(tmp, data, feature_store, pcfg.corpus_images,
                                                        pcfg.corpus_eval_images, pcfg.corpus_seed,
                                                        _seq_len(pcfg, data)))  # fmt: skip
        return {"corpus": str(path)}
    from tasks.pretrain import lxmert

    root = pcfg.lxmert_root(data.root)
    if not root:
        from tasks.config import ConfigError

        raise ConfigError("pretrain.root is empty (and so is data.root): pretrain.corpus=lxmert needs LXMERT's data folder")
    path = lxmert.prepare(root, data.cache_dir, lxmert.source_list(pcfg.sources),
                          lxmert.source_list(pcfg.eval_source), pcfg.image_limit, data.tokenizer,
                          _seq_len(pcfg, data))  # fmt: skip
    return {"corpus": str(path)}


def load(pcfg: PretrainConfig, data: DataConfig) -> PretrainData:
    """Memory-map the corpus (preparing it first if needed)."""
    path = Path(prepare(pcfg, data)["corpus"])
    meta = st.read_json(path / st.META)
    splits = {}
    for split in ("train", "eval"):
        if not (path / split / st.META).is_file():
            continue
        part_meta = st.read_json(path / split / st.META)
        stores = []
        for s in part_meta["stores"]:
            p = Path(s) if Path(s).is_absolute() else path / s
            stores.append(ImageStore.open(p, pcfg.image_limit if pcfg.corpus == "lxmert" else 0))
        splits[split] = PretrainCorpus.open(path / split, stores, meta)
    return PretrainData(train=splits["train"], eval=splits.get("eval"), meta=meta)
