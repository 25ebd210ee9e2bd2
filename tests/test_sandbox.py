import os
import time
import uuid
from pathlib import Path

import psutil
import pytest

from transformer2 import sandbox
from transformer2.sandbox import SandboxLimits, run_many, run_python

FAST = SandboxLimits(timeout_s=3.0, cpu_s=3)
ROOT = Path(__file__).resolve().parents[1]
CTYPES = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"


def _live_sandbox_processes() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if p.uids().real >= sandbox._UID_BASE and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.fixture(autouse=True)
def no_leftovers():
    yield
    me = psutil.Process()
    assert me.is_running()
    children = [c for c in me.children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE]
    assert children == []
    assert _live_sandbox_processes() == []


def test_passing_program():
    r = run_python("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('hello')", FAST)
    assert (r.passed, r.status, r.returncode) == (True, "passed", 0)
    assert r.stdout == "hello\n" and r.stderr == ""


def test_failing_assertion_is_reported():
    r = run_python("x = 1\nassert x == 2, 'boom'", FAST)
    assert (r.passed, r.status, r.returncode) == (False, "failed", 1)
    assert "AssertionError: boom" in r.stderr and "program.py" in r.stderr


def test_syntax_error_fails():
    assert run_python("def f(:\n", FAST).status == "failed"


@pytest.mark.parametrize("exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)",
                                       "raise SystemExit", "exit()"])
def test_early_exit_before_tests_is_not_a_pass(exit_call):
    r = run_python(f"def f():\n    return 1\n{exit_call}\nassert f() == 2", FAST)
    assert not r.passed and r.status == "failed"


def test_demo_main_block_does_not_run():
    # chat models append `if __name__ == "__main__": main()` demos that read stdin
    r = run_python("def f():\n    return 1\nif __name__ == '__main__':\n    input()\nassert f() == 1", FAST)
    assert r.passed


def test_infinite_loop_times_out():
    r = run_python("while True:\n    pass", SandboxLimits(timeout_s=1.5))
    assert r.status == "timeout" and not r.passed and r.seconds < 5


def test_memory_bomb_fails_host_unharmed():
    r = run_python("x = bytearray(8 << 30)", FAST)
    assert r.status == "failed" and "MemoryError" in r.stderr
    r = run_python("xs = []\nwhile True:\n    xs.append(bytearray(50 << 20))", FAST)
    assert not r.passed and r.status in ("failed", "timeout")


def test_huge_file_stopped_by_fsize():
    r = run_python("with open('big', 'wb') as f:\n    for _ in range(1024):\n        f.write(b'x' * (1 << 20))",
                   FAST)
    assert r.status == "failed" and "File too large" in r.stderr


def test_output_is_capped():
    r = run_python("print('x' * 500_000)", SandboxLimits(max_output_kb=4))
    assert r.passed and len(r.stdout) == 4096


def test_kill_parent_is_contained():
    host = os.getpid()
    assert run_python("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", FAST).status == "failed"
    # below the Python guard: the kernel (other uid / Landlock signal scope) must refuse
    r = run_python(CTYPES + "assert libc.kill(os.getppid(), 9) == 0\nassert libc.kill(1, 0) == 0", FAST)
    assert r.status == "failed"
    assert os.getpid() == host and psutil.Process(host).is_running()


def test_fork_bomb_is_contained():
    for prog in ("import os\nwhile True:\n    os.fork()",
                 "import subprocess\nsubprocess.run(['true'])",
                 "import multiprocessing as mp\np = mp.Process(target=print)\np.start()\np.join()",
                 "import os\nos.system('true')"):
        r = run_python(prog, FAST)
        assert r.status == "failed" and "not allowed in the sandbox" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="RLIMIT_NPROC containment of a raw fork bomb needs a uid switch")
def test_raw_fork_bomb_bypassing_guards_is_limited_and_killed():
    prog = CTYPES + ("import time\nn = 0\nfor _ in range(500):\n    pid = libc.fork()\n"
                     "    if pid == 0:\n        libc.setsid()\n        while True:\n"
                     "            libc.fork(); time.sleep(0.01)\n    n += pid > 0\nprint(n)\ntime.sleep(0.5)")
    r = run_python(prog, FAST)
    assert r.passed and 0 < int(r.stdout) < FAST.max_processes
    # the no_leftovers fixture checks that the setsid'd grandchildren are gone


def test_writing_outside_the_workdir_is_prevented():
    name = f"t2-sandbox-probe-{uuid.uuid4().hex}"
    targets = [Path("/tmp") / name, ROOT / name, Path("/dev/shm") / name]
    for target in targets:
        r = run_python(f"open({str(target)!r}, 'w').write('x')", FAST)
        assert r.status == "failed" and not target.exists()
    r = run_python("import os, tempfile\nopen('local.txt', 'w').write('ok')\n"
                   "fd, p = tempfile.mkstemp()\nos.write(fd, b'ok')\nprint(open('local.txt').read())", FAST)
    assert r.passed and r.stdout.strip() == "ok"


def test_network_is_blocked():
    r = run_python("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)", FAST)
    assert r.status == "failed" and "not allowed" in r.stderr
    # the class itself, bypassing the monkeypatch: the kernel must refuse (netns / Landlock)
    r = run_python("import socket\ns = socket.SocketType(socket.AF_INET, socket.SOCK_STREAM)\n"
                   "s.settimeout(1)\ns.connect(('1.1.1.1', 53))", FAST)
    assert r.status == "failed" and "Error" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop only happens when started as root")
def test_runs_as_unprivileged_uid_in_its_own_tmp():
    r = run_python("import os\nprint(os.getuid(), os.getcwd(), os.environ['HOME'] == os.getcwd())\n"
                   "print(sorted(os.environ))", FAST)
    first, env = r.stdout.splitlines()
    uid, cwd, home_is_cwd = first.split()
    assert int(uid) >= sandbox._UID_BASE and home_is_cwd == "True"
    assert eval(env) == ["HOME", "LANG", "PATH", "PYTHONHASHSEED", "TMPDIR"]
    assert not Path(cwd).exists()  # temp dir deleted
    # only CAP_DAC_READ_SEARCH is left (effective, permitted); no way back to root
    r = run_python(CTYPES + "hdr, caps = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()\n"
                   "assert libc.capget(hdr, caps) == 0\nprint(list(caps))\n"
                   "assert libc.setuid(0) != 0 and libc.unshare(0x40000000) != 0", FAST)
    assert r.passed and r.stdout.strip() == "[4, 4, 0, 0, 0, 0]"


def test_stdlib_and_venv_imports_work():
    r = run_python("import collections, heapq, itertools, math, re, json, decimal, fractions, datetime\n"
                   "import numpy\nprint(int(numpy.arange(4).sum()))", FAST)
    assert r.passed and r.stdout.strip() == "6"


def test_run_many_keeps_order_and_runs_in_parallel():
    progs = ["import time\ntime.sleep(0.5)\nprint(%d)" % i for i in range(4)] + ["assert False"]
    t0 = time.monotonic()
    rs = run_many(progs, FAST, workers=2)
    assert [r.stdout.strip() for r in rs[:4]] == ["0", "1", "2", "3"]
    assert [r.passed for r in rs] == [True] * 4 + [False]
    assert time.monotonic() - t0 < 4 * 0.5 + 1.5
    assert run_many([], FAST) == []


def test_unprivileged_fallback_still_confines(monkeypatch):
    # as a non-root caller: no uid switch or namespaces, but Landlock and the guards remain
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    assert run_python("print('ok')", FAST).passed
    target = Path("/tmp") / f"t2-sandbox-probe-{uuid.uuid4().hex}"
    assert not run_python(f"open({str(target)!r}, 'w')", FAST).passed and not target.exists()
