"""Reports: the paper's VQA tables and figures, rebuilt from what a sweep logged to MLflow.

Reads MLflow only (the layout is ``docs/tracking.md``) and never imports ``sweeps``, ``models`` or
``tasks``, so a sweep run months ago or on another cluster reproduces the same report. Usage and
definitions: ``docs/reports.md``.

    import reports
    html = reports.build("sqlite:////home/me/ablation-runs/mlflow.db", sweep="default-paper")

or ``python -m reports --sweep default-paper``.
"""

from reports.build import build, default_out_dir
from reports.store import DEFAULT_EXPERIMENT, ReportError, default_tracking_uri

__all__ = ["DEFAULT_EXPERIMENT", "ReportError", "build", "default_out_dir", "default_tracking_uri"]
