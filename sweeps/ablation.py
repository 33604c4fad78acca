"""Run the paper's ablation grid (or any grid) with Ray Tune + Ray Train, tracked in MLflow.

    python sweeps/ablation.py                         # default preset: local Ray, local MLflow, easy-VQA
    python sweeps/ablation.py --preset smoke          # CI-sized
    python sweeps/ablation.py --preset paper data.root=/data/vqa train.init_checkpoint=/data/model_LXRT.pth
    ray job submit --working-dir . -- python sweeps/ablation.py --preset smoke
    python sweeps/ablation.py --dry-run               # print the trials and exit

With no cluster it starts a local Ray; with ``RAY_ADDRESS`` set, or inside ``ray job submit``,
it uses that cluster. Rerunning the same command resumes an interrupted sweep: finished trials
are kept, unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import secrets
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python sweeps/ablation.py` puts sweeps/, not the root, on the path
    sys.path.insert(0, str(ROOT))

import schema  # noqa: E402
from sweeps.config import ConfigError, flatten, parse_cli_overrides  # noqa: E402
from sweeps.grid import Plan, expand, load_grid, load_preset  # noqa: E402

DEFAULT_RUNS_DIR = "~/ablation-runs"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sweeps/ablation.py",
        description=(
            "Run an ablation grid of attention variants x seeds with Ray Tune + Ray Train, "
            "logging every trial to MLflow, then build the report."
        ),
        epilog=(
            "Overrides: any config key as key=value, e.g. train.lr=3e-4 model.hidden_size=128 "
            "data.train_limit=2000 (see --list-keys). They apply to every trial, after the preset "
            "and the grid. Environment: RAY_ADDRESS (use that cluster), MLFLOW_TRACKING_URI "
            "(use that tracking server instead of the local SQLite store), ABLATION_RUNS_DIR."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every trial")
    parser.add_argument("--preset", default="default",
                        help="smoke | default | paper, or a preset YAML path (default: %(default)s)")
    parser.add_argument("--grid", default=None,
                        help="grid name in sweeps/grids/ or a YAML path (default: the preset's grid)")
    parser.add_argument("--cells", default="", help="comma-separated cells to run (default: all)")
    parser.add_argument("--seeds", default="", help="comma-separated seeds, replacing the grid's seed axis")
    parser.add_argument("--name", default="", help="sweep name (default: <preset>-<grid>); same name = resume")
    parser.add_argument("--runs-dir", default=os.environ.get("ABLATION_RUNS_DIR", DEFAULT_RUNS_DIR),
                        help="where MLflow's local store, checkpoints, caches and reports go "
                        "(default: $ABLATION_RUNS_DIR or %(default)s; on a multi-node cluster: shared storage)")
    parser.add_argument("--experiment", default="", help="MLflow experiment name (default: adaptive-ablation)")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="trials at once (default: resources.max_concurrent, else what the cluster fits)")
    parser.add_argument("--search", choices=("none", "optuna"), default="none",
                        help="optuna: per cell, --trials Optuna trials over lr / warmup before the grid")
    parser.add_argument("--trials", type=int, default=8,
                        help="Optuna trials per cell (with --search optuna; default %(default)s)")
    parser.add_argument("--fresh", action="store_true", help="discard a previous sweep of the same name")
    parser.add_argument("--dry-run", action="store_true", help="validate, print the trials and exit")
    parser.add_argument("--no-report", action="store_true", help="skip building the report at the end")
    parser.add_argument("--list-keys", action="store_true", help="print every config key with its default")
    parser.add_argument("--verbose", action="store_true",
                        help="stream every worker's log to this terminal (default: one line per epoch and trial)")
    return parser.parse_args(argv)


def build_plan(args: argparse.Namespace) -> Plan:
    preset = load_preset(args.preset)
    grid = load_grid(args.grid or preset.grid)
    axis_replace = {}
    if args.seeds:
        try:
            axis_replace["train.seed"] = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--seeds: expected comma-separated integers, got '{args.seeds}'") from None
    cells = [c.strip() for c in args.cells.split(",") if c.strip()] or None
    return expand(grid, preset, parse_cli_overrides(args.overrides), axis_replace, cells)


def sweep_name(args: argparse.Namespace, plan: Plan) -> str:
    name = args.name or f"{plan.preset.name}-{plan.grid.name}"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"--name: use letters, digits, '.', '_' and '-' only; got '{name}'")
    return name


def print_plan(plan: Plan, name: str) -> None:
    print(f"sweep '{name}': grid {plan.grid.path.name} ({plan.grid.name}), preset {plan.preset.name}, "
          f"{len(plan.trials)} trial(s)")
    for trial in plan.trials:
        c = trial.config
        ld = c.model.layerdrop
        layerdrop = f" layerdrop={ld.mode}" + (f"(n={ld.n_drop})" if ld.mode == "fixed" else
                                              f"(p={ld.p})" if ld.mode == "prob" else "")
        pt = c.pretrain
        pretrain = (f" pretrain={pt.weighting}({pt.epochs} ep, {pt.corpus}, {','.join(pt.tasks)})" if pt.enabled else "")
        if pt.enabled and c.retrieval.enabled:
            pretrain += f" retrieval={c.retrieval.scoring}({c.retrieval.source})"
        if c.model.flow != "modality_specific":
            pretrain = f" flow={c.model.flow}{pretrain}"
        print(f"  {trial.key:<24} attention={c.model.attention.name} layers={c.model.l_layers}-"
              f"{c.model.x_layers}-{c.model.r_layers} hidden={c.model.hidden_size}{layerdrop if ld.mode != 'none' else ''} "
              f"data={c.data.name} epochs={c.train.epochs} seed={c.train.seed}{pretrain}")
    for cell, reason in plan.pending.items():
        print(f"  {cell:<24} NOT RUN: {reason}")


def prepare_data(plan: Plan, runs_dir: Path) -> Plan:
    """Point empty cache dirs at the runs dir, do every stage's one-time task work once per distinct
    config (driver side: data caches, the pretraining corpus), and set each trial's ``model.*``
    fields its data fixes (answer count, feature size: ``TaskAdapter.prepare``).

    Raises before any trial starts when a data file is missing (the error names it)."""
    import dataclasses

    from tasks.base import get_task, with_model_fields

    done: dict[str, dict] = {}
    for trial in plan.trials:
        cfg = trial.config
        if not cfg.data.cache_dir:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_dir=str(runs_dir / "cache")))
        stages = cfg.stages()
        for index, (_, task) in enumerate(reversed(stages)):  # the last stage's data first: the others may read it
            adapter = get_task(task)
            key = adapter.cache_key(cfg)
            if key not in done:
                done[key], line = adapter.prepare(cfg)
                print(line, flush=True)
            if index == 0:
                cfg = with_model_fields(cfg, done[key])  # the model is the last stage's
        trial.config = cfg
        trial.config.validate()
    return plan


#: How the local Ray a sweep starts for itself (no RAY_ADDRESS, not inside `ray job submit`) listens.
RAY_LISTEN_ENV = "ABLATION_RAY_LISTEN"
#: "loopback" (default): every Ray server of the node (GCS, raylet, object manager, workers, agents,
#: the metrics endpoint) on 127.0.0.1 only. "all": Ray's own default, the host's address, with the
#: gRPC servers on all interfaces (only needed to let another machine join or reach this Ray).
RAY_LISTEN_CHOICES = ("loopback", "all")


def ray_listen_setting() -> str:
    """The validated ``ABLATION_RAY_LISTEN`` value (``loopback`` when unset).

    Raises:
        ConfigError: naming the variable and the value when it is neither ``loopback`` nor ``all``.
    """
    value = os.environ.get(RAY_LISTEN_ENV, "").strip().lower() or "loopback"
    if value not in RAY_LISTEN_CHOICES:
        raise ConfigError(f"{RAY_LISTEN_ENV}={os.environ[RAY_LISTEN_ENV]!r}: expected one of "
                          f"{', '.join(RAY_LISTEN_CHOICES)} (where a local Ray listens)")
    return value


def _private_auth_token() -> Path | None:
    """Make sure the token file a new local Ray authenticates with is readable by this user only.

    Ray 2.60 turns token authentication on for a local ``ray.init()`` and writes a missing
    ``~/.ray/auth_token`` with the process umask (0644 by default: any local user could read it and
    then talk to every Ray server). The token is created here first, mode 0600, the way Ray
    generates it (256 random bits, hex); an existing one that others can read is set to 0600.
    Nothing is done when the token comes from ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_MODE`` is not
    ``token`` (the user's explicit choice). Returns the token file, or None.
    """
    if os.environ.get("RAY_AUTH_MODE", "token").strip().lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named or Path.home() / ".ray" / "auth_token").expanduser()
    if not named:  # a named file that is missing is Ray's error to report ("fatal misconfiguration")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            return path
    if path.is_file() and path.stat().st_mode & 0o077:
        mode = path.stat().st_mode & 0o777
        try:
            path.chmod(0o600)
            print(f"note: the Ray token {path} was readable by other users (mode {mode:o}); set it to 600",
                  file=sys.stderr, flush=True)
        except OSError as err:
            print(f"warning: the Ray token {path} is readable by other users (mode {mode:o}) and could "
                  f"not be restricted: {err}", file=sys.stderr, flush=True)
    return path


def _local_ray_on_loopback() -> str:
    """Make the local Ray about to start take the loopback address (127.0.0.1) as its node address,
    so that every server it starts binds the loopback interface. Returns that address.

    On Linux Ray replaces a loopback ``_node_ip_address`` with the host's routable address, and
    its gRPC servers then listen on all interfaces. Ray's single-machine mode (its default on macOS
    and Windows, switched by ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) keeps 127.0.0.1, and Ray's
    servers bind 127.0.0.1 whenever the node address is loopback. The variable is read when Ray is
    imported, which the driver already did (sweeps.tune), so the module's copy is set too; the
    environment carries it to every process of the node.

    Raises:
        RuntimeError: if this Ray version still resolves a routable address (nothing started yet).
    """
    import ray
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    address = ray.util.get_node_ip_address()
    if not ipaddress.ip_address(address).is_loopback:
        raise RuntimeError(
            f"Ray {ray.__version__} would listen on {address}, not 127.0.0.1, despite single-machine "
            f"mode; set {RAY_LISTEN_ENV}=all to run on all interfaces anyway (then firewall Ray's ports)"
        )
    return address


def connect_ray(verbose: bool = False) -> str:
    """Connect to RAY_ADDRESS / the job's cluster, or start a local one. Returns a description.

    A local Ray (no cluster given) listens on 127.0.0.1 only and requires its token (mode 0600),
    unless ``ABLATION_RAY_LISTEN=all`` asks for Ray's default of all interfaces.
    """
    import ray

    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    runtime_env: dict = {}
    if not in_job:
        # Ship this checkout to every worker (git-ignored paths such as .venv/ and runs/ stay home).
        runtime_env["working_dir"] = str(ROOT)
        runtime_env["excludes"] = ["runs/", ".venv/", ".git/", "*.pt", "*.db", "docs/"]
    address = os.environ.get("RAY_ADDRESS") or None
    if in_job or address:
        ray.init(address=address or "auto", runtime_env=runtime_env or None, log_to_driver=verbose)
        where = f"Ray cluster at {ray.get_runtime_context().gcs_address}"
    else:
        try:
            listen = ray_listen_setting()
            node_ip = _local_ray_on_loopback() if listen == "loopback" else None
        except (ConfigError, RuntimeError) as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        token = _private_auth_token()
        ray.init(runtime_env=runtime_env, include_dashboard=False, log_to_driver=verbose,
                 _node_ip_address=node_ip)
        where = ("a local Ray instance listening on "
                 + (f"{node_ip} only" if node_ip else f"all interfaces ({ray.util.get_node_ip_address()})")
                 + (f", token in {token}" if token else ""))
    res = ray.cluster_resources()
    return f"{where} ({res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU)"


#: Bad input: reported as one ``error:`` line (``--verbose`` adds the traceback), exit code 2.
def _bad_input() -> tuple[type[BaseException], ...]:
    from models.checkpoint import CheckpointError
    from sweeps.tracking import TrackingError

    return (ConfigError, FileNotFoundError, TrackingError, CheckpointError, ValueError)


def _error(err: BaseException, verbose: bool) -> int:
    if verbose:
        import traceback

        traceback.print_exception(err)
    print(f"error: {err}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_keys:
        from sweeps.config import ExperimentConfig

        for key, value in flatten(ExperimentConfig()).items():
            print(f"{key}={value}")
        return 0
    t_start = time.time()
    try:
        plan = build_plan(args)
        name = sweep_name(args, plan)
    except ConfigError as err:
        return _error(err, args.verbose)
    print_plan(plan, name)
    if args.dry_run:
        return 0

    from sweeps.lock import SweepLock, SweepLocked, holder_text

    runs_dir = Path(args.runs_dir).expanduser().resolve()
    lock = SweepLock(runs_dir, name)
    try:
        lock.acquire()
    except SweepLocked as err:
        return _error(err, args.verbose)
    # SIGTERM (a job scheduler, `kill`) ends the sweep like Ctrl-C: Tune stops the trials and saves
    # its state, the runs are closed, Ray's local processes are stopped and the lock is released.
    terminated: list[int] = []

    def on_sigterm(signum, frame) -> None:
        terminated.append(signum)
        signal.raise_signal(signal.SIGINT)

    def catch_sigterm() -> None:  # again after ray.init(), which installs its own (sys.exit)
        signal.signal(signal.SIGTERM, on_sigterm)

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if lock.stale:
            print(f"a previous driver of '{name}' ({holder_text(lock.stale)}) stopped without finishing; "
                  "resuming after it", flush=True)
        return _run(args, plan, name, runs_dir, lock, t_start, terminated, catch_sigterm)
    except KeyboardInterrupt:
        print(f"\nsweep '{name}' interrupted; rerun the same command to resume it", file=sys.stderr)
        return 130
    finally:
        _stop_ray()
        lock.release()
        signal.signal(signal.SIGTERM, previous_handler)


def _stop_ray() -> None:
    """Disconnect from Ray; a local instance this driver started stops with it (its raylet, GCS,
    dashboard agents and workers), so nothing outlives a sweep that ends or is interrupted."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _run(args: argparse.Namespace, plan: Plan, name: str, runs_dir: Path, lock, t_start: float,
         terminated: list[int], catch_sigterm) -> int:
    """The sweep, under its lock: pre-flight (no Ray yet), then the trials, then the report."""
    import json

    from sweeps import preflight, tracking
    from sweeps.config import apply_overrides
    from sweeps.tune import SweepOutcome, SweepPaths, check_manifest, run, search, write_manifest

    paths = SweepPaths(runs_dir=runs_dir, sweep_id=name)
    uri = tracking.default_tracking_uri(runs_dir)
    try:
        tracking.check_tracking(uri)
        sweeper = tracking.SweepTracker(uri, args.experiment or tracking.DEFAULT_EXPERIMENT, name, runs_dir)
        # Before anything else: runs a dead driver left RUNNING (no other driver holds the lock).
        why = "its driver stopped while it ran" + (f" ({lock.stale.get('host')}, PID {lock.stale.get('pid')})"
                                                   if lock.stale else "")
        closed = sweeper.close_orphans(why)
        if closed:
            print(f"closed {len(closed)} run(s) a previous driver left RUNNING as KILLED: {', '.join(closed)}",
                  flush=True)
        previous = check_manifest(paths, plan, args.fresh, search_settings(args))
        preflight.require(preflight.check_files(plan, runs_dir / "cache"))
        plan = prepare_data(plan, runs_dir)
        preflight.require(preflight.check_weights(plan))
    except _bad_input() as err:
        return _error(err, args.verbose)
    print(f"runs dir: {runs_dir}\nMLflow:   {uri}", flush=True)

    where = connect_ray(args.verbose)
    catch_sigterm()
    print(f"running on {where}", flush=True)

    if args.fresh:
        removed = sweeper.discard()
        _discard(paths)
        print(f"--fresh: deleted {removed} MLflow run(s) and the Ray state of the previous '{name}'", flush=True)
    code = tracking.code_version(ROOT)
    # The cells this sweep runs (and the grid's pending ones, which the report lists as not run);
    # grid cells that the preset or --cells leave out are not the report's business.
    in_plan = {t.cell.name for t in plan.trials} | set(plan.pending)
    cells = {
        c.name: {"label": c.label, "table": c.table, "paper": c.paper, "pending": c.pending}
        for c in plan.grid.cells.values() if c.name in in_plan
    }
    parent_tags = {
        schema.SWEEP_GRID: plan.grid.name,
        schema.SWEEP_PRESET: plan.preset.name,
        schema.SWEEP_FINGERPRINT: plan.fingerprint,
        schema.SWEEP_TRIALS: json.dumps([t.key for t in plan.trials]),
        schema.SWEEP_CELLS: json.dumps(cells),
        schema.SWEEP_PENDING: json.dumps(plan.pending),
        schema.SWEEP_STATUS: "running",
        schema.SWEEP_RUNS_DIR: str(runs_dir),
        **code,
    }
    parent = sweeper.start(parent_tags, {"preset": plan.preset.name, "grid": plan.grid.name,
                                         "n_trials": len(plan.trials)})
    write_manifest(paths, plan, {"parent_run_id": parent, "experiment_id": sweeper.experiment_id,
                                 "tracking_uri": uri, "search": search_settings(args)})
    context = {
        "tracking_uri": uri,
        "experiment_id": sweeper.experiment_id,
        "parent_run_id": parent,
        "sweep_id": name,
        "tags": {schema.SWEEP_GRID: plan.grid.name, schema.SWEEP_PRESET: plan.preset.name, "grid": plan.grid.name,
                 **code},
    }
    max_conc = args.max_concurrent if args.max_concurrent is not None else plan.trials[0].config.resources.max_concurrent
    restore = previous and not args.fresh
    search_outcome = None
    if args.search == "optuna":
        best, search_outcome = search(plan, paths, context, args.trials, max_concurrent=max_conc, restore=restore)
        for trial in plan.trials:
            trial.config = apply_overrides(trial.config, best[trial.cell.name], source="optuna search")
        sweeper.set_tags({schema.SWEEP_SEARCH: json.dumps({"method": "optuna", "trials_per_cell": args.trials,
                                                      "best": best}, sort_keys=True)})
    outcome = run(plan, paths, context, max_concurrent=max_conc, restore=restore)

    timing = outcome
    if search_outcome is not None:  # the overhead ratio covers both stages
        timing = SweepOutcome(trials=search_outcome.trials + outcome.trials,
                              wall_s=search_outcome.wall_s + outcome.wall_s, concurrency=outcome.concurrency)
    failed = outcome.failed
    interrupted = bool(terminated) or any(t.status == "UNFINISHED" for t in outcome.trials)
    status = "interrupted" if interrupted else "complete" if not failed else "incomplete"
    print(f"\nsweep '{name}' {status}: {len(outcome.trials) - len(failed)}/{len(outcome.trials)} trials finished"
          + (f", {len(plan.pending)} cell(s) not run: {', '.join(plan.pending)}" if plan.pending else ""))
    for t in failed:
        label = "UNFINISHED" if t.status == "UNFINISHED" else "FAILED"
        print(f"  {label} {t.key}: {t.error.splitlines()[0] if t.error else t.status}")
    total_wall = time.time() - t_start
    for line in timing_lines(timing, total_wall):
        print(line)
    if interrupted:  # trials Tune stopped may not have closed their runs: nothing of this sweep runs now
        sweeper.close_orphans("the sweep was interrupted (Ctrl-C / SIGTERM) while it ran")
    sweeper.finish(
        "KILLED" if interrupted else "FINISHED" if not failed else "FAILED",
        {"sweep/wall_s": total_wall, "sweep/trials_wall_s": timing.wall_s, "sweep/ideal_s": timing.ideal_s,
         "sweep/overhead_ratio": timing.overhead_ratio if timing.ideal_s > 0 else 0.0,
         "sweep/concurrency": float(timing.concurrency), **timing.timing_metrics()},
        {schema.SWEEP_STATUS: status,
         schema.SWEEP_FAILED: json.dumps({t.key: t.error[:500] for t in failed if t.status != "UNFINISHED"})},
    )
    if interrupted:
        print(f"sweep '{name}' interrupted; rerun the same command to resume it", file=sys.stderr)
        return 130
    if not args.no_report:
        report_path = build_report(uri, name, runs_dir, args.experiment or tracking.DEFAULT_EXPERIMENT)
        if report_path:
            print(f"report: {report_path}")
    print(browse_hint(uri, sweeper.experiment_id, name))
    return 0 if not failed else 1


def browse_hint(uri: str, experiment_id: str, sweep: str) -> str:
    """How to open the sweep's runs in the MLflow UI on its runs table (docs/tracking.md): the
    ``workflowType=machine_learning`` link, because the UI's GenAI / model-training switch is kept per
    browser, so a browser that never used it opens on the GenAI overview whatever the experiment says."""
    from sweeps import tracking

    server = uri if tracking.is_remote(uri) else "http://127.0.0.1:5000"
    start = "" if tracking.is_remote(uri) else f"mlflow ui --backend-store-uri {uri}, then "
    return (f"browse: {start}open {server.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning "
            f"(Group by the param `cell`, filter tags.`sweep.id` = '{sweep}')")


def timing_lines(timing, total_wall: float) -> list[str]:
    """The sweep's closing lines on time: where the trials' time went (their time accounts:
    start-up, training, evaluation, checkpoints, the rest), goodput and wall / ideal with ideal
    counting step time only; then the older overhead ratio, whose ideal counts each trial's whole
    time (start-up included) as useful."""
    lines = []
    n, slots = timing.n_ran, min(timing.concurrency, timing.n_ran)
    if timing.step_s > 0:
        parts = ", ".join(f"{name} {timing.time_sum(part):.0f} s" for name, part in (
            ("start-up", "startup_s"), ("train", "train_s"), ("eval", "eval_s"), ("checkpoint", "checkpoint_s"),
            ("other", "other_s")))  # fmt: skip
        lines.append(f"time in {n} trial(s): {parts} (sum of trial wall times {timing.time_sum('wall_s'):.0f} s)")
        lines.append(f"goodput {timing.goodput:.3f} (train + eval steps / trial wall times); wall / ideal "
                     f"{timing.wall_over_ideal:.3f} (trials phase {timing.wall_s:.0f} s / step time "
                     f"{timing.step_s:.0f} s over {slots} slot(s)), {total_wall / timing.step_ideal_s:.3f} "
                     "(whole command)")
    if timing.ideal_s > 0:
        lines.append(f"wall time {total_wall:.0f} s (trials phase {timing.wall_s:.0f} s); overhead ratio, start-up "
                     f"counted as trial time: {timing.overhead_ratio:.3f} (trials phase), "
                     f"{total_wall / timing.ideal_s:.3f} (whole command); its ideal {timing.ideal_s:.0f} s = "
                     f"sum of {n} trial times / {slots} at once")
    return lines


def search_settings(args: argparse.Namespace) -> dict:
    """Part of a sweep's identity: a rerun with another search setting is another sweep."""
    return {"method": args.search, "trials": args.trials if args.search != "none" else 0}


def build_report(uri: str, sweep_id: str, runs_dir: Path, experiment: str) -> str | None:
    try:
        import reports
    except ImportError:
        print("report: the reports package is not installed; skipped")
        return None
    try:
        return str(reports.build(tracking_uri=uri, sweep=sweep_id, experiment=experiment,
                                 out_dir=runs_dir / "reports" / sweep_id))
    except Exception as err:
        print(f"report: failed to build: {type(err).__name__}: {err}", file=sys.stderr)
        return None


def _discard(paths) -> None:
    """Remove a previous sweep's Tune experiments (grid and search) and its manifest."""
    import shutil

    for path in [paths.tune_dir, *paths.ray_dir.glob(f"{paths.sweep_id}-search-*")]:
        if path.exists():
            shutil.rmtree(path)
    if paths.manifest.exists():
        paths.manifest.unlink()


if __name__ == "__main__":
    sys.exit(main())
