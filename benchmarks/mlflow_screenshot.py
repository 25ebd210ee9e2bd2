"""A PNG of the MLflow comparison view: the eval runs of one experiment, one row per cell, with columns
tags.method, tags.task, each task's headline metric and its 95% interval bounds (issue 14, item 3).

The MLflow UI keeps its column choice in the browser, not the URL; a shared view state (experiment tag
`mlflow.sharedViewState.<key>`, opened with `?viewStateShareKey=<key>`) is the one way to hand it the
columns, so this script writes that tag (it adds nothing else), starts `mlflow ui --workers 1` on the
tracking store, and screenshots the page with headless Chromium with every network name unresolvable.

    python benchmarks/mlflow_screenshot.py --tracking-uri sqlite:///mlflow.db --out docs/mlflow_compare.png
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

SHARE_KEY = "t2-compare"
EVAL_FILTER = "tags.stage = 'eval'"


def column(kind: str, key: str) -> str:
    """The UI's column id: ``tags.`method```, ``metrics.`acc_norm```."""
    return f"{kind}.`{key}`"


def compare_view(client, experiment_id: str) -> dict:
    """The view state: eval runs only, ordered by task, columns method, task, headline metric and its interval."""
    runs = client.search_runs([experiment_id], EVAL_FILTER, max_results=1000)
    if not runs:
        raise SystemExit(f"no eval runs (filter {EVAL_FILTER!r}) in experiment {experiment_id}")
    metrics = sorted({r.data.tags["metric"] for r in runs if "metric" in r.data.tags})
    columns = [column("tags", "method"), column("tags", "task")]
    for name in metrics:
        columns += [column("metrics", name), column("metrics", f"{name}_ci95_low"),
                    column("metrics", f"{name}_ci95_high")]
    columns += [column("metrics", "n"), column("metrics", "delta_vs_base"), column("metrics", "p_value")]
    return {"searchFilter": EVAL_FILTER, "orderByKey": column("tags", "task"), "orderByAsc": True,
            "lifecycleFilter": "Active", "selectedColumns": columns, "runListHidden": False,
            "viewMaximized": True}


def wait_for(url: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"mlflow ui did not answer {url} within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    ap.add_argument("--experiment", help="experiment name (default: the one with the most eval runs)")
    ap.add_argument("--out", default="docs/mlflow_compare.png")
    ap.add_argument("--port", type=int, default=5055)
    ap.add_argument("--window", default="1800,900", help="browser window WIDTH,HEIGHT in pixels")
    ap.add_argument("--wait", type=float, default=240.0, help="seconds to wait for the UI to start")
    ap.add_argument("--render-ms", type=int, default=20000, help="virtual time the page gets to render")
    args = ap.parse_args(argv)
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        raise SystemExit("no headless Chromium (Debian package `chromium`)")

    from mlflow import MlflowClient

    client = MlflowClient(args.tracking_uri)
    if args.experiment:
        experiment = client.get_experiment_by_name(args.experiment)
        if experiment is None:
            raise SystemExit(f"no experiment {args.experiment!r} in {args.tracking_uri}")
    else:
        counts = {e.experiment_id: len(client.search_runs([e.experiment_id], EVAL_FILTER, max_results=1000))
                  for e in client.search_experiments()}
        experiment = client.get_experiment(max(counts, key=counts.get))
    view = compare_view(client, experiment.experiment_id)
    client.set_experiment_tag(experiment.experiment_id, f"mlflow.sharedViewState.{SHARE_KEY}", json.dumps(view))

    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--workers", "1", "--host", "127.0.0.1",
                               "--port", str(args.port), "--backend-store-uri", args.tracking_uri],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{args.port}"
    try:
        wait_for(base + "/health", args.wait)
        url = f"{base}/#/experiments/{experiment.experiment_id}/runs?viewStateShareKey={SHARE_KEY}"
        out = Path(args.out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            res = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                                  f"--user-data-dir={profile}", f"--window-size={args.window}",
                                  f"--virtual-time-budget={args.render_ms}", f"--screenshot={out}", url],
                                 capture_output=True, text=True, timeout=300)
        if res.returncode != 0 or not out.is_file():
            raise SystemExit(f"chromium failed: {res.stderr[-2000:]}")
        print(f"{out} ({out.stat().st_size // 1024} KB): {url}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the UI's own process group: its job runner and consumers too
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
