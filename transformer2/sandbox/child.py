"""The untrusted side (stdlib only): runs the candidate's code, confined by `confine`.

Two roles. "program" (`run_python`) runs a whole program and prints the run's sentinel if it
returned normally; that verdict lives in the program's own interpreter, so it only tells
"ran cleanly", and a program that wants to can fake it. "child" (`run_tests`) executes the
candidate's definitions, then only answers the checker's requests (call, get/set attribute,
iterate) with plain data; it never sees the tests or the expected values.
"""
from __future__ import annotations

import builtins
import linecache
import os
import sys
import traceback
import types

from . import wire


def _guard() -> None:
    """Friendly errors for what the kernel layers refuse anyway (and for hosts without them)."""
    import _posixsubprocess
    import socket

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


def _compile(src: str, name: str):
    linecache.cache[name] = (len(src), None, src.splitlines(True), name)
    return compile(src, name, "exec")


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def _namespace(name: str) -> dict:
    return {"__name__": "__sandbox__", "__file__": name, "__builtins__": builtins}


def run_program(cfg) -> None:
    src = cfg["program"]
    ns = _namespace("program.py")
    sys.argv = ["program.py"]
    code = 0
    try:
        exec(_compile(src, "program.py"), ns)
    except SystemExit as e:
        print(f"program called exit({e.code!r}) before it finished", file=sys.stderr)
        code = 1
    except BaseException as e:
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # skip this frame
        code = 1
    _flush()
    if code == 0:
        os.write(1, ("\n" + cfg["sentinel"] + "\n").encode())
    os._exit(code)


class _Objects:
    """The candidate's objects the checker holds references to, by number."""

    def __init__(self):
        self.objs, self.index = [], {}

    def ref(self, tag, v):
        if tag != "h" or not 0 <= v < len(self.objs):
            raise ValueError(f"no such object {v!r}")
        return self.objs[v]

    def other(self, x, depth):
        """Subclasses of plain types (and numpy scalars) as their plain value; the rest by reference."""
        plain = None
        if isinstance(x, int):
            plain = int.__int__(x)
        elif isinstance(x, float):
            plain = float.__float__(x)
        elif isinstance(x, str):
            plain = str.__str__(x)
        elif isinstance(x, (bytes, bytearray)):
            plain = (bytes if isinstance(x, bytes) else bytearray)(x)
        elif isinstance(x, complex):
            plain = complex(float(x.real), float(x.imag))
        elif isinstance(x, (list, tuple, set, frozenset)):
            base = next(t for t in (list, tuple, set, frozenset) if isinstance(x, t))
            plain = base(base.__iter__(x))
        elif isinstance(x, dict):
            plain = dict(dict.items(x))
        elif type(x).__module__ == "numpy" and getattr(x, "ndim", None) == 0:
            plain = x.item()
        if plain is not None and type(plain) in (int, float, str, bytes, bytearray, complex, list,
                                                tuple, set, frozenset, dict, bool):
            return wire.encode(plain, self.other, depth)
        i = self.index.get(id(x))
        if i is None:
            i = self.index[id(x)] = len(self.objs)
            self.objs.append(x)  # kept alive, so ids stay unique
        return {"h": i}

    def encode(self, x):
        return wire.encode(x, self.other)

    def decode(self, j):
        return wire.decode(j, self.ref)


def _builtin_name(e: BaseException) -> str:
    """The nearest built-in exception class, so the checker's `except ValueError` still works."""
    for c in type(e).__mro__:
        if c.__module__ == "builtins":
            return c.__name__
    return "Exception"


def _answer(req, objs: _Objects, names: dict):
    op = req["op"]
    if op == "names":
        return {n: {"m": names[n].__name__} if isinstance(names[n], types.ModuleType) else objs.encode(names[n])
                for n in req["names"] if n in names}
    target = objs.ref("h", req["h"])
    if op == "call":
        args = objs.decode(req["a"])
        kwargs = {k: objs.decode(v) for k, v in req["k"]}
        return objs.encode(target(*args, **kwargs))
    if op == "getattr":
        return objs.encode(getattr(target, req["name"]))
    if op == "setattr":
        setattr(target, req["name"], objs.decode(req["v"]))
        return None
    if op == "delattr":
        delattr(target, req["name"])
        return None
    if op == "iter":
        return objs.encode(iter(target))
    if op == "next":
        return objs.encode(next(target))
    raise ValueError(f"unknown request {op!r}")


def serve(cfg) -> None:
    conn = wire.Conn(cfg["rfd"], cfg["wfd"])
    ns = _namespace("candidate.py")
    try:
        exec(_compile(cfg["program"], "candidate.py"), ns)
        names = {k: v for k, v in ns.items() if not (k.startswith("__") and k.endswith("__"))}
        if cfg["setup"]:
            exec(_compile(cfg["setup"], "setup.py"), ns)
    except BaseException as e:
        if isinstance(e, SystemExit):
            msg = f"the candidate's code called exit({e.code!r})"
        else:
            msg = "".join(traceback.format_exception(type(e), e, e.__traceback__.tb_next))
        _flush()
        conn.send({"error": msg[-4000:]})
        os._exit(1)
    _flush()
    conn.send({"ready": True})
    objs = _Objects()
    while True:
        try:
            req = conn.recv()
        except wire.ProtocolError:
            os._exit(0)  # the checker is done
        try:
            reply = {"v": _answer(req, objs, names)}
        except BaseException as e:
            try:
                msg = str(e)[:2000]
            except BaseException:
                msg = "?"
            reply = {"e": [_builtin_name(e), msg]}
        _flush()
        try:
            try:
                conn.send(reply)
            except wire.TooLarge as e:
                conn.send({"e": ["ValueError", f"result too large to send: {e}"]})
        except wire.ProtocolError:
            os._exit(0)


def main(cfg) -> None:
    _guard()
    (run_program if cfg["role"] == "program" else serve)(cfg)
