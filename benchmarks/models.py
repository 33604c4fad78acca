"""Benchmark: forward + backward step time of each attention variant against HuggingFace LXMERT.

Every model runs the same batch, in the same process, with measurements interleaved (each repeat runs
every model once, in a rotated order) so that load from other processes hits all of them alike; the
table reports the best and median step time, samples/s (at the median) and the ratios to our softmax
and to HuggingFace (median of the per-repeat ratios; and of the best times).

    python -m benchmarks.models                        # LXMERT base (9-5-5, 768), batch 8, 1 thread
    python -m benchmarks.models --size small           # the sweep's small 9-5-5 (hidden 128), batch 128, 1 thread
    python -m benchmarks.models --size base --device cuda --dtype bf16 --batch 64
    python -m benchmarks.models --help

HuggingFace's ``LxmertForQuestionAnswering`` is built from ``transformers`` (offline, random weights;
its weights are imported into ours, which also checks that our softmax model computes the same).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks import add_shape_args
from models.builders import build_model
from models.checkpoint import load_pretrained
from models.config import ModelConfig, apply_overrides

SIZES: dict[str, dict] = {
    "base": dict(hidden_size=768, num_heads=12, intermediate_size=3072, layers="9,5,5", tokens=20, regions=36,
                 feat_dim=2048, answers=3129, batch=8, threads=1),
    "small": dict(hidden_size=128, num_heads=4, intermediate_size=512, layers="9,5,5", tokens=12, regions=16,
                  feat_dim=128, answers=13, batch=128, threads=1),
    "tiny": dict(hidden_size=32, num_heads=4, intermediate_size=64, layers="2,2,2", tokens=8, regions=6,
                 feat_dim=16, answers=10, batch=4, threads=1),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.models", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="base", help="preset of the numbers below")
    add_shape_args(p)
    p.add_argument("--batch", type=int, help="batch size")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--variants", default="softmax,span,entmax,span_entmax",
                   help="comma-separated attention variants (registry names)")  # fmt: skip
    p.add_argument("--span-init", type=float, default=0.5,
                   help="initial span fraction z of span variants (below 1 so the mask is computed)")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra ModelConfig override for our models, e.g. attention.span_ramp=4")  # fmt: skip
    p.add_argument("--padding", type=int, default=2, help="padded tokens at the end of every other row")
    p.add_argument("--repeats", type=int, default=5, help="interleaved measurements per model")
    p.add_argument("--steps", type=int, default=2, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    p.add_argument("--no-hf", action="store_true", help="skip HuggingFace LxmertForQuestionAnswering")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--eval-mode", action="store_true", help="no dropout (model.eval()) while timing")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for key, value in SIZES[args.size].items():
        attr = {"hidden_size": "hidden", "num_heads": "heads", "intermediate_size": "intermediate",
                "feat_dim": "feat_dim"}.get(key, key)  # fmt: skip
        if getattr(args, attr, None) is None:
            setattr(args, attr, value)
    return args


def make_config(args: argparse.Namespace, variant: str) -> ModelConfig:
    l_layers, x_layers, r_layers = (int(n) for n in args.layers.split(","))
    cfg = ModelConfig(
        hidden_size=args.hidden, num_heads=args.heads, intermediate_size=args.intermediate,
        l_layers=l_layers, x_layers=x_layers, r_layers=r_layers, visual_feat_dim=args.feat_dim,
        num_answers=args.answers,
    )  # fmt: skip
    overrides = [f"attention.name={variant}", f"attention.span_max_lang={args.tokens}",
                 f"attention.span_max_visn={args.regions}",
                 f"attention.span_max_cross={max(args.tokens, args.regions)}",
                 f"attention.span_init={args.span_init}", *args.set]  # fmt: skip
    return apply_overrides(cfg, overrides)


def make_batch(args: argparse.Namespace, cfg: ModelConfig, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed)
    b, t, r = args.batch, args.tokens, args.regions
    mask = torch.ones(b, t, dtype=torch.long)
    if args.padding:
        mask[::2, t - args.padding :] = 0
    batch = {
        "input_ids": torch.randint(1, cfg.vocab_size, (b, t), generator=g) * mask,
        "attention_mask": mask,
        "token_type_ids": torch.zeros(b, t, dtype=torch.long),
        "visual_feats": torch.randn(b, r, cfg.visual_feat_dim, generator=g),
        "visual_pos": torch.rand(b, r, 4, generator=g),
        "targets": (torch.rand(b, cfg.num_answers, generator=g) > 0.99).float(),
    }
    return {k: v.to(device) for k, v in batch.items()}


def hf_model(cfg: ModelConfig):
    """HuggingFace's LxmertForQuestionAnswering at ``cfg`` (imported lazily: a benchmark-only dependency)."""
    import transformers

    transformers.logging.set_verbosity_error()
    hc = transformers.LxmertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, l_layers=cfg.l_layers, x_layers=cfg.x_layers,
        r_layers=cfg.r_layers, visual_feat_dim=cfg.visual_feat_dim, num_qa_labels=cfg.num_answers,
        hidden_dropout_prob=cfg.hidden_dropout, attention_probs_dropout_prob=cfg.attention_dropout,
    )  # fmt: skip
    model = transformers.LxmertForQuestionAnswering(hc)

    def step(batch):
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"], visual_feats=batch["visual_feats"],
            visual_pos=batch["visual_pos"],
        )  # fmt: skip
        return out.question_answering_score

    return model, step


def ours_step(model):
    def step(batch):
        return model(
            batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["visual_feats"],
            batch["visual_pos"],
        ).logits  # fmt: skip

    return step


def run(args: argparse.Namespace) -> dict[str, float]:
    """Build the models, time them interleaved, print the table; return the best seconds per step."""
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    variants = [v for v in args.variants.split(",") if v]
    models: dict[str, tuple[torch.nn.Module, Callable]] = {}
    hf_weights = None
    if not args.no_hf:
        hf, step = hf_model(make_config(args, "softmax"))
        hf_weights = hf.state_dict()
        models["huggingface"] = (hf.to(device), step)
    for variant in variants:
        model = build_model(make_config(args, variant))
        if hf_weights is not None:  # the same weights as HuggingFace's
            load_pretrained(model, hf_weights, verbose=False)
        models[variant] = (model.to(device), ours_step(model))
    cfg = make_config(args, "softmax")
    batch = make_batch(args, cfg, device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()
    )

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def one_step(model, step):
        model.zero_grad(set_to_none=True)
        with autocast:
            logits = step(batch)
            loss = F.binary_cross_entropy_with_logits(logits.float(), batch["targets"]) * logits.shape[-1]
        loss.backward()

    for model, _ in models.values():
        model.train(not args.eval_mode)
    if "huggingface" in models and "softmax" in models:
        with torch.no_grad():  # same weights, same batch, eval mode: the same outputs
            for model, _ in models.values():
                model.eval()
            diff = (models["huggingface"][1](batch) - models["softmax"][1](batch)).abs().max().item()
            for model, _ in models.values():
                model.train(not args.eval_mode)
        print(f"max |logits(ours softmax) - logits(HuggingFace)| = {diff:.2e} (eval mode, fp32)")
    for model, step in models.values():
        for _ in range(args.warmup):
            one_step(model, step)
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for rep in range(args.repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            model, step = models[name]
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                one_step(model, step)
            sync()
            times[name].append((time.perf_counter() - t0) / args.steps)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}
    print(
        f"\nsize={args.size} hidden={args.hidden} heads={args.heads} layers={args.layers} T={args.tokens} "
        f"R={args.regions} F={args.feat_dim} A={args.answers} batch={args.batch} threads={torch.get_num_threads()} "
        f"device={device} dtype={args.dtype} mode={'eval' if args.eval_mode else 'train'} "
        f"repeats={args.repeats}x{args.steps} steps"
    )
    # Two ratio estimates, both robust to other processes on a shared CPU: "paired" is the median over
    # repeats of the ratio within a repeat (the models of one repeat run back to back, so slow phases of
    # the machine cancel); "best" compares the fastest measurements (other load only ever adds time).
    def paired(name: str, ref: str) -> float:
        if ref not in times:
            return float("nan")
        return statistics.median(a / b for a, b in zip(times[name], times[ref]))

    print(f"{'model':<14}{'best ms':>10}{'median ms':>11}{'samples/s':>11}{'vs softmax':>12}{'vs HF':>8}"
          f"{'vs HF (best)':>14}")  # fmt: skip
    for name in names:
        vs_hf_best = best[name] / best["huggingface"] if "huggingface" in best else float("nan")
        print(f"{name:<14}{best[name] * 1e3:>10.1f}{median[name] * 1e3:>11.1f}{args.batch / median[name]:>11.1f}"
              f"{paired(name, 'softmax'):>12.3f}{paired(name, 'huggingface'):>8.3f}{vs_hf_best:>14.3f}")  # fmt: skip
    return best


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
