"""The MLflow UI as the README tells a user to open it: a headless Chromium against `mlflow ui` on
loopback, on a small store written by ablate's Tracker. Skipped where no Chromium is installed
(Debian: `apt-get install chromium`); the experiment's tag itself is checked without a browser in
test_tracking.py."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.entities import Metric

from orchestrator.mlflow_store import Tracker

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,900",
                  "--virtual-time-budget=20000"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ui(tmp_path):
    """A store with one sweep (a parent run, two nested trial runs) and `mlflow ui` serving it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tr = Tracker(uri, "ablate-ui-check")
    parent = tr.sweep_run("ui-sweep", {"name": "ui-sweep"}, "name: ui-sweep\n")
    for i, lr in enumerate((0.01, 0.3)):
        run = tr.trial_run("ui-sweep", parent, f"t{i}", f"stabilizers=none lr={lr}", {"lr": lr}, replace=False)
        tr.log_metrics(run, [Metric("loss", 3.0 - s / 10, 0, s) for s in range(5)])
        tr.finish(run)
    tr.finish(parent)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("mlflow ui did not start")
                time.sleep(1)
        yield tr, base
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def _chromium(tmp_path, url: str, *what: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *what, url],
                          capture_output=True, text=True, timeout=180)


def test_the_readmes_experiment_url_opens_on_model_training(ui, tmp_path):
    tr, base = ui
    url = tr.experiment_url(base)
    # the MLflow package ships its UI (static files), so `mlflow ui` serves the page
    assert b"<html" in urllib.request.urlopen(f"{base}/", timeout=10).read().lower()
    dom = _chromium(tmp_path, url, "--dump-dom").stdout
    assert "ui-sweep" in dom, dom[-2000:]          # the sweep's parent run, its trials nested under it
    assert "matching runs" in dom                  # the runs table, the model-training view's page
    assert "Detect Issues" not in dom and "Evaluation runs" not in dom  # not the GenAI view
    png = tmp_path / "experiment.png"
    _chromium(tmp_path, url, f"--screenshot={png}")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    keep = os.environ.get("ABLATE_UI_SCREENSHOT")  # where to keep the picture for a person to look at
    if keep:
        shutil.copy(png, keep)
