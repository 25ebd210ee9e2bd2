"""A served deployment's schedule really fires on a real local Prefect server (issue 14).

`t2 serve --cron ...` calls `pipeline_flow.serve(name=..., cron=..., parameters={"params_path": ...})`
against the server in PREFECT_API_URL. Here a tiny flow is served exactly that way (the pipeline
itself would run `dvc repro`), with a cron that fires every 10 seconds (croniter's optional sixth
field is seconds), on a `prefect server start` in a temporary PREFECT_HOME on a free port. It
guards the pins in pyproject.toml:

- SQLAlchemy 2.1 breaks Prefect 3.8's scheduler service ("Can't evaluate bulk DML statement"
  in `_insert_scheduled_flow_runs`, every cycle): a deployment shows its cron but never gets a run.
- FastAPI >= 0.151 validates an explicit JSON `null` instead of using the parameter's default, so
  `prefect deployment ls` / `flow-run ls` (whose client sends `"limit": null`) fail with a 422.

Without a server (no PREFECT_API_URL) `serve` starts a temporary server that runs no scheduler
("Cannot schedule flows on an ephemeral server"): scheduling needs `prefect server start`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .conftest import free_port

pytestmark = pytest.mark.timeout(720)  # server start + run + CLI checks; teardown still kills both

SERVER_START_TIMEOUT = 240  # seconds; ~20 s on an idle 2-core machine, ~40 s when it is busy
RUN_TIMEOUT = 180  # from `serve` starting to a scheduled run in COMPLETED
FLOW_NAME = "t2-schedule-probe"
DEPLOYMENT = "probe"
CRON = "* * * * * */10"  # every 10 s: the first run is due a few seconds after serving starts

PROBE_FLOW = textwrap.dedent(f'''
    import sys

    from prefect import flow


    @flow(name="{FLOW_NAME}")
    def probe(params_path: str = "params.yaml") -> str:
        print(f"probe ran with {{params_path}}")
        return params_path


    if __name__ == "__main__":  # as flows/cli.py serves the pipeline flow
        probe.serve(name="{DEPLOYMENT}", cron=sys.argv[1], parameters={{"params_path": "tiny.yaml"}})
''')


def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group (the process and what it spawned), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except (ProcessLookupError, PermissionError):
        pass
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _api(url: str, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=15) as resp:
        return json.loads(resp.read() or b"null")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` (scheduler included) in a temporary PREFECT_HOME; killed at the end."""
    root = tmp_path_factory.mktemp("prefect")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ,
           "PREFECT_HOME": str(root / "home"),
           "PREFECT_API_URL": api_url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false",  # nothing here looks at the UI; it only costs start time
           "DO_NOT_TRACK": "true",
           "COLUMNS": "200"}  # CLI tables wide enough to print the deployment's full name
    log = root / "server.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start",
                                 "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prefect server exited with {proc.returncode}:\n{_tail(log)}")
            try:
                if _api(api_url, "/health") is True:
                    break
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            if time.monotonic() - started > SERVER_START_TIMEOUT:
                pytest.fail(f"prefect server not healthy after {SERVER_START_TIMEOUT} s:\n{_tail(log)}")
            time.sleep(0.5)
        print(f"prefect server healthy after {time.monotonic() - started:.1f} s")
        yield {"url": api_url, "env": env, "root": root, "log": log}
    finally:
        _stop(proc)


def test_served_cron_schedule_produces_a_completed_run(prefect_server):
    url, env, root = prefect_server["url"], prefect_server["env"], prefect_server["root"]
    (root / "probe_flow.py").write_text(PROBE_FLOW)
    serve_log = root / "serve.log"
    started = time.monotonic()
    with open(serve_log, "wb") as out:
        serve = subprocess.Popen([sys.executable, "probe_flow.py", CRON], cwd=root, env=env,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        completed = None
        while completed is None:
            if serve.poll() is not None:
                pytest.fail(f"serve exited with {serve.returncode}:\n{_tail(serve_log)}")
            if time.monotonic() - started > RUN_TIMEOUT:
                pytest.fail(f"no scheduled run COMPLETED within {RUN_TIMEOUT} s\n--- serve:\n"
                            f"{_tail(serve_log)}\n--- server:\n{_tail(prefect_server['log'])}")
            time.sleep(2)
            # (the scheduler creates dozens of future runs at once: ask for the completed ones)
            try:
                runs = _api(url, "/flow_runs/filter",
                            {"flows": {"name": {"any_": [FLOW_NAME]}},
                             "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}, "limit": 5})
            except (urllib.error.URLError, ConnectionError, OSError):  # a busy server: ask again
                continue
            completed = runs[0] if runs else None
        elapsed = time.monotonic() - started
        print(f"first scheduled run COMPLETED {elapsed:.1f} s after serve started")

        # Created by the scheduler from the cron (not by hand), for the served deployment,
        # with the parameters `serve` was given.
        assert completed["auto_scheduled"] is True
        assert completed["parameters"] == {"params_path": "tiny.yaml"}
        deployment = _api(url, f"/deployments/{completed['deployment_id']}")
        assert deployment["name"] == DEPLOYMENT
        assert [s["schedule"].get("cron") for s in deployment["schedules"]] == [CRON]
        assert "probe ran with tiny.yaml" in serve_log.read_text(errors="replace")

        # The CLI listings work (their client sends "limit": null; 422 with fastapi >= 0.151).
        for args in (["deployment", "ls"], ["flow-run", "ls"]):
            res = subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=root,
                                 capture_output=True, text=True, timeout=120)
            assert res.returncode == 0, f"prefect {' '.join(args)}: {res.stdout}\n{res.stderr}"
            if args[0] == "deployment":
                assert f"{FLOW_NAME}/{DEPLOYMENT}" in res.stdout

        # The scheduler service ran clean (it crashed every cycle with SQLAlchemy 2.1).
        assert "Can't evaluate bulk DML statement" not in prefect_server["log"].read_text(errors="replace")
    finally:
        _stop(serve)
