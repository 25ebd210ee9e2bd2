"""The host side: start sandbox processes, enforce the wall clock, collect results."""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import site
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Optional, Sequence


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock for the whole run
    cpu_s: int = 10  # RLIMIT_CPU, per process
    memory_mb: int = 1024  # RLIMIT_AS per process; with no new processes (seccomp) the program's all
    max_processes: int = 64  # RLIMIT_NPROC: threads (and processes where seccomp is missing)
    max_file_mb: int = 16  # RLIMIT_FSIZE: largest single file (and stdout/stderr)
    max_output_kb: int = 64  # captured stdout/stderr kept in the result
    max_disk_mb: int = 64  # tmpfs size of the working directory (needs a mount namespace)
    max_open_files: int = 64  # RLIMIT_NOFILE


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "error" (the sandbox itself failed)
    returncode: Optional[int]
    stdout: str
    stderr: str
    seconds: float


_PKG = __name__.rpartition(".")[0]
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_PARTS = _PKG.split(".")
_TOP = _PKG_DIR
for _ in _PARTS:
    _TOP = os.path.dirname(_TOP)
_STUBS = [(".".join(_PARTS[:i + 1]), os.path.join(_TOP, *_PARTS[:i + 1])) for i in range(len(_PARTS))]
# Packages as bare stubs, so the sandbox imports only this folder's stdlib-only modules.
_BOOT = ("import sys, types\n"
         f"for n, p in {_STUBS!r}:\n"
         "    m = types.ModuleType(n); m.__path__ = [p]; sys.modules[n] = m\n"
         f"from {_PKG}.confine import main\nmain()\n")

_SKIP_LAYERS: frozenset = frozenset()  # tests only: {"seccomp", "namespaces"} show that the other layers hold
_UID_BASE, _UID_SLOTS = 0x3F000000, 4096  # slot i: uids base+2i (candidate), base+2i+1 (checker)
_LOCK_DIRS = ("/run/transformer2-sandbox", "/var/lib/transformer2-sandbox")  # in root-only directories


_SITE = [p for p in site.getsitepackages() if os.path.isdir(p)]


class _NoSlot(Exception):
    pass


def _read_paths() -> list[str]:
    """What sandboxed code may read under Landlock: the interpreter, its venv, system libraries."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             "/usr", "/lib", "/lib64", "/etc/ld.so.cache", "/etc/localtime"}
    return sorted(os.path.realpath(p) for p in paths)


@lru_cache(maxsize=None)
def _needs_dac_search() -> bool:
    """Whether another uid cannot read the interpreter (e.g. a pyenv under /root)."""
    for path in _read_paths():
        while path not in ("/", ""):
            try:
                mode = os.stat(path).st_mode
            except OSError:
                break
            if not mode & stat.S_IXOTH if stat.S_ISDIR(mode) else not mode & stat.S_IROTH:
                return True
            path = os.path.dirname(path)
    return False


def _private(st: os.stat_result) -> bool:
    return st.st_uid == 0 and not st.st_mode & 0o022


def _lock_dir() -> int:
    """The uid-slot lock directory (the first of _LOCK_DIRS whose parent only root can
    write), opened without following links; refused unless root owns it and only root can
    write to it, so no other user can plant it, its files or links in it."""
    for path in _LOCK_DIRS:
        try:
            if not _private(os.stat(os.path.dirname(path))):
                continue
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError:
            continue
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        if not _private(os.fstat(fd)):
            os.close(fd)
            raise _NoSlot(f"{path} is not a private root-owned directory")
        return fd
    raise _NoSlot(f"none of {_LOCK_DIRS} can be a private root-owned directory")


def _check(limits: SandboxLimits) -> None:
    """Refuse limits the kernel would read as "unlimited" (a negative rlimit is RLIM_INFINITY)."""
    for name, value in vars(limits).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                value >= 0 if name in ("max_file_mb", "max_output_kb") else value > 0):
            raise ValueError(f"SandboxLimits.{name} = {value!r}: must be a positive number")


class _Run:
    """One sandbox run's private state: a 0700 temporary directory, as root a uid slot, and
    the started processes, all cleaned up (process groups SIGKILLed) on exit."""

    def __init__(self, limits: SandboxLimits):
        _check(limits)
        self.limits, self.procs, self.slot_fd, self.uids = limits, [], None, (None, None)
        self.dir = tempfile.mkdtemp(prefix="t2-sandbox-")
        if os.geteuid() == 0 and sys.platform.startswith("linux"):
            try:
                os.chmod(self.dir, 0o711)  # the run's uids reach their own working directories only
                self._take_slot()
            except BaseException:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise

    def _take_slot(self) -> None:
        dfd = _lock_dir()
        try:
            start = secrets.randbelow(_UID_SLOTS)
            for k in range(_UID_SLOTS):
                i = (start + k) % _UID_SLOTS
                fd = os.open(str(i), os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                self.slot_fd, self.uids = fd, (_UID_BASE + 2 * i, _UID_BASE + 2 * i + 1)
                return
        finally:
            os.close(dfd)
        raise _NoSlot("no free sandbox uid slot")

    def start(self, role: str, cfg: dict, fds: Sequence[int] = ()) -> dict:
        lim = self.limits
        uid = self.uids[role == "checker"]
        work = os.path.join(self.dir, role)
        os.mkdir(work, 0o700)
        if uid is not None:
            os.chown(work, uid, uid)
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        ready_r, ready_w = os.pipe()
        cfg = dict(cfg, role=role, work=work, uid=uid, host=os.getpid(), read=_read_paths(), site=_SITE,
                   skip=sorted(_SKIP_LAYERS),
                   dac_search=uid is not None and _needs_dac_search(), ready=ready_w,
                   fds=[ready_w, *fds],
                   limits=dict(cpu_s=int(lim.cpu_s), mem=int(lim.memory_mb) << 20,
                               nproc=int(lim.max_processes), fsize=int(lim.max_file_mb) << 20,
                               nofile=int(lim.max_open_files), disk_mb=max(1, int(lim.max_disk_mb)),
                               inodes=4096))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": os.environ.get("LANG", "C.UTF-8"),
               "HOME": work, "TMPDIR": work, "PYTHONHASHSEED": "0"}
        p = {"out": out, "err": err, "ready": ready_r, "proc": None}
        self.procs.append(p)
        try:
            p["proc"] = subprocess.Popen([sys.executable, "-I", "-S", "-c", _BOOT, self.dir], stdin=subprocess.PIPE,
                                         stdout=out, stderr=err, cwd=work, env=env, close_fds=True,
                                         pass_fds=[ready_w, *fds], start_new_session=True)
        finally:
            os.close(ready_w)
        try:
            p["proc"].stdin.write(json.dumps(cfg).encode())
            p["proc"].stdin.close()
        except OSError:
            pass  # it died before reading; its status says why
        return p

    def wait(self, deadline: float) -> bool:
        """Wait for the first process (the one whose status decides); True if time ran out."""
        try:
            self.procs[0]["proc"].wait(timeout=max(0.0, deadline - time.monotonic()))
            return False
        except subprocess.TimeoutExpired:
            return True

    def collect(self, p: dict, cap: int) -> tuple:
        """(exit code, stdout, stderr, setup completed) of a finished process."""
        rc = p["proc"].returncode
        if rc is not None and rc > 128 and rc - 128 < signal.NSIG:
            rc = -(rc - 128)  # killed by a signal inside the sandbox (see confine._status)
        try:
            ready = os.read(p["ready"], 1) == b"1"
        except OSError:
            ready = False
        out, err = (f.seek(0) or f.read(cap).decode("utf-8", "replace") for f in (p["out"], p["err"]))
        return rc, out, err, ready

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            if p["proc"] is not None:
                try:
                    os.killpg(p["proc"].pid, signal.SIGKILL)
                except OSError:
                    pass
        for p in self.procs:
            if p["proc"] is not None:
                p["proc"].wait()
            os.close(p["ready"])
            p["out"].close()
            p["err"].close()
        if self.slot_fd is not None:
            os.close(self.slot_fd)
        shutil.rmtree(self.dir, ignore_errors=True)


def _error(t0: float, e: BaseException) -> SandboxResult:
    return SandboxResult(False, "error", None, "", f"sandbox could not run: {e!r}", time.monotonic() - t0)


def _finish(run: _Run):
    """Kill what is left, then read every process's results (rc, out, err, ready)."""
    for p in run.procs:
        try:
            os.killpg(p["proc"].pid, signal.SIGKILL)
        except OSError:
            pass
        p["proc"].wait()
        os.set_blocking(p["ready"], False)
    cap = (int(run.limits.max_file_mb) << 20) + 4096
    return [run.collect(p, cap) for p in run.procs]


def run_python(program: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run a whole program in a fresh sandboxed interpreter; `passed` means it ran to the end
    without an exception. The program decides that itself, so this is no verdict a reward
    can trust (use `run_tests`). Never raises."""
    t0 = time.monotonic()
    try:
        with _Run(limits) as run:
            sentinel = secrets.token_hex(16)
            run.start("program", {"program": program, "sentinel": sentinel})
            timed_out = run.wait(t0 + limits.timeout_s)
            ((rc, stdout, stderr, ready),) = _finish(run)
    except Exception as e:
        return _error(t0, e)
    mark = f"\n{sentinel}\n"
    if timed_out or rc == -signal.SIGXCPU:
        status = "timeout"
    elif not ready:
        status = "error"
    else:
        status = "passed" if rc == 0 and mark in stdout else "failed"
    keep = limits.max_output_kb * 1024
    return SandboxResult(status == "passed", status, rc, stdout.replace(mark, "")[:keep], stderr[:keep],
                         time.monotonic() - t0)


def run_tests(candidate: str, tests: str, *, setup: str = "", prelude: str = "",
              entry_points: Sequence[str] = (), limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `tests` against the definitions in `candidate`; a pass the candidate cannot fake.

    The candidate's process executes `prelude + candidate` (verbatim), then `setup`, and
    then only answers calls. A second sandboxed process, the checker, executes `prelude`,
    binds each name the tests use that the candidate defines - except builtins and the
    prelude's own names, unless listed in `entry_points` (e.g. MBPP's `sum`, HumanEval's
    stub) - then `setup` and `tests`. Calls into the candidate return plain data only;
    stdlib modules are the checker's own. Passed = `tests` ran to the end. Never raises."""
    t0 = time.monotonic()
    fix = lambda s: (s or "").replace("\r\n", "\n")  # noqa: E731
    try:
        with _Run(limits) as run:
            req_r, req_w = os.pipe()
            rep_r, rep_w = os.pipe()
            try:
                run.start("checker", {"prelude": fix(prelude), "setup": fix(setup), "tests": fix(tests),
                                      "entry_points": list(entry_points),
                                      "rfd": rep_r, "wfd": req_w}, (rep_r, req_w))
                run.start("child", {"program": fix(prelude) + fix(candidate), "setup": fix(setup),
                                    "rfd": req_r, "wfd": rep_w}, (req_r, rep_w))
            finally:
                for fd in (req_r, req_w, rep_r, rep_w):
                    os.close(fd)
            timed_out = run.wait(t0 + limits.timeout_s)
            (rc, out, err, ready), (crc, cout, cerr, cready) = _finish(run)
    except Exception as e:
        return _error(t0, e)
    if timed_out or -signal.SIGXCPU in (rc, crc):
        status = "timeout"
    elif not (ready and cready):
        status = "error"
    else:
        status = "passed" if rc == 0 else "failed"
    keep = limits.max_output_kb * 1024
    return SandboxResult(status == "passed", status, rc, (cout + out)[:keep], (err + cerr)[:keep],
                         time.monotonic() - t0)


def _pool(fn, items, workers: int) -> list:
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(fn, items))


def run_many(programs: Sequence[str], limits: SandboxLimits = SandboxLimits(),
             workers: int = 2) -> list[SandboxResult]:
    """`run_python` over many programs, `workers` at a time; results in input order."""
    return _pool(lambda p: run_python(p, limits), programs, workers)


def run_tests_many(items: Sequence[Mapping], limits: SandboxLimits = SandboxLimits(),
                   workers: int = 2) -> list[SandboxResult]:
    """`run_tests(**item)` for each item (keys: candidate, tests, and optionally setup,
    prelude, names), `workers` at a time; results in input order."""
    return _pool(lambda item: run_tests(**item, limits=limits), items, workers)


@lru_cache(maxsize=None)
def layers() -> tuple:
    """The confinement layers this host's kernel grants a sandbox process, e.g. ("userns",
    "pidns", ..., "landlock7", "seccomp"); () if the probe could not run."""
    t0 = time.monotonic()
    try:
        with _Run(SandboxLimits(timeout_s=10)) as run:
            run.start("probe", {})
            run.wait(t0 + 10)
            ((rc, stdout, _, ready),) = _finish(run)
        return tuple(json.loads(stdout)) if rc == 0 and ready else ()
    except Exception:
        return ()
