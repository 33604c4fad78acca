"""Per-step cost of each task weighting in the real pretraining step, measured side by side.

    python -m benchmarks.weighting                          # the default preset's model and stage
    python -m benchmarks.weighting --preset smoke --steps 10 --repeats 3
    python -m benchmarks.weighting --variants equal,grad_std@1,grad_std@10,grad_std@10/last_layer
    python -m benchmarks.weighting model.hidden_size=128 pretrain.batch_size=32

Every variant is the pretraining stage of a :class:`sweeps.loop.TrialLoop` built from the same config and seed
(only ``pretrain.weighting`` / ``weight_every`` / ``shared`` differ) and runs ``--steps`` training
steps (forward, the strategy's ``update`` and ``combine``, backward, optimizer) on the same
pre-assembled batches. Variants run back to back in each repeat, in a rotated order; the ratio to
``equal`` is taken per repeat and its median over repeats reported (slow phases of a shared
machine hit the variants of one repeat alike), with the ratio of the best times beside it. The
``update`` column is the share of a step spent inside the strategy's ``update`` (the per-task
gradients for grad_std / gradnorm), measured inside the same steps; ``1/(1-update)`` is the
overhead it implies, which other jobs on a shared machine disturb far less than the wall-clock
ratios (they slow every part of a step alike).

A variant is ``<weighting>[@<weight_every>][/<shared>]``, e.g. ``grad_std@10/last_layer``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_VARIANTS = "equal,grad_std@1,grad_std@10,grad_std@10/last_layer,uncertainty,gradnorm@10"


def parse_variant(text: str) -> dict[str, str]:
    name, _, shared = text.partition("/")
    weighting, _, every = name.partition("@")
    out = {"pretrain.weighting": weighting}
    if every:
        out["pretrain.weight_every"] = every
    if shared:
        out["pretrain.shared"] = shared
    return out


def build_stage(preset: str, overrides: dict[str, str], threads: int, cache_dir: str):
    import torch

    from sweeps.config import apply_overrides
    from sweeps.grid import expand, load_grid, load_preset
    from sweeps.loop import TrialLoop, prepared_config

    torch.set_num_threads(threads)
    base = {"data.cache_dir": cache_dir, "pretrain.enabled": "true"} if cache_dir else {"pretrain.enabled": "true"}
    plan = expand(load_grid("paper"), load_preset(preset), cli_overrides=base, cells=["softmax"])
    cfg = apply_overrides(plan.trials[0].config, overrides, source="benchmark")
    cfg.validate()
    # The trial's pretraining stage, as the loop runs it (its fine-tuning model is built too, unused).
    return TrialLoop(prepared_config(cfg), log=lambda _m: None).start_stage(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.weighting", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (every variant)")
    parser.add_argument("--preset", default="default", help="preset whose model and pretraining stage to use")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant per repeat")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default="", help="data cache (default: the config's)")
    args = parser.parse_args(argv)

    from sweeps.config import parse_cli_overrides

    common = parse_cli_overrides(args.overrides)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "equal" not in names:
        names.insert(0, "equal")
    stages = {}
    for name in names:
        stages[name] = build_stage(args.preset, {**common, **parse_variant(name)}, args.threads, args.cache_dir)
    first = stages["equal"]
    n_batches = args.warmup + args.steps
    # a corpus large enough for the timed batches (the preset's corpus is what is timed)
    task = first.adapter
    it = task.data.train.batches(task.pcfg.batch_size, task.masking, shuffle=True, seed=0, epoch=0)
    batches = [b for _, b in zip(range(n_batches), it)]
    if len(batches) < n_batches:
        raise SystemExit(f"the corpus has only {len(batches)} batches; lower --steps/--warmup or raise "
                         "pretrain.corpus_images")  # fmt: skip
    tasks_all = task.tasks
    cfg = first.loop.cfg
    print(f"model {cfg.model.l_layers}-{cfg.model.x_layers}-{cfg.model.r_layers}, hidden {cfg.model.hidden_size}, "
          f"batch {task.pcfg.batch_size}, tasks {','.join(tasks_all)}, {sum(p.numel() for p in task.shared)} shared "
          f"parameters (encoder); {args.threads} thread(s), {args.steps} steps x {args.repeats} repeats")  # fmt: skip

    def run(stage, timed: bool) -> tuple[float, float]:
        chosen = batches[args.warmup :] if timed else batches[: args.warmup]
        spent = 0.0
        start = time.perf_counter()
        for b in chosen:
            stage.train_step(b)  # the loop's step: active tasks at epoch 1, weighting update, combine, step
            spent += stage.adapter.weighting.last_update_s
        return time.perf_counter() - start, spent

    for stage in stages.values():
        stage.trainable.train()
        run(stage, timed=False)
    times: dict[str, list[float]] = {n: [] for n in names}
    update: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            seconds, spent = run(stages[name], timed=True)
            times[name].append(seconds / args.steps)
            update[name].append(spent / max(seconds, 1e-9))
    print(f"\n{'variant':<26} {'ms/step':>9} {'vs equal (paired median)':>25} {'(best/best)':>12} {'update':>8} "
          f"{'1/(1-update)':>13}")
    for name in names:
        ratios = [t / e for t, e in zip(times[name], times["equal"])]
        share = statistics.median(update[name])
        print(f"{name:<26} {1000 * statistics.median(times[name]):9.1f} {statistics.median(ratios):24.3f}x "
              f"{min(times[name]) / min(times['equal']):11.3f}x {100 * share:7.1f}% {1 / max(1 - share, 1e-9):12.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
