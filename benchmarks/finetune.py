"""Benchmark: training-step time and peak memory of each fine-tuning strategy against ``standard``.

Every strategy trains the same batch in the same process (encoder + VQA head, BCE loss, AdamW on the
plan's main groups, the policy's own optimiser for SpotTune), timed interleaved: each repeat runs
every strategy once, in a rotated order, so that load from other processes hits all of them alike.
Time ratios are the median over repeats of the per-repeat ratio to ``standard`` (the strategies of one
repeat run back to back, so slow phases of a shared machine cancel), and the ratio of the best times.

Peak memory is read from torch's CPU memory profiler (``torch.profiler.profile(profile_memory=True)``:
every allocation and free of the CPU allocator, in order, during one training step after warm-up);
``tracemalloc`` cannot be used, it sees only Python's own allocations, not tensor storage. The
step's peak (activations, gradients, temporaries) is added to what lives across steps (parameters,
frozen copies, the policy, buffers, optimiser state).

    python -m benchmarks.finetune                     # small: 9-5-5, hidden 128, batch 32, 1 thread
    python -m benchmarks.finetune --size tiny --repeats 3
    python -m benchmarks.finetune --strategies standard,spottune --batch 64 --set finetune.k=2
    python -m benchmarks.finetune --help

``benchmarks/`` can call :func:`run` (arguments as :func:`parse_args` builds them; returns the table).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import add_shape_args
from models.builders import backbone, init_weights
from models.config import ModelConfig, apply_overrides
from models.finetune.plan import make_optimizer
from models.finetune.registry import FINETUNE_REGISTRY, apply_finetune
from models.flops import finetune_cost
from models.heads import VQAHead

SIZES: dict[str, dict[str, Any]] = {
    "small": dict(hidden=128, heads=4, intermediate=512, layers="9,5,5", tokens=12, regions=16, feat_dim=128,
                  answers=13, vocab=512, batch=32),
    "tiny": dict(hidden=32, heads=4, intermediate=64, layers="2,1,1", tokens=8, regions=6, feat_dim=16,
                 answers=10, vocab=64, batch=4),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="preset of the numbers below")
    add_shape_args(p)
    p.add_argument("--vocab", type=int, help="vocabulary size")
    p.add_argument("--batch", type=int, help="batch size")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--strategies", default=",".join(FINETUNE_REGISTRY),
                   help="comma-separated strategies (registry names); standard is always included")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="ModelConfig override for every strategy, e.g. finetune.k=2")  # fmt: skip
    p.add_argument("--repeats", type=int, default=5, help="interleaved measurements per strategy")
    p.add_argument("--steps", type=int, default=2, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per strategy first (at least 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for key, value in SIZES[args.size].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.warmup = max(1, args.warmup)  # the optimiser state exists before memory is measured
    return args


def make_config(args: argparse.Namespace, strategy: str) -> ModelConfig:
    l_layers, x_layers, r_layers = (int(n) for n in args.layers.split(","))
    cfg = ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_heads=args.heads, intermediate_size=args.intermediate,
        l_layers=l_layers, x_layers=x_layers, r_layers=r_layers, visual_feat_dim=args.feat_dim,
        max_position_embeddings=max(32, args.tokens), num_answers=args.answers,
    )  # fmt: skip
    return apply_overrides(cfg, [*args.set, f"finetune.name={strategy}"])


def make_batch(args: argparse.Namespace, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed)
    b, t, r = args.batch, args.tokens, args.regions
    mask = torch.ones(b, t, dtype=torch.long)
    mask[::2, t - 2 :] = 0
    return {
        "input_ids": torch.randint(1, cfg.vocab_size, (b, t), generator=g) * mask,
        "attention_mask": mask,
        "token_type_ids": torch.zeros(b, t, dtype=torch.long),
        "visual_feats": torch.randn(b, r, cfg.visual_feat_dim, generator=g),
        "visual_pos": torch.rand(b, r, 4, generator=g),
        "targets": (torch.rand(b, cfg.num_answers, generator=g) > 0.8).float(),
    }


class Trainer:
    """One strategy's encoder + head + optimisers, and its training step."""

    def __init__(self, cfg: ModelConfig, seed: int):
        torch.manual_seed(seed)  # every strategy starts from the same "pretrained" weights
        encoder = backbone(cfg)
        init_weights(encoder, cfg.initializer_range)
        self.plan = apply_finetune(encoder)
        self.head = VQAHead(cfg.hidden_size, cfg.num_answers, cfg.layer_norm_eps)
        main = [p for g in self.plan.param_groups if "optimizer" not in g for p in g["params"]]
        self.optimizers = [torch.optim.AdamW(main + list(self.head.parameters()), lr=1e-4)]
        self.optimizers += [make_optimizer(g) for g in self.plan.param_groups if "optimizer" in g]
        self.modules = nn.ModuleList([self.plan.encoder, self.head]).train()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        out = self.plan.encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                                batch["visual_feats"], batch["visual_pos"])  # fmt: skip
        logits = self.head(out.pooled)
        loss = F.binary_cross_entropy_with_logits(logits, batch["targets"]) * logits.shape[-1]
        self.zero_grad()
        loss.backward()
        for opt in self.optimizers:
            opt.step()

    def resident_bytes(self) -> int:
        """Parameters, buffers and optimiser state: what lives across steps."""
        tensors = list(self.modules.parameters()) + list(self.modules.buffers())
        for opt in self.optimizers:
            tensors += [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)


def step_peak_bytes(trainer: Trainer, batch: dict[str, torch.Tensor]) -> int:
    """Peak of the CPU allocator's live bytes during one training step, above where it started."""
    from torch.profiler import ProfilerActivity, profile

    trainer.zero_grad()  # free last step's gradients outside the window
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.step(batch)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())  # fmt: skip
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Build, warm up, time interleaved, measure memory; print the table; return it by strategy."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(args.threads)
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    names = ["standard"] + [s for s in args.strategies.split(",") if s and s != "standard"]
    unknown = [s for s in names if s not in FINETUNE_REGISTRY]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; valid: {sorted(FINETUNE_REGISTRY)}")
    configs = {name: make_config(args, name) for name in names}
    trainers = {name: Trainer(cfg, args.seed) for name, cfg in configs.items()}
    batch = make_batch(args, configs["standard"])
    for trainer in trainers.values():
        for _ in range(args.warmup):
            trainer.step(batch)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.repeats):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                trainers[name].step(batch)
            times[name].append((time.perf_counter() - t0) / args.steps)
    memory = {name: (t.resident_bytes(), step_peak_bytes(t, batch)) for name, t in trainers.items()}
    costs = {name: finetune_cost(cfg, args.tokens, args.regions) for name, cfg in configs.items()}

    def paired(name: str) -> float:
        return statistics.median(a / b for a, b in zip(times[name], times["standard"]))

    print(f"\nsize={args.size} hidden={args.hidden} heads={args.heads} layers={args.layers} T={args.tokens} "
          f"R={args.regions} F={args.feat_dim} A={args.answers} batch={args.batch} threads={torch.get_num_threads()} "
          f"repeats={args.repeats}x{args.steps} steps; memory: torch CPU memory profiler (one step) + resident")  # fmt: skip
    print(f"{'strategy':<16}{'decisions':>10}{'median ms':>11}{'time vs std':>12}{'(best)':>8}{'resident MB':>13}"
          f"{'step MB':>9}{'peak MB':>9}{'peak vs std':>12}{'FLOPs vs std':>13}")  # fmt: skip
    table: dict[str, dict[str, float]] = {}
    ref_peak = sum(memory["standard"])
    for name in names:
        resident, step = memory[name]
        row = {
            "decisions": float(costs[name].decisions),
            "median_s": statistics.median(times[name]),
            "best_s": min(times[name]),
            "time_ratio": paired(name),
            "best_time_ratio": min(times[name]) / min(times["standard"]),
            "resident_mb": resident / 2**20,
            "step_mb": step / 2**20,
            "peak_mb": (resident + step) / 2**20,
            "peak_ratio": (resident + step) / ref_peak,
            "flops_ratio": costs[name].train / costs["standard"].train,
        }
        table[name] = row
        print(f"{name:<16}{costs[name].decisions:>10}{row['median_s'] * 1e3:>11.1f}{row['time_ratio']:>12.3f}"
              f"{row['best_time_ratio']:>8.3f}{row['resident_mb']:>13.1f}{row['step_mb']:>9.1f}{row['peak_mb']:>9.1f}{row['peak_ratio']:>12.3f}"
              f"{row['flops_ratio']:>13.3f}")  # fmt: skip
    return table


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
