import json
import os
import re
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from transformer2.sandbox import (SandboxLimits, SandboxResult, host, layers, run_many, run_python, run_tests,
                                  run_tests_many, wire)

FAST = SandboxLimits(timeout_s=3.0, cpu_s=3)
ROOT = Path(__file__).resolve().parents[1]
CTYPES = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"


@pytest.fixture(scope="module", autouse=True)
def private_tmp(tmp_path_factory):
    """Sandbox runs of this module live under one directory, so their processes are recognisable."""
    tmp_path_factory.getbasetemp()  # fixed before tempfile's default moves
    d = tempfile.mkdtemp(prefix="t2-sandbox-tests-")
    os.chmod(d, 0o711)
    old, tempfile.tempdir = tempfile.tempdir, d
    yield d
    tempfile.tempdir = old
    os.rmdir(d)


@pytest.fixture(autouse=True)
def no_leftovers(private_tmp):
    yield
    me = psutil.Process()
    assert me.is_running()
    deadline = time.monotonic() + 2
    while True:
        left = []
        kids = {c.pid for c in me.children(recursive=True)}
        for p in psutil.process_iter():
            try:
                if p.status() != psutil.STATUS_ZOMBIE and (p.pid in kids or private_tmp in " ".join(p.cmdline())):
                    left.append(p)
            except psutil.Error:
                pass
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert left == []
    assert os.listdir(private_tmp) == []  # every run's directory removed


# ---------------------------------------------------------------- run_python

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
                   SandboxLimits(max_file_mb=4, max_disk_mb=64))
    assert r.status == "failed" and "File too large" in r.stderr


def test_output_is_capped():
    r = run_python("print('x' * 500_000)", SandboxLimits(max_output_kb=4))
    assert r.passed and len(r.stdout) == 4096


def test_kill_parent_is_contained():
    host_pid = os.getpid()
    assert run_python("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", FAST).status == "failed"
    # below the Python guard: the kernel (PID namespace, other uid, Landlock signal scope) must refuse
    r = run_python(CTYPES + "assert libc.kill(os.getppid(), 9) == 0\nassert libc.kill(1, 0) == 0", FAST)
    assert r.status == "failed"
    assert os.getpid() == host_pid and psutil.Process(host_pid).is_running()


def test_fork_and_spawn_are_refused():
    for prog in ("import os\nwhile True:\n    os.fork()",
                 "import subprocess\nsubprocess.run(['true'])",
                 "import multiprocessing as mp\np = mp.Process(target=print)\np.start()\np.join()",
                 "import os\nos.system('true')"):
        r = run_python(prog, FAST)
        assert r.status == "failed" and "not allowed in the sandbox" in r.stderr
    if "seccomp" in layers():  # below the guard: no new process at all, threads still work
        r = run_python(CTYPES + "import threading\nt = threading.Thread(target=print, args=('t',))\nt.start()\n"
                       "t.join()\nprint(libc.fork(), ctypes.get_errno())", FAST)
        assert r.passed and r.stdout.split() == ["t", "-1", "1"]


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
    # the class itself, bypassing the monkeypatch: the kernel must refuse (seccomp / netns / Landlock)
    r = run_python("import socket\ns = socket.SocketType(socket.AF_INET, socket.SOCK_STREAM)\n"
                   "s.settimeout(1)\ns.connect(('1.1.1.1', 53))", FAST)
    assert r.status == "failed" and "Error" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid switch only happens when started as root")
def test_runs_as_unprivileged_uid_in_its_own_tmp():
    r = run_python("import os\nprint(os.getuid(), os.getcwd(), os.environ['HOME'] == os.getcwd())\n"
                   "print(sorted(os.environ))", FAST)
    first, env = r.stdout.splitlines()
    uid, cwd, home_is_cwd = first.split()
    assert int(uid) >= host._UID_BASE and home_is_cwd == "True"
    assert eval(env) == ["HOME", "LANG", "PATH", "PYTHONHASHSEED", "TMPDIR"]
    assert not Path(cwd).exists()  # temp dir deleted
    # at most CAP_DAC_READ_SEARCH is left (an interpreter under /root needs it); no way back to root
    r = run_python(CTYPES + "hdr, caps = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()\n"
                   "assert libc.capget(hdr, caps) == 0\nprint(list(caps))\n"
                   "assert libc.setuid(0) != 0 and libc.unshare(0x40000000) != 0", FAST)
    keep = 4 if host._needs_dac_search() else 0
    assert r.passed and r.stdout.strip() == str([keep, keep, 0, 0, 0, 0])


def test_stdlib_and_site_packages_import():
    r = run_python("import collections, heapq, itertools, math, re, json, decimal, fractions, datetime\n"
                   "print('ok')", FAST)
    assert r.passed and r.stdout.strip() == "ok"
    numpy = pytest.importorskip("numpy")
    if not any(numpy.__file__.startswith(d) for d in host._SITE):
        pytest.skip("numpy is not in this interpreter's site-packages (PYTHONPATH only)")
    r = run_python("import numpy\nprint(int(numpy.arange(4).sum()))", FAST)
    assert r.passed and r.stdout.strip() == "6"


def test_run_many_keeps_order_and_runs_in_parallel():
    progs = ["import time\ntime.sleep(0.5)\nprint(%d)" % i for i in range(4)] + ["assert False"]
    t0 = time.monotonic()
    rs = run_many(progs, FAST, workers=2)
    assert [r.stdout.strip() for r in rs[:4]] == ["0", "1", "2", "3"]
    assert [r.passed for r in rs] == [True] * 4 + [False]
    assert time.monotonic() - t0 < 4 * 0.5 + 2.0
    assert run_many([], FAST) == []


def test_disk_is_capped():
    if "tmpfs" not in layers():
        pytest.skip(f"no mount namespace on this host (layers: {layers()}): disk use is not capped")
    r = run_python("n = 0\ntry:\n    while True:\n        open(f'f{n}', 'wb').write(b'x' * (1 << 20))\n        n += 1\n"
                   "except OSError as e:\n    print(n, e.errno)", SandboxLimits(max_disk_mb=8))
    n, err = r.stdout.split()
    assert r.passed and int(n) <= 8 and err == "28"  # ENOSPC


def test_never_raises_on_odd_input():
    cases = [(b"print(1)", FAST, "error"), ("x" * (4 << 20), FAST, "failed"),
             ("print(1)", SandboxLimits(memory_mb=-1), "error"), ("print(1)", SandboxLimits(timeout_s=0), "error"),
             ("print(1)", SandboxLimits(cpu_s=True), "error")]
    for program, limits, status in cases:
        r = run_python(program, limits)
        assert isinstance(r, SandboxResult) and r.status == status, (program[:20], r)
        r = run_tests(program, "assert True", limits=limits)
        assert isinstance(r, SandboxResult) and r.status == status, (program[:20], r)
    assert "memory_mb = -1: must be a positive number" in run_python("print(1)", SandboxLimits(memory_mb=-1)).stderr
    assert isinstance(run_python("print('\0')", FAST), SandboxResult)


_PROBE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
flags = 0x20000 | 0x20000000 | 0x40000000 | (0 if os.geteuid() == 0 else 0x10000000)
print("ns", libc.unshare(flags) == 0)
print("landlock", libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1)))
print("seccomp", libc.prctl(21, 0, 0, 0, 0) >= 0)
"""


def test_layers_this_host_grants():
    """Every layer the kernel offers (probed here, directly) is one the sandbox really uses."""
    import subprocess
    import sys

    facts = dict(line.split() for line in subprocess.run([sys.executable, "-c", _PROBE], capture_output=True,
                                                         text=True, check=True).stdout.splitlines())
    have = set(layers())
    assert {"rlimits", "seccomp"} <= have, have
    assert ("uid" in have) == (os.geteuid() == 0)
    if facts["ns"] == "True":
        assert {"pidns", "netns", "ipcns", "mountns", "tmpfs"} <= have, have
        assert ("userns" in have) == (os.geteuid() != 0)
    if int(facts["landlock"]) > 0:
        assert f"landlock{facts['landlock']}" in have, have


def test_without_namespaces_the_other_layers_hold(monkeypatch):
    """Where the kernel refuses namespaces (no user namespaces for non-root), seccomp, Landlock
    and rlimits still refuse processes, sockets, signals and writes outside; disk is not capped."""
    monkeypatch.setattr(host, "_SKIP_LAYERS", frozenset({"namespaces"}))
    target = Path("/tmp") / f"t2-sandbox-probe-{uuid.uuid4().hex}"
    for prog in (f"open({str(target)!r}, 'w')", CTYPES + "assert libc.fork() >= 0",
                 CTYPES + "assert libc.kill(-1, 0) == 0", CTYPES + "assert libc.kill(os.getppid(), 0) == 0",
                 "import _socket\n_socket.socket(1, 1)"):
        assert run_python(prog, FAST).status == "failed", prog
    assert not target.exists()
    assert run_tests("def f(x):\n    return 2 * x", "assert f(2) == 4", limits=FAST).passed
    assert not {"pidns", "tmpfs", "userns"} & set(layers.__wrapped__())


# ---------------------------------------------------------------- the uid-slot lock directory (root)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="uid slots exist only when started as root")


@root_only
def test_lock_dir_is_private(tmp_path, monkeypatch):
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "locks"
    link.symlink_to(target)
    os.chmod(tmp_path, 0o755)
    monkeypatch.setattr(host, "_LOCK_DIRS", (str(link),))
    r = run_python("print(1)", FAST)
    assert r.status == "error" and list(target.iterdir()) == []  # refused, nothing created through the link
    link.unlink()
    link.mkdir(mode=0o700)
    os.chown(link, 65534, 65534)  # someone else's directory
    r = run_python("print(1)", FAST)
    assert r.status == "error" and list(link.iterdir()) == []
    os.chown(link, 0, 0)
    assert run_python("print(1)", FAST).passed
    assert {p.stat().st_mode & 0o777 for p in link.iterdir()} == {0o600}
    guessable = Path("/tmp") / f"t2-sandbox-locks-{uuid.uuid4().hex}"  # in a directory anyone can write
    monkeypatch.setattr(host, "_LOCK_DIRS", (str(guessable),))
    assert run_python("print(1)", FAST).status == "error" and not guessable.exists()


@root_only
def test_all_slots_held_is_an_error_not_an_exception(tmp_path, monkeypatch):
    import fcntl

    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    monkeypatch.setattr(host, "_LOCK_DIRS", (str(locks),))
    monkeypatch.setattr(host, "_UID_SLOTS", 2)
    held = []
    for i in range(2):
        fd = os.open(locks / str(i), os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.append(fd)
    try:
        r = run_python("print(1)", FAST)
        assert r.status == "error" and "no free sandbox uid slot" in r.stderr
        assert run_tests("def f(): return 1", "assert f() == 1", limits=FAST).status == "error"
    finally:
        for fd in held:
            os.close(fd)
    assert run_python("print(1)", FAST).passed


# ---------------------------------------------------------------- run_tests: the unforgeable verdict

def test_run_tests_pass_and_fail():
    r = run_tests("def f(x):\n    print('in f')\n    return x + 1\n", "assert f(1) == 2\nprint('tests ran')",
                  limits=FAST)
    assert (r.passed, r.status, r.returncode) == (True, "passed", 0)
    assert r.stdout == "in f\ntests ran\n"
    r = run_tests("def f(x):\n    return x\n", "assert f(1) == 2, 'wrong'", limits=FAST)
    assert (r.passed, r.status) == (False, "failed") and "AssertionError: wrong" in r.stderr and "tests.py" in r.stderr
    r = run_tests("def f(:\n", "assert f(1) == 2", limits=FAST)
    assert r.status == "failed" and "SyntaxError" in r.stderr


def test_run_tests_values_are_plain_data():
    values = ("None, True, 0, -1, 10 ** 100, -(10 ** 5000), 1.5, float('inf'), -0.0, 2j, 'é\\ud800', b'\\x00', "
              "bytearray(b'a'), [1, [2]], (1, (2,)), {1: {'a': (1, 2)}}, {1, 2}, frozenset({3}), ()")
    r = run_tests(f"import collections\ndef f():\n    return [{values}, collections.Counter('aab'), "
                  "collections.OrderedDict(a=1), True.__class__(1)]\n",
                  f"v = f()\nassert v[:-3] == [{values}]\n"
                  f"assert [type(x) for x in v[:-3]] == [type(x) for x in [{values}]]\n"
                  "assert v[-3:] == [{'a': 2, 'b': 1}, {'a': 1}, True] and type(v[-3]) is dict\n"
                  "assert repr(v[8]) == '-0.0' and v[5] == -(10 ** 5000)", limits=FAST)
    assert r.passed, r.stderr


def test_run_tests_objects_stay_in_the_candidate():
    # MBPP 367-style: the tests build the candidate's own classes and pass them back
    cand = ("class Node:\n    def __init__(self, v):\n        self.v, self.left = v, None\n"
            "    def total(self):\n        return self.v + (self.left.total() if self.left else 0)\n"
            "def count(n):\n    return 0 if n is None else 1 + count(n.left)\n"
            "def gen(n):\n    yield from range(n)\n")
    r = run_tests(cand, "root = Node(1)\nroot.left = Node(5)\nassert count(root) == 2 and root.total() == 6\n"
                  "assert root.left.v == 5\nassert list(gen(3)) == [0, 1, 2] and sorted(gen(2)) == [0, 1]", limits=FAST)
    assert r.passed, r.stderr
    for test in ("assert Node(1)", "assert Node(1) == Node(1)", "assert Node(1) != 1 and False",
                 "assert abs(Node(1)) >= 0", "assert len(gen(2)) == 2", "assert str(Node(1)).startswith('<__')",
                 "import copy\nassert copy.copy(Node(1)).v == 1"):
        assert not run_tests(cand, test, limits=FAST).passed, test


def test_run_tests_exceptions_keep_their_builtin_class():
    cand = "class Mine(KeyError):\n    pass\ndef f(x):\n    if x < 0:\n        raise Mine('neg')\n    return x\n"
    tests = "try:\n    f(-1)\nexcept KeyError as e:\n    assert 'neg' in str(e)\nelse:\n    raise AssertionError\n"
    assert run_tests(cand, tests + "assert f(2) == 2", limits=FAST).passed
    assert not run_tests(cand, "f(-1)", limits=FAST).passed


def test_run_tests_names_entry_points_and_prelude():
    # an entry point may shadow a builtin (MBPP 126 defines `sum`); other shadowing is ignored
    assert run_tests("def sum(a, b):\n    return a + b\n", "assert sum(10, 15) == 25", entry_points=["sum"],
                     limits=FAST).passed
    assert not run_tests("def sum(a, b):\n    return a + b\n", "assert sum(10, 15) == 25", limits=FAST).passed
    # HumanEval: the prelude (prompt) is trusted, its helpers are the checker's own
    prelude = "import math\ndef poly(xs, x):\n    return sum(c * math.pow(x, i) for i, c in enumerate(xs))\n" \
              "def find_zero(xs):\n    \"\"\"stub\"\"\"\n"
    body = "    return -xs[0] / xs[1]\n"
    tests = "def check(candidate):\n    assert abs(poly([1, 2], candidate([1, 2]))) < 1e-6\ncheck(find_zero)\n"
    assert run_tests(prelude + body, tests, prelude=prelude, entry_points=["find_zero"], limits=FAST).passed
    cheat = "def poly(xs, x):\n    return 0\ndef find_zero(xs):\n    return 99.0\n"
    assert not run_tests(cheat, tests, prelude=prelude, entry_points=["find_zero"], limits=FAST).passed
    # a module the tests use is the checker's own, not what the candidate bound to the name
    assert run_tests("import math\ndef f():\n    return 0.5\n", "assert math.isclose(f(), 0.5)", limits=FAST).passed
    assert not run_tests("class math:\n    isclose = lambda *a, **k: True\ndef f():\n    return 9\n",
                         "assert math.isclose(f(), 0.5)", limits=FAST).passed
    assert not run_tests("def f():\n    return 1\n", "assert math.isclose(f(), 1)", limits=FAST).passed  # no import


def test_run_tests_many_and_timeouts():
    items = [{"candidate": "def f():\n    return %d" % i, "tests": "assert f() == %d" % (i % 2)} for i in range(4)]
    items.append({"candidate": "def f():\n    while True:\n        pass", "tests": "f()"})
    rs = run_tests_many(items, SandboxLimits(timeout_s=2.0), workers=2)
    assert [r.passed for r in rs] == [True, True, False, False, False]
    assert rs[4].status == "timeout" and rs[4].seconds < 4
    assert run_tests_many([], FAST) == []


def test_wire_round_trip_and_rejects():
    ref = lambda tag, v: ("ref", tag, v)  # noqa: E731
    value = [None, True, 1, 2 ** 70, 1.5, "s", b"b", bytearray(b"c"), 1j, (1,), {1: [2]}, {3}, frozenset({4}),
             int, len, ValueError, ...]
    assert wire.decode(json.loads(json.dumps(wire.encode(value, None))), ref) == value
    assert wire.decode({"h": 3}, ref) == ("ref", "h", 3)
    for bad in ({"x": 1}, {"t": 1}, {"d": [[1]]}, {"c": ["1", 2]}, {"h": "1"}, {"I": 5}, {"t": [], "s": []},
                {"n": "open.__self__"}, {"n": "__import__x"}, {"n": "copyright"}):
        with pytest.raises(ValueError):
            wire.decode(bad, ref)
    with pytest.raises(ValueError):
        wire.encode(object(), lambda x, d: (_ for _ in ()).throw(ValueError("not plain")))
    deep = []
    for _ in range(wire.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(ValueError):
        wire.encode(deep, None)


# ---------------------------------------------------------------- honest programs keep their scores

def _mbpp_entry(doc):
    m = re.match(r"\s*assert\s*\(?\s*(?:not\s+)?\(?\s*([A-Za-z_]\w*)\s*\(", doc["test_list"][0])
    return [m.group(1)] if m else []


@pytest.mark.slow
def test_all_canonical_solutions_pass_run_tests(mirror):
    """All 500 MBPP test-split and 164 HumanEval reference solutions pass (~2 min on 2 busy cores)."""
    mbpp = [json.loads(line) for line in open(mirror / "mbpp" / "test.jsonl")]
    he = [json.loads(line) for line in open(mirror / "humaneval" / "test.jsonl")]
    assert (len(mbpp), len(he)) == (500, 164)
    items = [dict(candidate=d["code"], tests="\n".join(d["test_list"]), setup=d["test_setup_code"],
                  entry_points=_mbpp_entry(d)) for d in mbpp]
    items += [dict(prelude=d["prompt"], candidate=d["canonical_solution"],
                   tests=f"{d['test']}\ncheck({d['entry_point']})\n", entry_points=[d["entry_point"]]) for d in he]
    # generous limits: MBPP 123 brute-forces amicable numbers up to 9999 (~10 s of CPU on a busy core)
    rs = run_tests_many(items, SandboxLimits(timeout_s=60, cpu_s=40), workers=2)
    failed = [(i, r.status, r.stderr[-300:]) for i, r in enumerate(rs) if not r.passed]
    assert failed == []
