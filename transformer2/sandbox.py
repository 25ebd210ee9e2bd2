"""Run untrusted, model-written Python in a throwaway, locked-down process.

Code benchmarks (MBPP, HumanEval) and RL rewards execute whatever the model wrote, so every
program gets its own `python -I` process in a fresh temporary directory, with layered limits:

- rlimits: CPU seconds, address space, processes, file size, no core dumps; a wall-clock
  timeout; the whole process group (and, as root, every process of the run's uid) is
  SIGKILLed at the end, whatever happened.
- as root (Linux): a private network namespace (no interfaces) and mount namespace (the
  working directory is a size-capped tmpfs nobody else sees), then a drop to a per-run
  unprivileged uid, so RLIMIT_NPROC applies and the host cannot be signalled. Only
  CAP_DAC_READ_SEARCH is kept, so an interpreter installed under /root stays importable.
- Landlock (Linux >= 5.13, no privilege needed): writes only inside the working directory,
  reads only of the interpreter's prefixes and system libraries, no execve, no TCP, and
  (ABI >= 6) no signals to processes outside the sandbox.
- Python-level guards: fork/exec/spawn/system/subprocess/socket/kill raise.

Layers the OS refuses are skipped silently; the Python guards and rlimits always apply.
`passed` needs exit code 0 *and* a random per-run sentinel the wrapper prints after the
program returned normally, so `sys.exit(0)` / `os._exit(0)` before the tests cannot pass.
The sentinel reaches the wrapper on stdin, which is closed before the program starts; code
that deliberately walks the interpreter's frames could still find it - this stops accidents
and naive reward hacks, not a determined attacker inside one interpreter.
"""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 10  # RLIMIT_CPU
    memory_mb: int = 1024  # RLIMIT_AS
    max_processes: int = 64  # RLIMIT_NPROC (per-run uid when started as root)
    max_file_mb: int = 16  # RLIMIT_FSIZE: largest single file (and stdout/stderr)
    max_output_kb: int = 64  # captured stdout/stderr kept in the result
    max_disk_mb: int = 64  # tmpfs size of the working directory (root only)


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "error" (the sandbox itself failed)
    returncode: Optional[int]
    stdout: str
    stderr: str
    seconds: float


_SETUP_FAILED = 121  # wrapper exit code when a layer that should work did not
_UID_BASE, _UID_SLOTS = 0x3F000000, 512  # per-run uids, far from any real account

# The wrapper: starts as the caller (root here), reads the sentinel, confines itself, drops
# privileges, then execs the program in a fresh namespace and prints the sentinel last.
_CHILD = r'''
import builtins, ctypes, json, linecache, os, resource, sys, traceback

def _check(ret, what):
    if ret < 0:
        raise OSError(ctypes.get_errno(), what)

def _landlock(libc, cfg):
    abi = libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # ruleset version
    if abi < 1:
        return
    fs = (1 << (13, 14, 15, 15, 16)[min(abi, 5) - 1]) - 1  # every fs right this ABI knows
    attr = (ctypes.c_uint64 * 3)(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)  # +tcp, +scopes
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    rs = libc.syscall(444, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    _check(rs, "landlock_create_ruleset")
    class Beneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]
    file_ok = 1 | 2 | 4 | (1 << 14) | (1 << 15)  # rights a rule on a plain file may carry
    rules = [(cfg["work"], fs & ~1)] + [(p, 4 | 8) for p in cfg["read"]]
    rules += [("/dev/null", 2 | 4 | (1 << 14)), ("/dev/urandom", 4), ("/dev/zero", 4)]
    for path, rights in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        rights &= fs if os.path.isdir(path) else fs & file_ok
        _check(libc.syscall(445, ctypes.c_int(rs), ctypes.c_int(1),
                            ctypes.byref(Beneath(rights, fd)), ctypes.c_uint32(0)), path)
        os.close(fd)
    _check(libc.syscall(446, ctypes.c_int(rs), ctypes.c_uint32(0)), "landlock_restrict_self")
    os.close(rs)

def _setup(cfg):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    for name, n in (("CPU", cfg["cpu"]), ("AS", cfg["mem"]), ("NPROC", cfg["nproc"]),
                    ("FSIZE", cfg["fsize"]), ("CORE", 0)):
        try:
            resource.setrlimit(getattr(resource, "RLIMIT_" + name), (n, n + (name == "CPU")))
        except (ValueError, OSError):
            if cfg["linux"]:
                raise
    if not cfg["linux"]:
        return os.chdir(cfg["work"])
    uid = cfg["uid"]
    if uid is not None:
        if libc.unshare(0x40000000 | 0x00020000) == 0:  # CLONE_NEWNET | CLONE_NEWNS
            _check(libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None), "private /")
            opts = f"size={cfg['disk']}m,mode=0700,uid={uid},gid={uid}".encode()
            _check(libc.mount(b"tmpfs", cfg["work"].encode(), b"tmpfs", 2 | 4, opts), "tmpfs")
        else:
            libc.unshare(0x40000000)
        _check(libc.prctl(8, 1, 0, 0, 0), "PR_SET_KEEPCAPS")
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        # keep only CAP_DAC_READ_SEARCH; where refused, no capability at all (never the kept set)
        hdr, caps = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)(4, 4, 0, 0, 0, 0)
        if libc.capset(hdr, caps) != 0:
            _check(libc.capset(hdr, (ctypes.c_uint32 * 6)()), "capset")
    os.chdir(cfg["work"])
    _check(libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    _landlock(libc, cfg)

def _guard():
    import _posixsubprocess, socket
    def deny(*args, **kwargs):
        raise PermissionError("not allowed in the sandbox")
    class NoSocket(socket.socket):  # a class, so that ssl/asyncio can still subclass it
        __init__ = deny
    for name in dir(os):
        if name.startswith(("exec", "spawn", "fork", "posix_spawn")) or name in (
                "system", "popen", "kill", "killpg", "vfork"):
            setattr(os, name, deny)
    _posixsubprocess.fork_exec = deny  # subprocess, multiprocessing's spawn
    socket.socket = NoSocket

def _main():
    sentinel = sys.stdin.readline().strip()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    cfg = json.loads(sys.argv[1])
    with open(cfg["program"], encoding="utf-8") as f:
        src = f.read()
    try:
        _setup(cfg)
        _guard()
    except BaseException as e:
        print(f"sandbox setup failed: {e!r}", file=sys.stderr, flush=True)
        os._exit(121)  # _SETUP_FAILED
    linecache.cache[cfg["program"]] = (len(src), None, src.splitlines(True), cfg["program"])
    ns = {"__name__": "__sandbox__", "__file__": cfg["program"], "__builtins__": builtins}
    sys.argv = [cfg["program"]]
    code = 0
    try:
        exec(compile(src, cfg["program"], "exec"), ns)
    except SystemExit as e:
        print(f"program called exit({e.code!r}) before it finished", file=sys.stderr)
        code = 1
    except BaseException as e:
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # skip this frame
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    if code == 0:
        os.write(1, ("\n" + sentinel + "\n").encode())
    os._exit(code)

_main()
'''


def _read_paths() -> list[str]:
    """What the program may read under Landlock: the interpreter, its venv, system libraries."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             "/usr", "/lib", "/lib64", "/etc/ld.so.cache", "/etc/localtime"}
    return sorted(os.path.realpath(p) for p in paths)


def _proc_uid(pid: str) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return None
    return None if fields.get("State", "").strip().startswith("Z") else int(fields["Uid"].split()[0])


def _kill_uid(uid: int) -> None:
    """SIGKILL every live process of `uid` until none is left (catches setsid'd escapees)."""
    for _ in range(200):
        pids = [p for p in os.listdir("/proc") if p.isdigit() and _proc_uid(p) == uid]
        if not pids:
            return
        for p in pids:
            try:
                os.kill(int(p), signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.005)


@contextmanager
def _uid_slot() -> Iterator[Optional[int]]:
    """A uid no other sandbox run (in any process) holds; None when we cannot switch uids."""
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        yield None
        return
    lockdir = os.path.join(tempfile.gettempdir(), "transformer2-sandbox-uids")
    os.makedirs(lockdir, mode=0o700, exist_ok=True)
    start = secrets.randbelow(_UID_SLOTS)
    for k in range(_UID_SLOTS):
        i = (start + k) % _UID_SLOTS
        fd = os.open(os.path.join(lockdir, str(i)), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            _kill_uid(_UID_BASE + i)  # leftovers of a crashed host
            yield _UID_BASE + i
        finally:
            os.close(fd)
        return
    raise RuntimeError("no free sandbox uid slot")


def _start(program: str, limits: SandboxLimits, outer: str, uid: Optional[int], out, err):
    work = os.path.join(outer, "work")
    os.mkdir(work, 0o700)
    if uid is not None:
        os.chown(work, uid, uid)
        os.chmod(outer, 0o711)
    prog = os.path.join(outer, "program.py")
    with open(prog, "w", encoding="utf-8") as f:
        f.write(program)
    cfg = dict(program=prog, work=work, uid=uid, read=_read_paths(),
               linux=sys.platform.startswith("linux"), cpu=int(limits.cpu_s),
               mem=int(limits.memory_mb) << 20, nproc=int(limits.max_processes),
               fsize=int(limits.max_file_mb) << 20, disk=int(limits.max_disk_mb))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": os.environ.get("LANG", "C.UTF-8"),
           "HOME": work, "TMPDIR": work, "PYTHONHASHSEED": "0"}
    return subprocess.Popen([sys.executable, "-I", "-c", _CHILD, json.dumps(cfg)],
                            stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=work, env=env,
                            start_new_session=True, close_fds=True)


def run_python(program: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `program` in a fresh sandboxed interpreter; never raises for anything it does."""
    t0 = time.monotonic()
    outer = tempfile.mkdtemp(prefix="t2-sandbox-")
    try:
        with _uid_slot() as uid, tempfile.TemporaryFile(dir=outer) as out, \
                tempfile.TemporaryFile(dir=outer) as err:
            try:
                proc = _start(program, limits, outer, uid, out, err)
            except OSError as e:
                return SandboxResult(False, "error", None, "", f"sandbox could not start: {e!r}",
                                     time.monotonic() - t0)
            sentinel, timed_out = secrets.token_hex(16), False
            try:
                try:
                    proc.stdin.write(f"{sentinel}\n".encode())
                    proc.stdin.close()
                except OSError:
                    pass  # the wrapper died before reading; its exit status says why
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:  # kill the group and, as root, every process of the run's uid
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                if uid is not None:
                    _kill_uid(uid)
                proc.wait()
            seconds, rc = time.monotonic() - t0, proc.returncode
            # Read through our own handles: the program cannot swap the files under us.
            cap = (int(limits.max_file_mb) << 20) + 4096
            stdout, stderr = (f.seek(0) or f.read(cap).decode("utf-8", "replace") for f in (out, err))
    finally:
        shutil.rmtree(outer, ignore_errors=True)
    mark = f"\n{sentinel}\n"
    if timed_out or rc == -signal.SIGXCPU:
        status = "timeout"
    elif rc == _SETUP_FAILED and stderr.startswith("sandbox setup failed"):
        status = "error"
    else:
        status = "passed" if rc == 0 and mark in stdout else "failed"
    keep = limits.max_output_kb * 1024
    return SandboxResult(status == "passed", status, rc, stdout.replace(mark, "")[:keep],
                         stderr[:keep], seconds)


def run_many(programs: Sequence[str], limits: SandboxLimits = SandboxLimits(),
             workers: int = 2) -> list[SandboxResult]:
    """`run_python` over many programs, `workers` at a time; results in input order."""
    if not programs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda p: run_python(p, limits), programs))
