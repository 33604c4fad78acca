"""Time zero-shot retrieval scoring: every pair through the matching head vs. embedding similarity.

    python -m benchmarks.retrieval [--images 50 --per-image 2 --hidden 64 --heads 4 --layers 1,2,1
                                     --flow merged --batch 256 --threads 1]

Builds the synthetic caption set (easy-VQA's features, prepared once), a randomly initialised
pretraining model with a matching and a contrastive head, and scores the set both ways in one run.
Prints N x M, the seconds and pairs per second of each, their ratio, and what N x M pairs at that
rate would take for COCO's 5K test set (5,000 images x 25,000 captions), a linear extrapolation.
A command, not library code: it builds a model, which tasks/' library modules never do.
"""

from __future__ import annotations

import argparse
import os

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.retrieval", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--per-image", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", default="1,2,1", help="l,x,r layer counts")
    parser.add_argument("--flow", default="merged")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default="")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from models import lxmert_pretraining, lxmert_tiny
    from tasks import DataConfig
    from tasks.retrieval import RetrievalSet, evaluate, prepare_synthetic

    data = DataConfig(name="easyvqa", cache_dir=args.cache_dir)
    rset = RetrievalSet.open(prepare_synthetic(data, n_images=args.images, per_image=args.per_image))
    n_lang, n_cross, n_visn = (int(v) for v in args.layers.split(","))
    cfg = lxmert_tiny(f"flow={args.flow}", hidden_size=args.hidden, num_heads=args.heads, intermediate_size=4 * args.hidden,
                      l_layers=n_lang, x_layers=n_cross, r_layers=n_visn, vocab_size=30522, visual_feat_dim=rset.visual_feat_dim)  # fmt: skip
    torch.manual_seed(0)
    model = lxmert_pretraining(cfg, ("match", "contrastive"), num_object_labels=3, num_attr_labels=3, num_qa_answers=3)
    print(f"set: {rset.n_images} images x {rset.n_texts} texts; model: hidden {args.hidden}, {args.heads} heads, "
          f"{n_lang}-{n_cross}-{n_visn} layers, flow={args.flow}, {args.threads} thread(s), batch {args.batch}")  # fmt: skip
    itm, _ = evaluate(model, rset, "itm", batch_size=args.batch, log=print)
    emb, _ = evaluate(model, rset, "embedding", batch_size=args.batch, log=print)
    pairs = rset.n_images * rset.n_texts
    print(f"itm:       {pairs:,} pairs in {itm['seconds']:.2f} s ({itm['pairs_per_s']:,.0f} pairs/s)")
    print(f"embedding: {rset.n_images + rset.n_texts:,} encodings in {emb['seconds']:.2f} s")
    print(f"ratio itm / embedding time: {itm['seconds'] / emb['seconds']:.1f}x")
    coco = 5_000 * 25_000
    print(f"extrapolated: COCO 5K by itm at this rate = {coco / itm['pairs_per_s'] / 3600:,.1f} h")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
