"""Are the region features informative? A quick probe that needs no transformer.

``python -m benchmarks.probe`` trains two small classifiers on easy-VQA from fixed inputs: the
flattened region features of the image concatenated with the question's bag of words, and
reports test accuracy overall and per question type:

- a linear softmax classifier (logistic regression): it can read colour and shape answers off
  the features, but not the yes/no questions, which need image x question interactions;
- a one-hidden-layer MLP: it can, so its accuracy bounds what a model gets from these features
  once it learns to combine the two modalities.

Both run on one CPU thread in seconds; compare ``--features`` modes / ``--grid`` sizes with it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from tasks.config import DataConfig
from tasks.dataset import ArrayDataset


def inputs(ds: ArrayDataset, vocab: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened region features + boxes and a bag of words over ``vocab`` token ids.

    Returns:
        ``x`` (N, R * (F + 4) + V) float32 and ``y`` (N,) int64 (argmax of the targets).
    """
    b = ds.get_batch(np.arange(len(ds)))
    n = len(ds)
    vis = torch.cat([b["visual_feats"], b["visual_pos"]], -1).reshape(n, -1)
    lut = torch.full((int(vocab.max()) + 1,), -1, dtype=torch.int64)
    lut[torch.from_numpy(vocab)] = torch.arange(len(vocab))
    ids = b["input_ids"].clamp(max=len(lut) - 1)
    col = lut[ids]
    bow = torch.zeros(n, len(vocab))
    rows = torch.arange(n)[:, None].expand_as(col)
    keep = (col >= 0) & (b["attention_mask"] > 0)
    bow[rows[keep], col[keep]] = 1.0
    vis = (vis - vis.mean(0)) / (vis.std(0) + 1e-6)
    return torch.cat([vis, bow], 1), b["targets"].argmax(1)


def fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> float:
    """Adam on cross-entropy, batch 256; returns seconds spent."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 256):
            j = perm[i : i + 256]
            loss = torch.nn.functional.cross_entropy(model(x[j]), y[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def report(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, ds: ArrayDataset, secs: float) -> dict:
    with torch.no_grad():
        ok = (model(x).argmax(1) == y).numpy()
    types = np.array(ds.question_type_of(ds.question_ids))
    per = {t: float(ok[types == t].mean()) for t in sorted(set(types))}
    print(f"{name:6s} test acc {ok.mean():.4f} ({secs:.1f} s)  " + "  ".join(f"{t}: {v:.3f}" for t, v in per.items()))
    return {"acc": float(ok.mean()), "per_type": per, "seconds": secs}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--features", default="compact", choices=("compact", "vqa_like"))
    p.add_argument("--grid", type=int, default=2)
    p.add_argument("--cache-dir", default="")
    p.add_argument("--epochs", type=int, default=20, help="MLP epochs (the linear probe gets 5)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pixels", action="store_true", help="also probe raw pixels (16x16x3 per image) for contrast")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    from tasks import load

    data = load(DataConfig(name="easyvqa", features=a.features, grid=a.grid, cache_dir=a.cache_dir))
    vocab = np.unique(np.asarray(data.train.arrays["input_ids"]))
    xtr, ytr = inputs(data.train, vocab)
    xte, yte = inputs(data.eval, vocab)
    d, k = xtr.shape[1], data.num_answers
    print(f"inputs: {d} dims ({data.num_regions} regions x ({data.visual_feat_dim} + 4) + {len(vocab)} words)")
    out = {}
    lin = torch.nn.Linear(d, k)
    out["linear"] = report("linear", lin, xte, yte, data.eval, fit(lin, xtr, ytr, 5, 1e-2, a.seed))
    mlp = torch.nn.Sequential(torch.nn.Linear(d, a.hidden), torch.nn.ReLU(), torch.nn.Linear(a.hidden, k))
    out["mlp"] = report("mlp", mlp, xte, yte, data.eval, fit(mlp, xtr, ytr, a.epochs, 3e-3, a.seed))
    if a.pixels:
        ptr, pte = (pixel_inputs(ds, split, x, len(vocab)) for ds, split, x in ((data.train, "train", xtr), (data.eval, "test", xte)))
        mlp = torch.nn.Sequential(torch.nn.Linear(ptr.shape[1], a.hidden), torch.nn.ReLU(), torch.nn.Linear(a.hidden, k))
        out["mlp_pixels"] = report("pixels", mlp, pte, yte, data.eval, fit(mlp, ptr, ytr, a.epochs, 3e-3, a.seed))
    return out


def pixel_inputs(ds: ArrayDataset, split: str, x: torch.Tensor, n_words: int) -> torch.Tensor:
    """Raw pixels (each image box-downsampled to 16 x 16 x 3, standardised) + the same bag of words."""
    from tasks.easyvqa import load_images

    images, ids = load_images(split)
    small = images.reshape(len(images), 16, 4, 16, 4, 3).mean((2, 4)).reshape(len(images), -1)
    row = {i: r for r, i in enumerate(ids)}
    image_ids = ds.stores[0].image_ids
    px = torch.from_numpy(small[[row[image_ids[i]] for i in np.asarray(ds.arrays["image_index"])]]).float()
    px = (px - px.mean(0)) / (px.std(0) + 1e-6)
    return torch.cat([px, x[:, -n_words:]], 1)


if __name__ == "__main__":
    main()
