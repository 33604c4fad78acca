"""The HTML page renders in headless Chromium and shows its tables and figures.

Skipped (with the reason) when no Chromium is installed; ``docs/reports.md`` gives the same
screenshot command for a manual check.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def _chromium() -> str | None:
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


@pytest.mark.slow
def test_html_renders_in_headless_chromium(built_report, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip(f"no Chromium found (looked for {', '.join(CANDIDATES)} and $CHROMIUM)")
    shot = tmp_path / "report.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1400,4000",
           f"--screenshot={shot}", built_report["html"].as_uri()]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]

    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert img.shape[:2] == (4000, 1400)
    ink = np.any(img < 200, axis=2).mean()  # text, table rules, plots
    assert ink > 0.01, f"the page looks blank ({ink:.4f} of pixels drawn)"
    n_figs = len(built_report["tables"]["figures"]["files"])
    if n_figs:
        # Saturated colour comes only from the plots (text, tables and their light header are grey
        # scale, saturation < 10): the embedded PNGs were decoded and drawn. Even flat curves of a
        # model that learned nothing leave thousands of such pixels.
        saturation = img.max(axis=2) - img.min(axis=2)
        coloured = int((saturation > 80).sum())
        assert coloured > 1000, f"no figure pixels on the page ({coloured} coloured pixels)"
