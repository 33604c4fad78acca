"""Screenshot the MLflow UI comparing one sweep's cells (the picture in docs/tracking.md).

Copies the store's ``mlflow.db`` to a temporary folder (``mlflow ui`` may migrate a schema, and the
store must stay as the sweep left it), serves the copy with ``mlflow ui`` on a free local port,
then drives a headless Chromium through the steps docs/tracking.md gives a researcher: open the
experiment's runs table, filter to the sweep's trial runs, **Group by** the param ``cell``
(metrics averaged over the seeds), show the columns ``best/acc`` and ``eval/acc``, collapse the
groups, and save the table as a PNG. The server is stopped (its whole process group) even when a
step fails; a failing step also leaves ``<out>.failed.png`` showing where the UI was.

Needs, besides the project's environment (for the ``mlflow`` command):

* the ``playwright`` Python package in the interpreter that runs this script. Keep it out of the
  project's environment: ``python3 -m venv /tmp/pw-venv && /tmp/pw-venv/bin/pip install playwright
  pillow``, then run this module with ``/tmp/pw-venv/bin/python`` from the repository root and pass
  ``--mlflow .venv/bin/mlflow``;
* a Chromium: Debian's ``chromium`` package (``/usr/bin/chromium``, found on ``PATH``) or any
  Chrome given with ``--chromium``; ``--chromium ''`` uses Playwright's own browser
  (``python -m playwright install chromium``).
* Pillow (optional) to shrink a PNG larger than ``--max-kb``.

Example (the picture committed under docs/img/)::

    /tmp/pw-venv/bin/python -m benchmarks.ui_screenshot --mlflow .venv/bin/mlflow \\
        --store ~/ablation-runs/mlflow.db --sweep default-paper --out docs/img/mlflow-compare-cells.png
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import schema

DEFAULT_EXPERIMENT = "adaptive-ablation"  # sweeps.tracking.DEFAULT_EXPERIMENT (not imported: needs mlflow)
COLUMNS = (schema.BEST_ACC, schema.EVAL_ACC)
# Columns MLflow shows by default that say nothing about a cell; unticked to leave room for metrics.
HIDDEN_ATTRIBUTES = ("Dataset", "Source", "Models")
PLAYWRIGHT_HELP = (
    "this tool needs the 'playwright' Python package in the interpreter that runs it ({exe}); keep it "
    "out of the project's venv: python3 -m venv /tmp/pw-venv && /tmp/pw-venv/bin/pip install playwright "
    "pillow, then run /tmp/pw-venv/bin/python -m benchmarks.ui_screenshot --mlflow .venv/bin/mlflow ..."
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_mlflow() -> str | None:
    beside = Path(sys.executable).with_name("mlflow")
    return str(beside) if beside.exists() else shutil.which("mlflow")


def _default_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def _check_store(store: Path, experiment: str, sweep: str) -> int:
    """Count the sweep's trial runs in ``store`` (read-only), with a clear error when there are none.

    Returns:
        The number of trial runs of ``sweep`` in ``experiment``.
    """
    if not store.is_file():
        raise SystemExit(f"{store}: no such MLflow SQLite store")
    con = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT experiment_id FROM experiments WHERE name = ?", (experiment,)).fetchone()
        if row is None:
            raise SystemExit(f"{store}: no experiment named {experiment!r} (--experiment)")
        n = con.execute(
            "SELECT COUNT(*) FROM runs r JOIN tags a ON a.run_uuid = r.run_uuid AND a.key = ? AND a.value = ?"
            " JOIN tags b ON b.run_uuid = r.run_uuid AND b.key = ? AND b.value = ?"
            " WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active'",
            (schema.SWEEP_ID, sweep, schema.SWEEP_ROLE, schema.ROLE_TRIAL, row[0]),
        ).fetchone()[0]
    finally:
        con.close()
    if n == 0:
        raise SystemExit(f"{store}: experiment {experiment!r} has no trial run of sweep {sweep!r} (--sweep)")
    return n


def _start_server(mlflow: str, db: Path, port: int, log: Path) -> subprocess.Popen:
    # Its own session, so that stopping it also stops uvicorn and the job runner it spawns.
    cmd = [mlflow, "ui", "--backend-store-uri", f"sqlite:///{db}", "--default-artifact-root",
           str(db.parent / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    return subprocess.Popen(cmd, cwd=db.parent, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_healthy(proc: subprocess.Popen, base: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow ui exited with {proc.returncode}; its log:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(base + "health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise SystemExit(f"mlflow ui did not answer {base}health within {timeout:.0f} s; log: {log}")


def _experiment_id(base: str, experiment: str) -> str:
    query = urllib.parse.urlencode({"experiment_name": experiment})
    with urllib.request.urlopen(f"{base}api/2.0/mlflow/experiments/get-by-name?{query}", timeout=30) as r:
        return json.load(r)["experiment"]["experiment_id"]


def _tick_column(page, name: str, on: bool) -> None:
    """In the open Columns menu (a tree of checkboxes), search ``name`` and set its checkbox to ``on``."""
    search = page.get_by_placeholder("Search columns")
    search.fill(name)
    # A search highlights the match inside every column name containing it: pick the tree node whose
    # whole text is the name.
    title = page.locator("[class*=tree-treenode]").filter(has_text=re.compile(f"^{re.escape(name)}$")).first
    title.wait_for(timeout=10_000)
    # The row's checkbox is the first one in the title's nearest ancestor that holds a checkbox.
    box = title.evaluate_handle(
        """el => { let n = el;
                   while (n && !n.querySelector('[class*="checkbox"]')) n = n.parentElement;
                   return n.querySelector('[class*="checkbox"]'); }"""
    ).as_element()
    checked = box.evaluate("b => /checkbox-checked/.test(b.className) || !!b.querySelector('input:checked')")
    if checked != on:
        box.click()
    search.fill("")


def _drive(page, base: str, experiment_id: str, sweep: str, steps: list[str]) -> None:
    """Run the docs' steps in the UI; ``steps`` collects what was done, in words, for the log."""
    # A browser that never chose opens an experiment as GenAI (MLflow 3.17 keeps the GenAI / Model
    # training switch per browser); the URL parameter is what the switch itself sets.
    page.goto(f"{base}#/experiments/{experiment_id}?workflowType=machine_learning", wait_until="load")
    page.get_by_text("matching runs").wait_for(timeout=60_000)
    steps.append(f"opened {page.url}")
    close = page.locator("button[aria-label=Close]")  # MLflow Assistant's side panel, open on first visit
    if close.count() and close.first.is_visible():
        close.first.click()
        steps.append("closed the MLflow Assistant panel")

    search = page.get_by_placeholder('metrics.rmse < 1 and params.model = "tree"')
    query = f"tags.`{schema.SWEEP_ID}` = '{sweep}' and tags.`{schema.SWEEP_ROLE}` = '{schema.ROLE_TRIAL}'"
    search.fill(query)
    search.press("Enter")
    page.wait_for_timeout(3000)
    steps.append(f"search box: {query}")

    page.locator("button", has_text="Group by").first.click()
    page.get_by_placeholder("Search").last.fill(schema.PARAM_CELL)
    menu = page.get_by_role("menuitemcheckbox", name=schema.PARAM_CELL, exact=True)
    menu.wait_for(timeout=10_000)
    menu.last.click()  # the Params section comes after the Tags section (tags such as trial.cell)
    page.keyboard.press("Escape")
    page.wait_for_timeout(1500)
    steps.append(f"Group by -> Params -> {schema.PARAM_CELL}")

    page.locator("button", has_text="Columns").first.click()
    for name in COLUMNS:
        _tick_column(page, name, True)
        steps.append(f"Columns -> Metrics -> {name}")
    for name in HIDDEN_ATTRIBUTES:
        _tick_column(page, name, False)
    steps.append("Columns -> Attributes: unticked " + ", ".join(HIDDEN_ATTRIBUTES))
    page.keyboard.press("Escape")
    page.wait_for_timeout(1500)
    # Aggregation: the gear beside the Group-by search; log the choices and the one in force.
    page.locator("button", has_text="Group by").first.click()
    page.get_by_role("button", name="Change aggregation function").click()
    page.wait_for_timeout(800)
    options = page.locator("[role=menuitemradio], [role=menuitemcheckbox]").filter(
        has_text=re.compile(r"^(Average|Minimum|Maximum)$"))
    steps.append("aggregation (gear 'Change aggregation function'): " + ", ".join(
        options.nth(i).inner_text().strip() + (" (in force)" if options.nth(i).get_attribute("aria-checked") == "true"
                                               else "") for i in range(options.count())))
    page.keyboard.press("Escape")
    page.keyboard.press("Escape")
    page.wait_for_timeout(800)

    # Collapse every group to its one aggregated row (they open expanded); top first, so the next
    # group is always on screen in the virtualised grid.
    groups = page.locator(".ag-cell-value").filter(has=page.get_by_text(re.compile(r"^Group: ")))
    i = 0
    while i < groups.count():
        groups.nth(i).locator("span[role=button]").first.click()
        page.wait_for_timeout(300)
        i += 1
    if i == 0:
        raise RuntimeError(f"Group by {schema.PARAM_CELL!r} made no group: do the trial runs carry the param?")
    steps.append(f"collapsed the {i} groups (one row per cell)")
    # Widen the name and metric columns to show the cells' names and averages whole (ag-grid:
    # double-click a header's right edge).
    for name in ("Run Name", *COLUMNS):
        page.locator(f'.ag-header-cell[col-id*="{name}"] .ag-header-cell-resize').dblclick()
    page.wait_for_timeout(800)


def _table_clip(page, width: int, height: int) -> dict[str, float]:
    """The screenshot's clip: the whole width, from the top down to the table's last row (plus a margin)."""
    rows = page.locator(".ag-center-cols-container .ag-row")
    bottom = max(box["y"] + box["height"] for i in range(rows.count()) if (box := rows.nth(i).bounding_box()))
    return {"x": 0, "y": 0, "width": width, "height": min(height, bottom + 24)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ui_screenshot", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--store", type=Path, required=True, help="the sweep's mlflow.db (read, never written)")
    parser.add_argument("--sweep", required=True, help="the sweep.id whose trial runs to compare")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write, e.g. docs/img/mlflow-compare-cells.png")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="experiment name (default: %(default)s)")
    parser.add_argument("--mlflow", default=_default_mlflow(), help="the mlflow command (default: %(default)s)")
    parser.add_argument("--chromium", default=_default_chromium(),
                        help="Chromium / Chrome executable; '' for Playwright's own (default: %(default)s)")
    parser.add_argument("--size", default="1400x900", help="browser viewport WxH (default: %(default)s)")
    parser.add_argument("--max-kb", type=int, default=300, help="shrink the PNG (Pillow) above this size")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for the server to answer")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise SystemExit(PLAYWRIGHT_HELP.format(exe=sys.executable)) from None
    if not args.mlflow or not Path(args.mlflow).exists() and not shutil.which(args.mlflow):
        raise SystemExit(f"no mlflow command {args.mlflow!r}: pass --mlflow .venv/bin/mlflow (the project's venv)")
    if args.chromium and not Path(args.chromium).exists():
        raise SystemExit(f"--chromium {args.chromium}: no such file (Debian: apt-get install chromium)")
    n_trials = _check_store(args.store, args.experiment, args.sweep)
    print(f"{args.store}: sweep {args.sweep!r} has {n_trials} trial runs")

    with tempfile.TemporaryDirectory(prefix="ui-screenshot-") as tmp:
        db = Path(tmp) / "mlflow.db"
        shutil.copy2(args.store, db)
        port, log = _free_port(), Path(tmp) / "server.log"
        base = f"http://127.0.0.1:{port}/"
        proc = _start_server(args.mlflow, db, port, log)
        print(f"mlflow ui (pid {proc.pid}) on {base}, serving a copy of the store")
        steps: list[str] = []
        try:
            _wait_healthy(proc, base, log, args.timeout)
            experiment_id = _experiment_id(base, args.experiment)
            with sync_playwright() as pw:
                launch = {"executable_path": args.chromium} if args.chromium else {}
                browser = pw.chromium.launch(args=["--no-sandbox"], **launch)
                page = browser.new_page(viewport={"width": width, "height": height})
                try:
                    _drive(page, base, experiment_id, args.sweep, steps)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(args.out), clip=_table_clip(page, width, height))
                except Exception:
                    page.screenshot(path=str(args.out.with_suffix(".failed.png")))
                    print(f"failed after: {steps}; the page as it was: {args.out.with_suffix('.failed.png')}")
                    raise
                finally:
                    browser.close()
        finally:
            _stop_server(proc)
            print(f"mlflow ui (pid {proc.pid}) stopped")
    for step in steps:
        print(" -", step)
    _shrink(args.out, args.max_kb)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")
    return 0


def _shrink(path: Path, max_kb: int) -> None:
    """Quantise ``path`` to a 256-colour palette when it is larger than ``max_kb`` (needs Pillow)."""
    if path.stat().st_size <= max_kb * 1024:
        return
    try:
        from PIL import Image
    except ImportError:
        print(f"warning: {path} is over {max_kb} KB and Pillow is not installed to shrink it")
        return
    with Image.open(path) as im:
        im.convert("RGB").quantize(colors=256).save(path, optimize=True)


if __name__ == "__main__":
    sys.exit(main())
