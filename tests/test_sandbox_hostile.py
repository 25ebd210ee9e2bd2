"""Hostile programs against the sandbox, as root and (re-run below) as an unprivileged user.

Every case is scored failed unless it truly passes (the few honest controls), finishes
within its limit + 2 s, leaves no process behind, reaches none of the servers the test
runs on the host (pathname / abstract UNIX socket, UDP, TCP), changes no file outside,
and leaves the caller and a bystander process alive. Containment programs assert that
their attack worked, so a pass would mean an escape; forgery cases run through
`run_tests`, whose verdict must not be fakeable.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import psutil
import pytest

from transformer2.sandbox import SandboxLimits, SandboxResult, host, layers, run_python, run_tests

ROOT = Path(__file__).resolve().parents[1]
MARK = "t2h" + uuid.uuid4().hex[:10]  # 13 chars: fits a process name (comm) whole
L = SandboxLimits(timeout_s=4.0, cpu_s=2, memory_mb=512, max_disk_mb=16)
LOOP = SandboxLimits(timeout_s=1.0, cpu_s=5)
UNPRIV = os.geteuid() != 0
CT = "import ctypes, os, sys\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.syscall.restype = ctypes.c_long\n"
TESTS = "assert f(2) == 4\nassert f(3) == 6\nassert f(-1) == -2\n"
HONEST = "\ndef f(x):\n    return 2 * x\n"


@dataclass
class Case:
    id: str
    code: str  # the program (run_python) or the candidate (run_tests); dedented
    kinds: tuple = ("program",)  # "program": run_python(code); "tests": run_tests(code, tests)
    tests: str = TESTS
    setup: str = ""
    prelude: str = ""
    limits: SandboxLimits = L
    passes: bool = False  # honest controls only
    skip_layers: tuple = ()  # tests only: drop a layer to show the ones below it hold
    needs: str = ""  # the layer this case's guarantee rests on (skipped where the kernel lacks it)
    check: Optional[Callable[[SandboxResult], None]] = None

    def __post_init__(self):
        self.code = textwrap.dedent(self.code)


def ct(block: str) -> str:
    """`block` (dedented) after the ctypes preamble."""
    return CT + textwrap.dedent(block)


def _number(r: SandboxResult, key: str) -> int:
    return int(next(line.split()[1] for line in r.stdout.splitlines() if line.startswith(key + " ")))


def at_most(key: str, limit: int):
    def check(r):
        assert _number(r, key) <= limit, r.stdout
    return check


def all_eperm(r, ok=frozenset({1})):
    errs = eval(next(line for line in r.stdout.splitlines() if line.startswith("errnos "))[7:])
    assert errs and set(errs) <= ok, errs  # EPERM: refused by the seccomp filter, not by accident


def raw(calls: str, ok=frozenset({1})) -> dict:
    """Raw syscalls: t() records each result's errno; the program passes if any call worked,
    and every refusal must be seccomp's EPERM."""
    code = CT + "res, errs = [], []\ndef t(r):\n    res.append(r)\n"
    code += "    errs.append(ctypes.get_errno() if r < 0 else 0)\n"
    code += textwrap.dedent(calls) + "print('errnos', [e for e in errs if e])\nassert any(v >= 0 for v in res), errs\n"
    return dict(code=code, needs="seccomp", check=lambda r: all_eperm(r, ok))


FORK_SETSID = ct("""
import time
for _ in range(5):
    pid = libc.fork()
    if pid == 0:
        libc.setsid()
        libc.prctl(15, b'@MARK@', 0, 0, 0)
        libc.fork()
        while True:
            time.sleep(0.05)
assert pid > 0, ctypes.get_errno()
time.sleep(0.3)
""")
FORK_BOMB = ct("""
import time
for _ in range(300):
    if libc.fork() == 0:
        libc.setsid()
        libc.prctl(15, b'@MARK@', 0, 0, 0)
        while True:
            libc.fork()
            time.sleep(0.01)
time.sleep(0.3)
assert False, 'planted'
""")

CASES = [
    # ------------------------------------------------------------ honest controls
    Case("honest", HONEST, kinds=("tests",), passes=True),
    Case("honest-busy-daemon-thread", """
        import threading
        threading.Thread(target=lambda: [0 for _ in iter(int, 1)], daemon=True).start()
        print('x' * 1000)
        def f(x):
            return 2 * x
        """, kinds=("tests",), passes=True),
    Case("honest-class-and-setup", """
        class Node:
            def __init__(self, v):
                self.v, self.left = v, None
        def depth(n):
            return 0 if n is None else 1 + depth(n.left)
        """, kinds=("tests",), setup="root = Node(1)\nroot.left = Node(2)\n",
         tests="assert depth(root) == 2\nassert root.left.v == 2\n", passes=True),
    Case("honest-expected-exception", """
        def f(x):
            if x < 0:
                raise ValueError(x)
            return 2 * x
        """, kinds=("tests",), passes=True,
         tests="try:\n    f(-1)\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError\n"
               "assert list(map(f, [1, 2])) == [2, 4]\n"),

    # ------------------------------------------------------------ forged verdicts (run_tests)
    Case("frame-walk-sentinel", """
        import gc, os, sys
        def f(x):  # print every 32-hex-digit string it can find (a sentinel), then exit 0
            for o in gc.get_objects():
                if isinstance(o, dict):
                    for v in list(o.values()):
                        if isinstance(v, str) and len(v) == 32:
                            print('\\n' + v + '\\n')
            fr = sys._getframe()
            while fr:
                for v in list(fr.f_locals.values()):
                    if isinstance(v, str) and len(v) == 32:
                        print('\\n' + v + '\\n')
                fr = fr.f_back
            sys.stdout.flush()
            os._exit(0)
        """, kinds=("tests",)),
    Case("settrace-flips-locals", """
        import ctypes, sys, threading
        def tracer(frame, event, arg):  # flip whatever looks like a verdict, in every frame
            for k in ('code', 'passed', 'ok', 'failed', 'broken', 'status'):
                if k in frame.f_locals:
                    frame.f_locals[k] = 0 if k == 'code' else (k in ('passed', 'ok'))
                    ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))
            return tracer
        sys.settrace(tracer)
        threading.settrace(tracer)
        def f(x):
            return x
        """, kinds=("tests",)),
    Case("replaced-traceback-and-hooks", """
        import builtins, sys, traceback
        traceback.print_exception = lambda *a, **k: None
        traceback.format_exception = lambda *a, **k: []
        sys.excepthook = lambda *a: None
        builtins.AssertionError = type('AssertionError', (Exception,), {})
        builtins.print = lambda *a, **k: None
        def f(x):
            return x
        """, kinds=("tests",)),
    Case("always-true-eq-object", """
        class Yes:
            __hash__ = object.__hash__
            def __eq__(self, other):
                return True
            def __bool__(self):
                return True
        def f(x):
            return Yes()
        """, kinds=("tests",)),
    Case("always-true-eq-int-subclass", """
        class I(int):
            __hash__ = int.__hash__
            def __eq__(self, other):
                return True
        def f(x):
            return I(0)
        """, kinds=("tests",)),
    Case("always-true-eq-list-subclass", """
        class L(list):
            def __eq__(self, other):
                return True
        def f(x):
            return L()
        """, kinds=("tests",), tests="assert f(2) == [4]\n"),
    Case("mock-any", "from unittest import mock\ndef f(x):\n    return mock.ANY\n", kinds=("tests",)),
    Case("truthy-object", """
        class T:
            def __bool__(self):
                return True
        def is_even(x):
            return T()
        """, kinds=("tests",), tests="assert is_even(4)\nassert not is_even(3)\n"),
    Case("never-ne", """
        class N:
            def __eq__(self, o):
                return True
            def __ne__(self, o):
                return False
        def f(x):
            return N()
        """, kinds=("tests",), tests="assert not (f(2) != 4)\n"),
    Case("exit-0-at-load", "import sys\nsys.exit(0)\n" + HONEST, kinds=("tests",)),
    Case("os-exit-0-at-load", "import os\nos._exit(0)\n" + HONEST, kinds=("tests",)),
    Case("system-exit-in-call", "def f(x):\n    raise SystemExit(0)\n", kinds=("tests",)),
    Case("os-exit-in-call", "import os\ndef f(x):\n    os._exit(0)\n", kinds=("tests",)),
    Case("libc-exit-in-call", CT + "def f(x):\n    libc._exit(0)\n", kinds=("tests",)),
    Case("keyboard-interrupt-in-call", "def f(x):\n    raise KeyboardInterrupt\n", kinds=("tests",)),
    Case("stop-iteration-cuts-all-map", "def f(x):\n    raise StopIteration\n", kinds=("tests",),
         tests="assert all(map(lambda v: f(v) == 2 * v, [1, 2, 3]))\n"),
    Case("raises-what-a-test-expects", "def f(x):\n    raise ValueError(x)\n", kinds=("tests",),
         tests="try:\n    f(-1)\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError\nassert f(2) == 4\n"),
    Case("fake-builtin-abs", "def abs(x):\n    return 0\ndef f(x):\n    return 0\n", kinds=("tests",),
         tests="assert abs(f(2) - 4) < 1e-9\n"),
    Case("fake-math-module", "class math:\n    isclose = staticmethod(lambda *a, **k: True)\ndef f(x):\n    return 0\n",
         kinds=("tests",), tests="assert math.isclose(f(2), 4.0)\n"),
    Case("fake-prelude-helper", "def poly(xs, x):\n    return 0\ndef find_zero(xs):\n    return 123.0\n",
         kinds=("tests",), prelude="def poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\n",
         tests="assert abs(poly([1, 2], find_zero([1, 2]))) < 1e-6\n"),
    Case("patched-reply-encoder", """
        import sys
        for name, m in list(sys.modules.items()):  # every reply the child sends becomes 4
            if name.endswith('sandbox.wire'):
                m.encode = lambda x, other, depth=0: 4
        def f(x):
            return x
        """, kinds=("tests",)),
    Case("forged-reply-frames", """
        import json, os, struct, threading
        def flood():  # well-formed replies saying 4, on every fd, before and during the calls
            msg = json.dumps({'v': 4}).encode()
            for fd in range(3, 30):
                try:
                    for _ in range(50):
                        os.write(fd, struct.pack('>I', len(msg)) + msg)
                except OSError:
                    pass
        threading.Thread(target=flood).start()
        def f(x):
            return 4
        """, kinds=("tests",)),
    Case("garbage-on-every-fd", """
        import os
        def f(x):
            for fd in range(64):
                try:
                    os.write(fd, b'\\xff' * 64 + b'passed\\n')
                except OSError:
                    pass
            return 2 * x if x == 2 else 0
        """, kinds=("tests",)),
    Case("reads-the-tests", """
        import gc, os, re
        def f(x):  # look for 'f(x) == N' in its memory, /proc and the file system
            texts = [o for o in gc.get_objects() if isinstance(o, str)]
            for top in ('/proc', '/tmp', '/'):
                try:
                    for name in os.listdir(top):
                        try:
                            texts.append(open(os.path.join(top, name, 'cmdline')).read())
                        except OSError:
                            pass
                except OSError:
                    pass
            for t in texts:
                m = re.search(r'f\\(' + str(x) + r'\\) == (-?\\d+)', t)
                if m:
                    return int(m.group(1))
        """, kinds=("tests",)),
    Case("kills-every-other-pid", ct("""
        def f(x):
            for pid in range(1, 4096):
                if pid != os.getpid():
                    libc.kill(pid, 9)
            return 2 * x if x == 2 else 0
        """), kinds=("tests",)),
    Case("deep-nesting", "def f(x):\n    v = []\n    for _ in range(100000):\n        v = [v]\n    return v\n",
         kinds=("tests",)),
    Case("self-referential", "def f(x):\n    v = [2 * x]\n    v.append(v)\n    return v\n", kinds=("tests",),
         tests="assert f(2)[0] == 4 and f(2)[1] is None\n"),
    Case("huge-reply", "def f(x):\n    return 'x' * (40 << 20)\n", kinds=("tests",)),
    Case("iterator-not-a-value", "def f(x):\n    return iter([2 * x])\n", kinds=("tests",)),

    # ------------------------------------------------------------ sockets
    Case("unix-socket-module", "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect(@SOCK@)\n"),
    Case("unix-socket-raw", """
        import _socket
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        s.settimeout(1)
        s.connect(@SOCK@)
        s.send(b'@MARK@')
        """, kinds=("program", "tests")),
    Case("unix-socket-ctypes", ct("""
        class SA(ctypes.Structure):
            _fields_ = [('family', ctypes.c_ushort), ('path', ctypes.c_char * 108)]
        fd = libc.socket(1, 1, 0)
        assert fd >= 0, ctypes.get_errno()
        a = SA(1, @SOCK@.encode())
        assert libc.connect(fd, ctypes.byref(a), ctypes.sizeof(a)) == 0, ctypes.get_errno()
        """)),
    Case("unix-socket-abstract", """
        import _socket
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        s.settimeout(1)
        s.connect('\\0@MARK@')
        s.send(b'x')
        """),
    Case("udp-via-_socket", """
        import _socket
        s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
        for _ in range(5):
            s.sendto(b'@MARK@', ('127.0.0.1', @UDP@))
        """, kinds=("program", "tests")),
    Case("tcp-via-sockettype", """
        import socket
        s = socket.SocketType(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(1)
        s.connect(('127.0.0.1', @TCP@))
        s.send(b'@MARK@')
        """),
    Case("socketpair-netlink-packet-inet6", **raw("""
        t(libc.socketpair(1, 1, 0, (ctypes.c_int * 2)()))
        t(libc.socket(16, 3, 0))
        t(libc.socket(17, 3, 768))
        t(libc.socket(2, 2, 0))
        t(libc.socket(10, 1, 0))
        """)),

    # ------------------------------------------------------------ processes
    Case("raw-fork-setsid-survivors", FORK_SETSID, kinds=("program", "tests")),
    Case("raw-fork-setsid-survivors-without-seccomp", FORK_SETSID + "assert False, 'planted'\n",
         skip_layers=("seccomp",), needs="pidns"),
    Case("raw-clone-fork-vfork-syscalls", **raw("""
        calls = ((57, ()), (58, ()), (56, (17, 0, 0, 0, 0)), (56, (0x10000000 | 17, 0, 0, 0, 0)), (435, (0, 0)))
        for nr, args in calls:  # fork, vfork, clone, clone(CLONE_NEWUSER), clone3
            pid = libc.syscall(nr, *args)
            if pid == 0:
                libc.prctl(15, b'@MARK@', 0, 0, 0)
                while True:
                    pass
            t(pid)
        """, ok={1, 38})),  # clone3 says ENOSYS, so libc falls back to clone
    Case("posix-fork-bypassing-guard", """
        import posix, time
        pid = posix.fork()
        if pid == 0:
            posix.setsid()
            while True:
                time.sleep(0.05)
        """),
    Case("raw-fork-bomb", FORK_BOMB),
    Case("raw-fork-bomb-without-seccomp", FORK_BOMB, skip_layers=("seccomp",), needs="pidns"),
    Case("python-fork-bomb", "import os\nwhile True:\n    os.fork()\n"),
    Case("thread-bomb", """
        import threading, time
        n = 0
        try:
            while True:
                threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
                n += 1
        except RuntimeError:
            pass
        print('threads', n)
        assert n > 5000
        """, check=at_most("threads", L.max_processes)),
    Case("exec-shell-via-ctypes", ct("""
        argv = (ctypes.c_char_p * 4)(b'sh', b'-c', b'echo x > /tmp/@MARK@-out', None)
        libc.execv(b'/bin/sh', argv)
        assert False, ctypes.get_errno()
        """)),
    Case("subprocess-and-system", """
        import os, subprocess
        try:
            os.system('echo x > /tmp/@MARK@-out')
        except PermissionError:
            pass
        subprocess.run(['sh', '-c', 'echo x > /tmp/@MARK@-out'])
        """),
    Case("leave-process-group", **raw("t(libc.setsid())\nt(libc.setpgid(0, 0))\n")),

    # ------------------------------------------------------------ memory
    Case("memfd-growth", """
        import os
        fds = []
        for _ in range(400):  # 400 x 16 MiB, far past memory_mb
            fds.append(os.memfd_create('@MARK@'))
            for i in range(16):
                os.pwrite(fds[-1], b'x' * (1 << 20), i << 20)
        """),
    Case("memfd-raw-syscall", **raw("t(libc.syscall(319, b'@MARK@', 0))\nt(libc.syscall(447, 0))\n")),
    Case("posix-shm-growth", """
        from multiprocessing import shared_memory
        m = shared_memory.SharedMemory(name='@MARK@-out', create=True, size=2 << 30)
        m.buf[::4096] = b'x' * len(m.buf[::4096])
        """),
    Case("sysv-shm-msg-sem", **raw("""
        t(libc.syscall(29, 0, 2 << 30, 0o1600))
        t(libc.syscall(68, 0, 0o1600))
        t(libc.syscall(64, 0, 1, 0o1600))
        """)),
    Case("anonymous-mmap-growth", """
        import mmap
        maps, total = [], 0
        try:
            while total < (4 << 30):
                maps.append(mmap.mmap(-1, 64 << 20))
                total += 64 << 20
        except (OSError, MemoryError, ValueError):
            pass
        print('mapped_mb', total >> 20)
        assert total >= 4 << 30
        """, check=at_most("mapped_mb", L.memory_mb)),
    Case("io-uring-bpf-userfaultfd-keyring-perf", **raw("""
        buf = ctypes.create_string_buffer(256)
        t(libc.syscall(425, 8, buf))
        t(libc.syscall(321, 0, buf, 72))
        t(libc.syscall(323, 0))
        t(libc.syscall(250, 0, -3, 0))
        t(libc.syscall(298, buf, 0, -1, -1, 0))
        """)),
    Case("pipe-buffers", """
        import fcntl, os
        n = 0
        try:
            while True:
                r, w = os.pipe()
                fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
                os.set_blocking(w, False)
                try:
                    while True:
                        n += os.write(w, b'x' * 65536)
                except BlockingIOError:
                    pass
        except OSError:
            pass
        print('pipes_mb', n >> 20)
        assert n > (600 << 20)
        """, check=at_most("pipes_mb", L.max_open_files)),

    # ------------------------------------------------------------ files and disk
    Case("fd-exhaustion", """
        import os
        fds = []
        try:
            while True:
                fds.append(os.open('/dev/null', os.O_RDONLY))
        except OSError:
            pass
        print('fds', len(fds))
        assert len(fds) > 1000
        """, check=at_most("fds", L.max_open_files)),
    Case("disk-fill", """
        total = 0
        try:
            for i in range(1000):
                with open(f'f{i}', 'wb') as f:
                    for _ in range(4):
                        f.write(b'x' * (1 << 20))
                        total += 1 << 20
        except OSError as e:
            print(e)
        print('written_mb', total >> 20)
        assert total > (64 << 20)
        """, kinds=("program", "tests"), needs="tmpfs", check=at_most("written_mb", L.max_disk_mb + 4)),
    Case("inode-exhaustion", """
        n = 0
        try:
            while n < 100000:
                open(f'i{n}', 'w').close()
                n += 1
        except OSError:
            pass
        print('files', n)
        assert n >= 100000
        """, needs="tmpfs", check=at_most("files", 4096)),
    Case("writes-outside", """
        import os
        ok = []
        for d in ('/tmp', '/var/tmp', '/dev/shm', @ROOT@, '/root', @HOME@, '/'):
            p = os.path.join(d, '@MARK@-out')
            for write in (lambda: open(p, 'w').write('x'),
                          lambda: os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o666))):
                try:
                    write()
                    ok.append(p)
                except OSError:
                    pass
        assert ok
        """, kinds=("program", "tests")),
    Case("canary-tampering", """
        import os
        c = @CANARY@
        attacks = {
            'append': lambda: open(c, 'a').write('pwned'),
            'truncate': lambda: os.truncate(c, 0),
            'chmod': lambda: os.chmod(c, 0o777),
            'utime': lambda: os.utime(c, (0, 0)),
            'xattr': lambda: os.setxattr(c, 'user.t2', b'x'),
            'rename': lambda: os.rename(c, 'stolen'),
            'unlink': lambda: os.unlink(c),
            'hardlink': lambda: (os.link(c, 'hard'), open('hard', 'a').write('pwned')),
            'symlink': lambda: (os.symlink(c, 'soft'), open('soft', 'a').write('pwned')),
            'replace': lambda: (open('new', 'w').write('pwned'), os.replace('new', c)),
        }
        hits = []
        for name, attack in attacks.items():
            try:
                attack()
                hits.append(name)
            except OSError:
                pass
        assert hits
        """),
    Case("reads-secrets", """
        hits = []
        for p in ('/etc/shadow', '/etc/passwd', '/root/.bashrc', '/proc/1/environ', '/proc/self/mountinfo',
                  @ROOT@ + '/pyproject.toml', @CANARY@):
            try:
                open(p).read(1)
                hits.append(p)
            except OSError:
                pass
        assert hits
        """, needs="landlock"),
    Case("open-by-handle", **raw("""
        h = ctypes.create_string_buffer(136)
        ctypes.c_uint.from_buffer(h).value = 128
        mnt = ctypes.c_int()
        t(libc.name_to_handle_at(-100, b'/etc/shadow', h, ctypes.byref(mnt), 0))
        t(libc.open_by_handle_at(-100, h, 0))
        """)),
    Case("namespaces-mounts-chroot", **raw("""
        t(libc.unshare(0x10000000))
        t(libc.unshare(0x20000))
        t(libc.chroot(b'.'))
        t(libc.mount(b'none', b'.', b'tmpfs', 0, None))
        t(libc.syscall(308, 0, 0))
        """)),
    Case("huge-stdout", "import sys\nfor _ in range(64):\n    sys.stdout.write('x' * (1 << 20))\n",
         check=lambda r: len(r.stdout) <= L.max_output_kb * 1024),

    # ------------------------------------------------------------ signals, tracing, the host
    Case("signals-to-parent-host-bystander", ct("""
        hits = []
        for pid in (os.getppid(), 1, @HOST@, @BYSTANDER@):
            if libc.kill(pid, 0) == 0 and libc.kill(pid, 9) == 0:
                hits.append(pid)
        if libc.kill(-1, 9) == 0:
            hits.append(-1)
        assert hits
        """)),
    Case("guarded-kill-of-parent", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"),
    Case("pidfd-signal-host", ct("""
        hits = []
        for pid in (@HOST@, @BYSTANDER@, os.getppid()):
            fd = libc.syscall(434, pid, 0)
            if fd >= 0 and libc.syscall(424, fd, 9, None, 0) == 0:
                hits.append(pid)
        assert hits
        """)),
    Case("ptrace-and-process-vm", **raw("""
        for pid in (os.getppid(), 1, @HOST@, @BYSTANDER@):
            t(libc.ptrace(16, pid, 0, 0))
        buf = ctypes.create_string_buffer(8)
        iov = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)
        t(libc.process_vm_readv(os.getppid(), iov, 1, iov, 1, 0))
        t(libc.process_vm_writev(1, iov, 1, iov, 1, 0))
        """)),
    Case("prlimit-on-init-and-raise-own", ct("""
        import resource
        hits = []
        if libc.prlimit(1, 7, (ctypes.c_ulong * 2)(1, 1), None) == 0:
            hits.append('init')
        try:
            resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)
            hits.append('AS')
        except (ValueError, OSError):
            pass
        assert hits
        """)),
    Case("write-to-tty", "open('/dev/tty', 'w').write('x')\n"),

    # ------------------------------------------------------------ time
    Case("cpu-loop", "while True:\n    pass\n", limits=LOOP),
    Case("sleep-forever", "import time\ntime.sleep(10 ** 6)\n", limits=LOOP),
    Case("ignore-sigxcpu-and-loop", "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile 1:\n    pass",
         limits=SandboxLimits(timeout_s=1.5, cpu_s=1)),
    Case("stop-itself", CT + "libc.kill(os.getpid(), 19)\n", limits=LOOP),
    Case("hang-in-call", "def f(x):\n    while True:\n        pass\n", kinds=("tests",), limits=LOOP),
]


# ---------------------------------------------------------------- the hostile environment

class Env:
    """Servers, a canary file and a bystander process on the host, and a private temp dir
    under which every sandbox run of this module lives (so its processes are recognisable)."""

    def __init__(self):
        self.base = Path(tempfile.mkdtemp(prefix=f"{MARK}-env-"))
        os.chmod(self.base, 0o755)
        self.runs = self.base / "runs"
        self.runs.mkdir(mode=0o711)
        os.chmod(self.runs, 0o711)
        self.hits: list = []
        self.stop = threading.Event()
        self.sock_path = str(self.base / "s.sock")
        unix = socket.socket(socket.AF_UNIX)
        unix.bind(self.sock_path)
        os.chmod(self.sock_path, 0o777)  # a non-owner could connect, were it not for the sandbox
        abstract = socket.socket(socket.AF_UNIX)
        abstract.bind("\0" + MARK)
        tcp = socket.socket()
        tcp.bind(("127.0.0.1", 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.settimeout(0.1)
        self.servers = [unix, abstract, tcp]
        for s in self.servers:
            s.listen(16)
            s.settimeout(0.1)
        self.threads = [threading.Thread(target=self._accept, args=(s,), daemon=True) for s in self.servers]
        self.threads.append(threading.Thread(target=self._recv, daemon=True))
        for t in self.threads:
            t.start()
        self.canary = self.base / f"{MARK}-canary"
        self.canary.write_text("canary\n")
        os.chmod(self.canary, 0o666)  # writable by anyone, were it not for the sandbox
        self.bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        self.me, self.background = os.getpid(), []
        self.baseline = {p.pid for p in psutil.process_iter() if self._mine(p)}
        self.subs = {"@SOCK@": repr(self.sock_path), "@UDP@": str(self.udp.getsockname()[1]),
                     "@TCP@": str(tcp.getsockname()[1]), "@MARK@": MARK, "@CANARY@": repr(str(self.canary)),
                     "@ROOT@": repr(str(ROOT)), "@HOME@": repr(os.environ.get("HOME", "/")),
                     "@HOST@": str(self.me), "@BYSTANDER@": str(self.bystander.pid)}

    def _accept(self, s):
        while not self.stop.is_set():
            try:
                conn, _ = s.accept()
                self.hits.append(("connect", s.getsockname()))
                conn.close()
            except OSError:
                pass

    def _recv(self):
        while not self.stop.is_set():
            try:
                self.hits.append(("udp", self.udp.recv(100)))
            except OSError:
                pass

    def _mine(self, p) -> bool:
        try:
            return UNPRIV and p.uids().real == os.getuid()
        except psutil.Error:
            return False

    def program(self, code: str) -> str:
        for key, value in self.subs.items():
            code = code.replace(key, value)
        return code

    def snapshot(self):
        st = self.canary.stat()
        return self.canary.read_bytes(), st.st_mode, st.st_mtime_ns, st.st_uid

    def leftovers(self) -> list:
        """Live processes of our runs: by run directory in the command line, by process name,
        by children of this process, and (unprivileged) by uid: no one else runs as ours."""
        out, ignored = [], self.ignore()
        for p in psutil.process_iter():
            try:
                if p.pid == self.me or p.pid in ignored or p.status() == psutil.STATUS_ZOMBIE:
                    continue
                cmd = " ".join(p.cmdline())
                if str(self.runs) in cmd or MARK in cmd or p.name().startswith(MARK) or \
                        (self._mine(p) and p.pid not in self.baseline):
                    out.append((p.pid, p.name(), cmd[:80]))
            except psutil.Error:
                pass
        for c in psutil.Process().children(recursive=True):
            try:
                if c.pid not in ignored and c.status() != psutil.STATUS_ZOMBIE:
                    out.append((c.pid, c.name(), "child"))
            except psutil.Error:
                pass
        return out

    def ignore(self) -> set:
        """The bystander and the unprivileged variant running alongside (with its processes)."""
        out = {self.bystander.pid}
        for pid in self.background:
            try:
                out |= {pid} | {c.pid for c in psutil.Process(pid).children(recursive=True)}
            except psutil.Error:
                pass
        return out

    def outside_files(self) -> list:
        dirs = ["/tmp", "/var/tmp", "/dev/shm", str(ROOT), "/root", os.environ.get("HOME", "/"), "/", str(self.base)]
        return [p for d in dirs for p in glob.glob(os.path.join(d, f"*{MARK}-out*"))]

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(1)
        for s in self.servers + [self.udp]:
            s.close()
        self.bystander.kill()
        self.bystander.wait()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory, unprivileged_variant):
    tmp_path_factory.getbasetemp()  # fixed before tempfile's default moves
    e = Env()
    if isinstance(unprivileged_variant, tuple):
        e.background.append(unprivileged_variant[0].pid)
    old = tempfile.tempdir
    tempfile.tempdir = str(e.runs)
    try:
        yield e
    finally:
        tempfile.tempdir = old
        e.close()


def _wait_clean(e: Env) -> list:
    deadline = time.monotonic() + 2.0
    while True:
        left = e.leftovers()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


RESULTS: dict = {}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_hostile_program(case: Case, env: Env, monkeypatch):
    have = layers()
    if case.needs and not any(layer.startswith(case.needs) for layer in have):
        pytest.skip(f"this kernel grants no {case.needs} layer (granted: {have})")
    monkeypatch.setattr(host, "_SKIP_LAYERS", frozenset(case.skip_layers))
    before = env.snapshot()
    for kind in case.kinds:
        code = env.program(case.code)
        t0 = time.monotonic()
        if kind == "program":
            r = run_python(code, case.limits)
        else:
            honest = HONEST if "program" in case.kinds else ""  # a containment program: passes iff it escaped
            r = run_tests(code + honest, env.program(case.tests), setup=case.setup, prelude=case.prelude,
                          limits=case.limits)
        wall = time.monotonic() - t0
        verdict = "false pass" if r.passed and not case.passes else "ok"
        left, files = _wait_clean(env), env.outside_files()
        escaped = bool(left or files or env.hits or env.snapshot() != before or env.bystander.poll() is not None)
        RESULTS[(case.id, kind)] = "escaped" if escaped else "false pass" if verdict != "ok" else "contained"
        assert r.passed is case.passes, (kind, r)
        assert not re.search(r"\b(Syntax|Indentation|Name)Error\b", r.stderr), r.stderr  # failed for real
        assert case.passes or r.status in ("failed", "timeout"), (kind, r)  # not "error": the sandbox ran
        assert wall <= case.limits.timeout_s + 2, (kind, wall, r)
        assert not left, left
        assert not files, files
        assert not env.hits, env.hits
        assert env.snapshot() == before, "the canary changed"
        assert env.bystander.poll() is None and psutil.Process(env.me).is_running()
        if case.check:
            case.check(r)


def test_suite_size_and_counts(env):
    """At least 40 hostile cases across the classes; prints tried / contained / false passes / escaped."""
    hostile = [c for c in CASES if not c.passes]
    assert len(hostile) >= 40
    counts = {k: sum(v == k for v in RESULTS.values()) for k in ("contained", "false pass", "escaped")}
    print(f"\nhostile suite ({'uid %d' % os.getuid()}): tried {len(RESULTS)} runs of {len(CASES)} cases,"
          f" {counts['contained']} contained / clean, {counts['false pass']} false passes, {counts['escaped']} escaped")
    assert counts["false pass"] == counts["escaped"] == 0


# ---------------------------------------------------------------- the same, unprivileged

def _unprivileged_python() -> tuple[Optional[list], str]:
    """A command prefix running Python as uid 65534 that can also start sandbox processes."""
    drop = (["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if shutil.which("setpriv")
            else ["runuser", "-u", "nobody", "--"] if shutil.which("runuser") else None)
    if drop is None:
        return None, "neither setpriv nor runuser is installed"
    site_dirs = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *site_dirs])}
    probe = ("import subprocess, sys; subprocess.run([sys.executable, '-c', 'pass'], check=True);"
             " import pytest, psutil, transformer2.sandbox")
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    tried = []
    for exe in dict.fromkeys([sys.executable, shutil.which(f"python{ver}") or "", f"/usr/bin/python{ver}"]):
        if not exe:
            continue
        r = subprocess.run([*drop, "env", *[f"{k}={v}" for k, v in env.items()], exe, "-c", probe],
                           capture_output=True, text=True, cwd="/", timeout=120)
        if r.returncode == 0:
            return [*drop, "env", *[f"{k}={v}" for k, v in env.items()], exe], ""
        tried.append(f"{exe}: {r.stderr.strip().splitlines()[-1:] or r.returncode}")
    return None, "uid 65534 cannot run Python with this project and its packages: " + "; ".join(tried)


@pytest.fixture(scope="module", autouse=True)
def unprivileged_variant(request):
    """This file again as uid 65534, started first and in the background so that both
    variants run at once; `test_hostile_suite_as_unprivileged_user` collects the result."""
    if UNPRIV or not any(i.name == "test_hostile_suite_as_unprivileged_user" for i in request.session.items):
        yield None
        return
    cmd, why = _unprivileged_python()
    if cmd is None:
        yield why
        return
    home = tempfile.mkdtemp(prefix="t2-unpriv-home-", dir="/tmp")
    os.chown(home, 65534, 65534)
    out = open(os.path.join(home, "out"), "w+")
    args = ["-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-m", "not slow", __file__]
    proc = subprocess.Popen([*cmd[:-1], f"HOME={home}", f"TMPDIR={home}", cmd[-1], *args], cwd=home,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc, out
    finally:
        if proc.poll() is None:  # interrupted: let it clean up (SIGINT runs its teardown), then kill
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        out.close()
        shutil.rmtree(home, ignore_errors=True)


def test_hostile_suite_as_unprivileged_user(unprivileged_variant):
    """The same cases as uid 65534: no root layers, a user namespace instead."""
    if UNPRIV:
        pytest.skip("already unprivileged: this run is the unprivileged variant")
    if not isinstance(unprivileged_variant, tuple):
        pytest.skip(unprivileged_variant)
    proc, out = unprivileged_variant
    proc.wait(timeout=400)
    out.seek(0)
    text = out.read()
    summary = [line for line in text.splitlines() if "hostile suite" in line or " passed" in line]
    print("\n".join(summary))
    assert proc.returncode == 0, text[-8000:]
    assert any("hostile suite (uid 65534)" in line and "0 false passes, 0 escaped" in line for line in summary)
