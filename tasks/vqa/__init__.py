"""VQA v2 from LXMERT's files: feature TSVs converted once to memory-mapped arrays, tokenised
question JSONs, the 3,129-answer vocabulary and its soft targets.

- `tasks.vqa.files`: the file layout, reading (and writing) LXMERT's formats.
- `tasks.vqa.convert`: the resumable, atomic TSV converter (``python -m tasks.vqa.convert``).
- `tasks.vqa.data`: ``prepare`` / ``load`` behind `tasks.prepare` / `tasks.load`.
- `tasks.vqa.synthetic`: small fake data sets in LXMERT's exact formats (tests, benchmarks).
"""
