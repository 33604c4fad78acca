"""GQA (balanced) from LXMERT's files: question JSONs, the 1,842-answer vocabulary, obj36 features.

- `tasks.gqa.data`: the file layout, the entry reader, ``prepare`` / ``load`` behind
  `tasks.prepare` / `tasks.load` (shared machinery in `tasks.lxmert_task`).
- `tasks.gqa.metrics`: accuracy (the label score of the predicted answer) and the submission file.
- `tasks.gqa.synthetic`: a small, learnable data folder in LXMERT's exact formats
  (``python -m tasks.gqa.synthetic --out DIR``).
- `tasks.answer_map`: the answer head initialised from LXMERT's 9,500-answer pretraining QA head.
"""
