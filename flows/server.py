"""The Prefect server of the project's stages and pipeline runs, never left behind.

- `project_server()`: one local Prefect server per project (PREFECT_HOME), shared by every `t2` process
  that has no PREFECT_API_URL: the first one starts it in the background, the others find it (a stage of
  a plain `dvc repro` then spends no 10 s on a temporary server of its own). Each process holds a lease
  (a file naming its pid) while it runs; the server stops itself once no lease has been alive for
  T2_PREFECT_SERVER_IDLE_S seconds (default 120), also after a stage was killed. T2_PREFECT_SERVER=temporary
  restores Prefect's own behaviour (a temporary server per process).
- `pipeline_server()`: PREFECT_API_URL for a whole `t2 repro` / `t2 pipeline` run (the server it already
  names, else the project's), and T2_PIPELINE_RUN, so every stage's flow run is tagged `t2-pipeline:<id>`.
- `guard_temporary_server()`: with T2_PREFECT_SERVER=temporary, Prefect's temporary server started from
  the main thread with PR_SET_PDEATHSIG: when the stage dies, even by SIGKILL, the kernel sends the server
  SIGTERM. (Prefect 3.8 stops it only from an atexit hook, which neither SIGKILL nor an unhandled SIGTERM
  runs: the server kept running.)

Light on purpose (stdlib only until a temporary server is really needed): `t2` imports this before Prefect.
"""
from __future__ import annotations

import ctypes
import fcntl
import importlib.util
import json
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
from transformer2.runtime import env_seconds, proc_stat

PIPELINE_ENV = "T2_PIPELINE_RUN"  # set for the stages of one pipeline run; their flow runs carry its tag
SERVER_ENV = "T2_PREFECT_SERVER"  # "shared" (the project's server, default) or "temporary" (one per process)
IDLE_ENV = "T2_PREFECT_SERVER_IDLE_S"  # the shared server stops after this long without a live lease
DEFAULT_IDLE_S = 120.0
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
    log(f"t2: Prefect server at {api_url.removesuffix('/api')} "
        f"(up in {time.monotonic() - started:.1f} s, pid {proc.pid}, log {logfile})")
    return proc, api_url


def server_mode() -> str:
    mode = os.environ.get(SERVER_ENV, "shared").strip().lower() or "shared"
    if mode not in ("shared", "temporary"):
        raise UserError(f"{SERVER_ENV}={os.environ[SERVER_ENV]!r}: use 'shared' (one server for the project's "
                        "stages, the default) or 'temporary' (Prefect's temporary server per process)")
    return mode


def _idle_s() -> float:
    return env_seconds(IDLE_ENV, DEFAULT_IDLE_S)


def _start_ticks(pid: int) -> Optional[str]:
    """When `pid` started (clock ticks since boot): with the pid, names one process even after pid reuse;
    None when it is gone or a zombie."""
    if not Path("/proc/self/stat").exists():  # no /proc (macOS): alive or not, without the start time
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "-"
    fields = proc_stat(pid)
    return None if fields is None or fields[0] in ("Z", "X") else fields[19]


class _Project:
    """The files of a project's shared server, all under PREFECT_HOME: its state (pid, URL), the lock every
    start and stop takes, and one lease file per process using it."""

    def __init__(self, home: Path):
        self.home = home
        self.state = home / "t2-server.json"
        self.leases = home / "t2-server-leases"
        self.log = home / "t2-server.log"

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.leases.mkdir(parents=True, exist_ok=True)
        with open(self.home / "t2-server.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def take_lease(self, pid: int) -> None:
        ticks = _start_ticks(pid)
        if ticks is not None:
            (self.leases / str(pid)).write_text(ticks)

    def live_leases(self) -> list[int]:
        """Pids whose process still runs; the files of the others are removed."""
        live = []
        for lease in self.leases.iterdir():
            try:
                alive = lease.name.isdigit() and _start_ticks(int(lease.name)) == lease.read_text().strip()
            except OSError:
                continue
            if alive:
                live.append(int(lease.name))
            else:
                lease.unlink(missing_ok=True)
        return live

    def running(self) -> Optional[dict]:
        """The state of a server that runs and answers, else None."""
        try:
            state = json.loads(self.state.read_text())
            ok = _start_ticks(int(state["pid"])) == state["ticks"] and healthy(state["api_url"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return state if ok else None


# The shared server's process runs this very module (not whatever `flows` the working directory holds).
_DAEMON = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
           "from flows.server import serve_project; sys.exit(serve_project(sys.argv[1], float(sys.argv[2])))")


def project_server(home: Path, timeout: float = 240.0, log=print) -> str:
    """The API URL of the project's shared Prefect server (started in the background if none answers); this
    process holds a lease on it until it exits."""
    project = _Project(home)
    idle = _idle_s()
    with project.locked():
        project.take_lease(os.getpid())
        state = project.running()
        if state is not None:
            return state["api_url"]
        project.state.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        started = time.monotonic()
        with open(project.log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-c", _DAEMON, str(home), str(idle)],
                                    env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)  # outlives this process: the next stages use it
        while (state := project.running()) is None:
            if proc.poll() is not None:
                raise UserError(f"the Prefect server exited with code {proc.returncode} (log: {project.log})")
            if time.monotonic() - started > timeout:
                proc.terminate()
                raise UserError(f"the Prefect server did not answer within {timeout:.0f} s (log: {project.log})")
            time.sleep(0.25)
    log(f"t2: Prefect server for this project's stages at {state['api_url'].removesuffix('/api')} (up in "
        f"{time.monotonic() - started:.1f} s, pid {state['pid']}; stops {idle:.0f} s after its last stage; "
        f"log {project.log})")
    return state["api_url"]


def use_project_server(log=print) -> None:
    """A `t2` process without PREFECT_API_URL: point it at the project's shared server, before Prefect is
    imported (with T2_PREFECT_SERVER=temporary it does nothing: `guard_temporary_server` follows)."""
    if not os.environ.get("PREFECT_API_URL") and server_mode() == "shared":
        os.environ["PREFECT_API_URL"] = project_server(_home(), log=log)


def _home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.cwd() / ".prefect")


def serve_project(home: str | Path, idle_s: float) -> int:
    """The shared server's own process: uvicorn as a child that dies with it, the state file once it answers,
    then a check every second; it stops when no lease has been alive for `idle_s` (or on SIGTERM)."""
    home = Path(home)
    project = _Project(home)
    proc, api_url = start_server(home, log=lambda line: print(line, flush=True))
    state = {"pid": os.getpid(), "ticks": _start_ticks(os.getpid()), "api_url": api_url, "server_pid": proc.pid}
    tmp = project.state.with_name(project.state.name + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, project.state)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    idle_since = None
    try:
        while proc.poll() is None:
            time.sleep(1.0)
            with project.locked():
                if project.live_leases():
                    idle_since = None
                    continue
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since >= idle_s:
                    break
    finally:
        with project.locked():
            try:
                if json.loads(project.state.read_text()).get("pid") == os.getpid():
                    project.state.unlink()
            except (OSError, ValueError):
                pass
        _stop(proc)
    print(f"t2: Prefect server at {api_url} stopped ({idle_s:.0f} s without a stage)", flush=True)
    return 0


@contextmanager
def pipeline_server(log=print) -> Iterator[str]:
    """PREFECT_API_URL (and T2_PIPELINE_RUN) for everything this process starts until the block ends: the
    server PREFECT_API_URL names if it answers, else the project's shared one (T2_PREFECT_SERVER=temporary:
    a server of this run's own, stopped at the end, error and Ctrl-C too)."""
    saved = {k: os.environ.get(k) for k in ("PREFECT_API_URL", PIPELINE_ENV)}
    proc = None
    try:
        api_url = os.environ.get("PREFECT_API_URL")
        if api_url:
            if not healthy(api_url, timeout=5.0):
                raise UserError(f"PREFECT_API_URL={api_url}: no Prefect server answers; start it "
                                "(`prefect server start --host 127.0.0.1`) or unset PREFECT_API_URL")
            log(f"t2: using the Prefect server at {api_url}")
        elif server_mode() == "shared":
            api_url = project_server(_home(), log=log)
        else:
            proc, api_url = start_server(_home(), log=log)
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
