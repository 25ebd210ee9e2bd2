"""The Prefect server of a stage or of a whole pipeline run, never left behind.

- `pipeline_server()`: one local Prefect server for a whole `t2 repro` / `t2 pipeline` run (or the one
  PREFECT_API_URL already points at). Its URL is exported in PREFECT_API_URL, so every stage process
  that `dvc repro` starts talks to it instead of starting a temporary server of its own (3-20 s each),
  and T2_PIPELINE_RUN names the run, so every stage's flow run is tagged `t2-pipeline:<id>`.
- `guard_temporary_server()`: a stage run on its own (plain `dvc repro`, no PREFECT_API_URL) still gets
  Prefect's temporary server, but started from the main thread with PR_SET_PDEATHSIG: when the stage
  dies, even by SIGKILL, the kernel sends the server SIGTERM. (Prefect 3.8 stops it only from an atexit
  hook, which neither SIGKILL nor an unhandled SIGTERM runs: the server kept running.)

Light on purpose (stdlib only until a temporary server is really needed): `t2` imports this before Prefect.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from transformer2.errors import UserError

PIPELINE_ENV = "T2_PIPELINE_RUN"  # set for the stages of one pipeline run; their flow runs carry its tag
PR_SET_PDEATHSIG = 1
DEFAULT_PORT = 4200


def pipeline_tag() -> Optional[str]:
    run = os.environ.get(PIPELINE_ENV)
    return f"t2-pipeline:{run}" if run else None


def _die_with_parent(parent: int):
    """A preexec_fn: the child gets SIGTERM when the thread that forked it ends (Linux; elsewhere a no-op)."""
    def set_pdeathsig() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return set_pdeathsig


class _PopenDyingWithParent(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("preexec_fn", _die_with_parent(os.getpid()))
        super().__init__(*args, **kwargs)


def guard_temporary_server() -> None:
    """Start Prefect's temporary server now, from this (the main) thread, as a child that dies with this
    process. Call before the first flow run of a process without PREFECT_API_URL; Prefect then reuses it."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return
    import types

    from prefect.server.api import server as prefect_server

    if not isinstance(getattr(prefect_server, "subprocess", None), types.ModuleType) or \
            prefect_server.subprocess.Popen is not _PopenDyingWithParent:
        shim = types.ModuleType("subprocess")
        shim.__dict__.update(subprocess.__dict__)
        shim.Popen = _PopenDyingWithParent
        prefect_server.subprocess = shim  # only the server module's Popen: what starts the uvicorn child
    prefect_server.SubprocessASGIServer().start()


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


def _free_port(preferred: int = DEFAULT_PORT) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free local port for the Prefect server")


def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_server(home: Path, timeout: float = 240.0, log=print) -> tuple[subprocess.Popen, str]:
    """One uvicorn process serving Prefect's API and UI on a free local port (4200 if free), dying with this
    process; returns it and its API URL once /health answers."""
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    home.mkdir(parents=True, exist_ok=True)
    logfile = home / "t2-server.log"
    spec = importlib.util.find_spec("prefect")
    app_dir = str(Path(spec.origin).parent.parent)
    env = {**os.environ, "PREFECT_UI_API_URL": api_url, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)  # the server itself is no client
    with open(logfile, "ab") as out:
        proc = _PopenDyingWithParent(
            [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warning", "--lifespan", "on"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)  # Ctrl-C reaches the stages, not the server: it outlives them, then stops
    started = time.monotonic()
    try:
        while not healthy(api_url, timeout=1.0):
            if proc.poll() is not None:
                raise UserError(f"the Prefect server exited with code {proc.returncode} (log: {logfile})")
            if time.monotonic() - started > timeout:
                raise UserError(f"the Prefect server did not answer within {timeout:.0f} s (log: {logfile})")
            time.sleep(0.25)
    except BaseException:
        _stop(proc)
        raise
    log(f"t2: Prefect server for this run at {api_url.removesuffix('/api')} "
        f"(up in {time.monotonic() - started:.1f} s, pid {proc.pid}, log {logfile})")
    return proc, api_url


@contextmanager
def pipeline_server(log=print) -> Iterator[str]:
    """PREFECT_API_URL (and T2_PIPELINE_RUN) for everything this process starts until the block ends: the
    server PREFECT_API_URL names if it answers, else a new one, stopped at the end (error and Ctrl-C too)."""
    saved = {k: os.environ.get(k) for k in ("PREFECT_API_URL", PIPELINE_ENV)}
    proc = None
    try:
        api_url = os.environ.get("PREFECT_API_URL")
        if api_url:
            if not healthy(api_url, timeout=5.0):
                raise UserError(f"PREFECT_API_URL={api_url}: no Prefect server answers; start it "
                                "(`prefect server start --host 127.0.0.1`) or unset PREFECT_API_URL")
            log(f"t2: using the Prefect server at {api_url}")
        else:
            proc, api_url = start_server(Path(os.environ.get("PREFECT_HOME") or Path.cwd() / ".prefect"), log=log)
        os.environ["PREFECT_API_URL"] = api_url
        os.environ.setdefault(PIPELINE_ENV, uuid.uuid4().hex[:12])
        yield api_url
    finally:
        if proc is not None:
            _stop(proc)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
