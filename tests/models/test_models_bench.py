"""The benchmark command runs end to end (at the tiny size) and prints the side-by-side table."""

import pytest

from benchmarks import models as bench


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--help"])
    assert exit_.value.code == 0
    assert "--threads" in capsys.readouterr().out


def test_tiny_run_prints_every_model_and_ratios(capsys):
    pytest.importorskip("transformers")
    median = bench.run(bench.parse_args(["--size", "tiny", "--repeats", "1", "--steps", "1", "--warmup", "0"]))
    out = capsys.readouterr().out
    assert set(median) == {"huggingface", "softmax", "span", "entmax", "span_entmax"}
    assert "vs HF" in out and "samples/s" in out and "max |logits(ours softmax) - logits(HuggingFace)|" in out
    diff = float(out.split("= ")[1].split()[0])
    assert diff < 1e-4
