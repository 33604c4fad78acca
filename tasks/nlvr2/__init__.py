"""NLVR2 from LXMERT's files: one statement about a pair of images, true or false.

- `tasks.nlvr2.data`: the file layout, the entry reader, ``prepare`` / ``load`` behind
  `tasks.prepare` / `tasks.load` (shared machinery in `tasks.lxmert_task`); batches carry both
  images' regions, ``visual_feats`` (B, 2, R, F).
- `tasks.nlvr2.model`: `pair_forward` (the statement encoded with each image in one batched
  forward, the pooled pair into `models.heads.PairHead`) and the cross-entropy loss.
- `tasks.nlvr2.metrics`: accuracy, consistency (NLVR2's official definition) and the results file.
- `tasks.nlvr2.synthetic`: a small, learnable data folder in LXMERT's exact formats
  (``python -m tasks.nlvr2.synthetic --out DIR``).
"""
