"""The benchmark command runs end to end (tiny sizes)."""

from __future__ import annotations

from benchmarks import tasks as bench


def test_bench_smoke(tmp_path, capsys):
    out = bench.main(["--images", "16", "--questions", "200", "--dim", "32", "--seconds", "0.05",
                      "--tsv-images", "6", "--batch-sizes", "8,32", "--dir", str(tmp_path)])  # fmt: skip
    assert [row[0] for row in out["batches"]] == [8, 32]
    assert all(ours > 0 and theirs > 0 for _, ours, theirs in out["batches"])
    assert out["convert_images_per_s"] > 0 and out["parse_images_per_s"] > 0
    text = capsys.readouterr().out
    assert "ArrayDataset.batches" in text and "LXMERT-style" in text
