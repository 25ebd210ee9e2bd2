"""Stage processes forked from a warm one: a `t2` stage spends ~6-8 s importing torch, transformers, PEFT,
MLflow, Prefect and lm-eval before its own work; a forkserver imports them once per project.

The first stage that finds none starts it in the background (its own session; log
$PREFECT_HOME/t2-forkserver.log) and waits until it is ready. Each stage process (the one DVC starts)
then sends it its argv, environment, working directory, umask and its stdin/stdout/stderr; the forkserver
forks a child that runs the stage as `t2` would, on the stage's own terminal or pipes, in its own process
group. The stage process forwards SIGINT/SIGTERM/SIGHUP to it and exits with its status; a stage process
that vanishes (SIGKILL) takes its child with it.

Only third-party modules are preloaded: every child imports the project's code fresh, so an edit takes
effect at the next stage. A forkserver serves one environment (every variable except the per-run ids
below, the Python path, the installed packages' state); a stage with another gets another forkserver.
It stops after T2_FORKSERVER_IDLE_S seconds without a stage (default 120). T2_FORKSERVER=off runs each
stage in a fresh process as before. Linux only (abstract Unix sockets, fork); elsewhere, or when the
forkserver cannot serve, the stage runs in its own process. Stdlib only: the stage process imports this
before anything heavy.
"""
from __future__ import annotations

import atexit
import hashlib
import importlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Optional

SWITCH_ENV = "T2_FORKSERVER"  # "on" (default) or "off"
IDLE_ENV = "T2_FORKSERVER_IDLE_S"
DEFAULT_IDLE_S = 120.0
PRELOAD = ("torch", "transformers", "peft", "datasets", "mlflow", "mlflow.tracking",
           "mlflow.store.tracking.sqlalchemy_store", "prefect", "prefect.flows", "prefect.tasks",
           "lm_eval.evaluator", "lm_eval.tasks")  # not prefect.main: it sets up logging on the child's stderr
PER_RUN = {"T2_PIPELINE_RUN", "T2_PARENT_FLOW_RUN", "MLFLOW_PARENT_RUN_ID", "PWD", "OLDPWD", "SHLVL", "_"}  # read when used
PROJECT_PACKAGES = {"flows", "tasks", "transformer2", "tests"}  # never kept from the forkserver: fresh each stage
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
NAME_TAKEN = 3  # the forkserver's exit code when another one already serves its environment

_in_child = False


def mode() -> str:
    value = os.environ.get(SWITCH_ENV, "on").strip().lower() or "on"
    if value not in ("on", "off"):
        from transformer2.errors import UserError

        raise UserError(f"{SWITCH_ENV}={os.environ[SWITCH_ENV]!r}: use 'on' (stages forked from a warm "
                        "process, the default) or 'off' (a fresh process per stage)")
    return value


def idle_s() -> float:
    from transformer2.runtime import env_seconds

    return env_seconds(IDLE_ENV, DEFAULT_IDLE_S)


def usable() -> bool:
    """Whether this process may hand its stage to a forkserver (not inside one's child, Linux, not off)."""
    if _in_child or not sys.platform.startswith("linux") or mode() == "off":
        return False
    idle_s()  # a bad value is one line now, before any server starts
    return True


def _stamp(path: str) -> Optional[int]:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def environment_key(env: dict) -> str:
    """What a preloaded module may have read at import: the environment (less the per-run ids), the
    interpreter, the Python path and the installed packages' folders (pip changes their mtime)."""
    data = {"python": sys.executable, "path": sys.path, "this": _stamp(__file__),
            "packages": [_stamp(p) for p in sys.path if p.endswith(("site-packages", "dist-packages"))],
            "env": {k: v for k, v in env.items() if k not in PER_RUN and not k.startswith("DVC_")}}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


def _address(key: str) -> bytes:
    return b"\0t2-forkserver-" + key.encode()  # abstract: no file to clean up, no path-length limit


def _connect(address: bytes) -> Optional[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        return None
    return sock


# The forkserver runs this very module (not whatever `flows` the working directory holds).
_DAEMON = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
           "from flows.forkserver import serve; sys.exit(serve(sys.argv[1], float(sys.argv[2])))")


def _start(key: str, env: dict, log, timeout: float = 180.0) -> Optional[socket.socket]:
    home = Path(env.get("PREFECT_HOME") or Path.cwd() / ".prefect")
    home.mkdir(parents=True, exist_ok=True)
    logfile = home / "t2-forkserver.log"
    idle = idle_s()
    started = time.monotonic()
    with open(logfile, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-c", _DAEMON, key, str(idle)], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    while time.monotonic() - started < timeout:
        sock = _connect(_address(key))
        if sock is not None:
            if proc.poll() is None:
                log(f"t2: forkserver ready (imports in {time.monotonic() - started:.1f} s, pid {proc.pid}; stages "
                    f"fork from it; stops {idle:.0f} s after its last stage; log {logfile})")
            return sock
        if proc.poll() not in (None, NAME_TAKEN):
            log(f"t2: no forkserver (it exited with code {proc.returncode}, log {logfile}); this stage runs in "
                "its own process")
            return None
        time.sleep(0.05)
    proc.terminate()
    return None


def run_forked(argv: list[str], entry: str = "flows.cli:main", log=print) -> Optional[int]:
    """Run `entry(argv)` in a child of this environment's forkserver (started if none runs) with this
    process's stdio, cwd and environment; its exit code, or None where no forkserver could take it (the
    caller then runs it itself: nothing of it ran)."""
    env = dict(os.environ)
    key = environment_key(env)
    try:
        for fd in (0, 1, 2):
            os.fstat(fd)
        sock = _connect(_address(key)) or _start(key, env, log)
        if sock is None:
            return None
        umask = os.umask(0)
        os.umask(umask)
        from transformer2.runtime import process_started_s

        request = json.dumps({"entry": entry, "argv": [sys.argv[0], *argv], "env": env, "cwd": os.getcwd(),
                              "path": sys.path, "umask": umask, "started_s": process_started_s()}).encode()
        message = struct.pack("!I", len(request)) + request
        sent = socket.send_fds(sock, [message], [0, 1, 2])
        sock.sendall(message[sent:])
        reader = sock.makefile("rb")
        line = reader.readline()
        if not line:
            return None  # it stopped (idle) as this one connected: nothing ran
        pid = json.loads(line)["pid"]
    except OSError:
        return None

    def forward(signum, _frame):
        try:
            os.killpg(pid, signum)
        except OSError:
            pass

    previous = {s: signal.signal(s, forward) for s in SIGNALS}
    try:
        line = reader.readline()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if not line:
        from transformer2.errors import UserError

        raise UserError(f"the forkserver ended while stage pid {pid} ran; rerun (T2_FORKSERVER=off runs each "
                        "stage in its own process)")
    code = json.loads(line)["exit"]
    if code < 0:  # the child died of a signal: so does this process, as a fresh one would have
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


def serve(key: str, idle: float) -> int:
    """The forkserver's own process: claim the address, import PRELOAD, then fork one child per request;
    report each child's pid and exit status to its stage process; stop after `idle` s without a child."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(_address(key))  # atomic: of two forkservers started at once, one serves
    except OSError:
        return NAME_TAKEN
    started = time.monotonic()
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001  (a missing optional module is no reason to stop)
            print(f"t2-forkserver: not preloaded {name}: {type(err).__name__}: {err}", flush=True)
    print(f"t2-forkserver {os.getpid()}: {len(sys.modules)} modules in {time.monotonic() - started:.1f} s, "
          f"{threading.active_count()} Python thread(s); serving", flush=True)
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    last_busy = time.monotonic()
    while not stopping:
        for event, _ in selector.select(timeout=0.5):
            if event.fileobj is listener:
                conn, _ = listener.accept()
                pid = _fork(conn, listener, selector)
                if pid is not None:
                    children[pid] = conn
                    selector.register(conn, selectors.EVENT_READ, pid)
                else:
                    conn.close()
            elif not event.fileobj.recv(64):  # the stage process is gone (SIGKILL): so goes its child
                selector.unregister(event.fileobj)
                event.fileobj.close()
                _signal_group(event.data, signal.SIGKILL)
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            code = os.waitstatus_to_exitcode(status)
            print(f"t2-forkserver: stage pid {pid} exited with {code}", flush=True)
            if conn is not None and conn.fileno() >= 0:
                selector.unregister(conn)
                try:
                    conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
                except OSError:
                    pass
                conn.close()
        if children:
            last_busy = time.monotonic()
        elif time.monotonic() - last_busy >= idle:
            break
    listener.close()
    for pid in children:
        _signal_group(pid, signal.SIGTERM)
    print(f"t2-forkserver {os.getpid()}: stopped ({'SIGTERM' if stopping else f'{idle:.0f} s without a stage'})",
          flush=True)
    return 0


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except OSError:
        pass


def _fork(conn: socket.socket, listener: socket.socket, selector) -> Optional[int]:
    conn.settimeout(10.0)
    fds: list[int] = []
    try:
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        if len(data) < 4 or len(fds) != 3:
            raise ValueError("not a stage request")
        size = struct.unpack("!I", data[:4])[0]
        data = data[4:]
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise ValueError("the request ended early")
            data += chunk
        request = json.loads(data)
    except (OSError, ValueError) as err:
        print(f"t2-forkserver: request refused: {err}", flush=True)
        for fd in fds:
            os.close(fd)
        return None
    conn.settimeout(None)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            selector.close()
            listener.close()
            conn.close()
            code = _child(request, fds)
        except BaseException:  # noqa: BLE001  (the child never returns into the server's loop)
            traceback.print_exc()
        finally:
            os._exit(code)
    for fd in fds:
        os.close(fd)
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    print(f"t2-forkserver: stage pid {pid}: {' '.join(request['argv'][1:])}", flush=True)
    return pid


def _child(request: dict, fds: list[int]) -> int:
    """In the forked child: become the stage process (its stdio, group, signals, environment, cwd, path),
    run the entry, then exit as the interpreter would (join threads, atexit, flush)."""
    global _in_child
    _in_child = True
    os.setpgid(0, 0)  # its own group: the stage process forwards signals to it and its children
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(s, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    sys.argv = request["argv"]
    sys.path[:] = request["path"]
    for name in [m for m in sys.modules if m.split(".")[0] in PROJECT_PACKAGES]:
        del sys.modules[name]  # the project's code as it is now on disk
    importlib.invalidate_caches()
    sys.stdout.reconfigure(line_buffering=sys.stdout.isatty())  # as a fresh interpreter sets it
    runtime = importlib.import_module("transformer2.runtime")
    runtime.PROCESS_STARTED_S = request["started_s"]  # overhead_s counts from the stage process's start
    module, _, function = request["entry"].partition(":")
    try:
        result = getattr(importlib.import_module(module), function)(request["argv"][1:])
    except SystemExit as err:
        result = err.code
    except BaseException:  # noqa: BLE001  (as the interpreter reports an uncaught exception)
        traceback.print_exc()
        result = 1
    if result is None or isinstance(result, int):
        code = (result or 0) & 0xFF
    else:
        print(result, file=sys.stderr)
        code = 1
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()  # non-daemon threads first, as at interpreter exit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    return code
