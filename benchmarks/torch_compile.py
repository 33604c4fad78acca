"""Does ``torch.compile`` (CPU, inductor) of the training step pay for itself in a trial?

    python -m benchmarks.torch_compile                          # default preset's trial: softmax, 1 epoch
    python -m benchmarks.torch_compile --cells softmax,span,entmax,layerdrop_955 --epochs 2

For each cell, three fresh processes run the same trial loop (the preset's model, data, batch
size and optimiser; :class:`sweeps.loop.TrialLoop`, without Ray or MLflow), one after the other:

* ``eager``: as the sweep runs it today;
* ``compile, cold cache``: the model compiled in place (``nn.Module.compile()``, so the state dict
  and checkpoints keep their keys), with an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR``): the
  first trial of a shape in a sweep;
* ``compile, warm cache``: again, with the cache the cold run filled (inductor's FX graph cache and
  AOTAutograd's cache are on by default): every later trial of that shape, if the sweep shares the
  cache directory between its trials.

Each prints the whole loop's time (building included: compilation happens in the first steps),
the first epoch's and the last epoch's training time (with ``--epochs 2`` or more the last is
steady state: no compilation left) and the final training loss; the table gives each mode's total
over eager's and the loss difference (numerics: compiled must match eager within float tolerance).
Timings are noisy on a shared machine: compare the ratios of one run.

Measured (2026-12-02, this 2-core machine shared with other jobs, default preset, softmax, one
thread, 1 epoch = 188 steps + evaluation of 2,000 questions): eager 33.6 s; compiled with a cold
cache 739 s (22x); with a warm cache 97.4 s (2.9x). Final losses equal to 1.8e-6. Compilation does
not pay at this size, so the sweep does not compile (docs/cluster.md, "Trial start-up and efficiency").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("eager", "compile_cold", "compile_warm")


def child(args: argparse.Namespace) -> None:
    """One mode of one cell in this process; prints one JSON line."""
    t0 = time.perf_counter()
    import torch

    from sweeps.ablation import build_plan
    from sweeps.loop import TrialLoop, prepared_config

    torch.set_num_threads(args.threads)
    ns = argparse.Namespace(preset=args.preset, grid=None, cells=args.cell, seeds="0",
                            overrides=[f"data.cache_dir={args.cache_dir}", f"train.epochs={args.epochs}",
                                       *args.overrides])
    cfg = build_plan(ns).trials[0].config
    loop = TrialLoop(prepared_config(cfg), log=lambda _m: None)
    stage = loop.final
    if args.mode != "eager":
        stage.model.compile()  # in place: same module, same state-dict keys
    t_built = time.perf_counter()
    epochs = []
    for _ in range(cfg.train.epochs):
        metrics, _ = stage.train_epoch()
        t_eval = time.perf_counter()
        result = stage.evaluate()
        stage.epoch += 1
        epochs.append({"train_s": metrics["train/epoch_s"], "eval_s": time.perf_counter() - t_eval,
                       "loss": metrics["train/loss"], "acc": result.metrics["acc"]})
    dynamo = {}
    if args.mode != "eager":  # how much Dynamo traced: graphs, graph breaks, recompilations
        from torch._dynamo.utils import counters

        dynamo = {"unique_graphs": counters["stats"]["unique_graphs"],
                  "graph_breaks": sum(counters["graph_break"].values()),
                  "frames_compiled": counters["frames"]["ok"]}
    print(json.dumps({"mode": args.mode, "cell": args.cell, "total_s": time.perf_counter() - t0,
                      "build_s": t_built - t0, "steps": stage.step, "epochs": epochs, "dynamo": dynamo}),
          flush=True)


def run_mode(args: argparse.Namespace, cell: str, mode: str, inductor_cache: Path) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(inductor_cache), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "benchmarks.torch_compile", "--child", "--mode", mode, "--cell", cell,
           "--preset", args.preset, "--epochs", str(args.epochs), "--threads", str(args.threads),
           "--cache-dir", args.cache_dir, *args.overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600,
                          cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"{cell} {mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.torch_compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--cells", default="softmax", help="comma-separated grid cells (default: %(default)s)")
    parser.add_argument("--preset", default="default", help="preset (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per run (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, as a 1-CPU trial (default: 1)")
    parser.add_argument("--cache-dir", default=str(Path("~/ablation-runs/cache").expanduser()),
                        help="prepared-data cache (default: %(default)s)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="modes to run, in this order (default: %(default)s; eager is the reference)")
    parser.add_argument("--inductor-cache", default="",
                        help="inductor cache directory to use and keep (default: a fresh temporary one per cell)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, default="eager", help=argparse.SUPPRESS)
    parser.add_argument("--cell", default="softmax", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "eager" not in modes or any(m not in MODES for m in modes):
        parser.error(f"--modes: some of {', '.join(MODES)}, eager included; got {args.modes!r}")
    rows = []
    for cell in [c.strip() for c in args.cells.split(",") if c.strip()]:
        with tempfile.TemporaryDirectory(prefix="inductor-cache-") as tmp:
            cache = Path(args.inductor_cache).expanduser() if args.inductor_cache else Path(tmp)
            runs = {}
            for mode in modes:
                runs[mode] = run_mode(args, cell, mode, cache)
                print(json.dumps(runs[mode]), flush=True)
        eager = runs["eager"]
        for mode, r in runs.items():
            rows.append((cell, mode, r["total_s"], r["total_s"] / eager["total_s"], r["epochs"][0]["train_s"],
                         r["epochs"][-1]["train_s"], r["epochs"][-1]["train_s"] / eager["epochs"][-1]["train_s"],
                         r["epochs"][-1]["loss"], r["epochs"][-1]["loss"] - eager["epochs"][-1]["loss"]))
    print(f"\n{'cell':<16}{'mode':<14}{'total s':>9}{'/eager':>8}{'ep1 train s':>13}{'last train s':>14}"
          f"{'/eager':>8}{'loss':>10}{'- eager':>11}")
    for cell, mode, total, rel, first, last, last_rel, loss, dloss in rows:
        print(f"{cell:<16}{mode:<14}{total:>9.1f}{rel:>8.3f}{first:>13.1f}{last:>14.1f}{last_rel:>8.3f}"
              f"{loss:>10.5f}{dloss:>11.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
