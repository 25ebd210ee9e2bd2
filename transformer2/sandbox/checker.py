"""The trusted side of `run_tests` (stdlib only): runs the benchmark's tests, never the candidate.

Its own sandboxed process executes the prelude, the setup and the tests. Each name the tests
use from the candidate is a `Remote`: calling it (or getting and setting attributes on what
it returns, or iterating) asks the candidate's process over a pipe, and the answer comes
back as plain data (see `wire`), compared here by the tests' own code. So a test passes only
if the candidate returned the right value: nothing it does inside its own process - frames,
trace hooks, patched modules, objects whose `__eq__` is always true, exit tricks - reaches
this process, whose exit status is the verdict.
"""
from __future__ import annotations

import builtins
import importlib
import os
import sys
import traceback
import types

from . import wire
from .child import _compile, _flush, _namespace


class Broken(BaseException):
    """The candidate's process died or broke the protocol: not an `Exception`, so a test's
    `except Exception` cannot swallow it (and the run fails even if something does)."""


class CandidateError(Exception):
    """The candidate raised an exception with no built-in equivalent."""


class Remote:
    """One of the candidate's objects: calls and attribute access go to its process; no
    comparison, truth value or special method is forwarded."""
    __slots__ = ("_t2_link", "_t2_h")

    def __init__(self, link, h):
        object.__setattr__(self, "_t2_link", link)
        object.__setattr__(self, "_t2_h", h)

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self._t2_link.ask("getattr", self, name=name)

    def __setattr__(self, name, value):
        self._t2_link.ask("setattr", self, name=name, v=value)

    def __delattr__(self, name):
        self._t2_link.ask("delattr", self, name=name)

    def __call__(self, *args, **kwargs):
        return self._t2_link.ask("call", self, a=list(args), k=kwargs)

    def __iter__(self):
        return self._t2_link.ask("iter", self)

    def __next__(self):
        return self._t2_link.ask("next", self)

    def __bool__(self):
        raise TypeError("the candidate returned an object where a plain value was expected")

    def __repr__(self):
        return f"<candidate's object #{self._t2_h}>"


def _exception(e, op: str) -> Exception:
    """The candidate's exception as the built-in class it derives from (else CandidateError).
    StopIteration only ends an iteration: from a call it could cut `all(map(f, cases))` short."""
    if not (type(e) is list and len(e) == 2 and all(type(x) is str for x in e)):
        raise ValueError("malformed exception")
    name, msg = e
    cls = getattr(builtins, name, None)
    if (isinstance(cls, type) and issubclass(cls, Exception) and cls.__module__ == "builtins"
            and (op == "next" or not issubclass(cls, (StopIteration, StopAsyncIteration)))):
        try:
            return cls(msg)
        except Exception:
            pass
    return CandidateError(f"{name}: {msg}")


class Link:
    def __init__(self, conn: wire.Conn):
        self.conn, self.remotes, self.broken = conn, {}, None

    def ref(self, tag, v):
        if tag != "h":
            raise ValueError("a module where a value was expected")
        if v not in self.remotes:
            self.remotes[v] = Remote(self, v)
        return self.remotes[v]

    def out(self, x, depth):
        if type(x) is Remote and x._t2_link is self:
            return {"h": x._t2_h}
        raise TypeError(f"a test passed a {type(x).__name__} to the candidate's code: only plain data can go there")

    def exchange(self, msg):
        """Send one request, return the raw reply; any failure breaks the link for good."""
        if self.broken:
            raise Broken(self.broken)
        try:
            self.conn.send(msg)
            reply = self.conn.recv()
            if type(reply) is not dict or len(reply) != 1 or not ({"v", "e"} & reply.keys()):
                raise ValueError("malformed reply")
            return reply
        except Exception as e:  # also MemoryError, RecursionError
            self.broken = f"lost the candidate's process: {e!r}"
            raise Broken(self.broken) from None

    def ask(self, op, target, **fields):
        for key in ("a", "v"):
            if key in fields:
                fields[key] = wire.encode(fields[key], self.out)
        if "k" in fields:
            fields["k"] = [[k, wire.encode(v, self.out)] for k, v in fields["k"].items()]
        reply = self.exchange({"op": op, "h": target._t2_h, **fields})
        try:
            if "e" in reply:
                exc = _exception(reply["e"], op)
            else:
                return wire.decode(reply["v"], self.ref)
        except Exception as e:  # e.g. an unhashable set item, MemoryError
            self.broken = f"the candidate's process sent a malformed value: {e!r}"
            raise Broken(self.broken) from None
        raise exc

    def names(self, wanted) -> dict:
        """The candidate's values of `wanted` names; its stdlib modules are imported here, never proxied."""
        v = self.exchange({"op": "names", "names": sorted(wanted)}).get("v")
        if type(v) is not dict:
            raise Broken("malformed names")
        out = {}
        for name, enc in v.items():
            if name not in wanted:
                continue
            if type(enc) is dict and list(enc) == ["m"] and type(enc["m"]) is str:
                if enc["m"].partition(".")[0] in sys.stdlib_module_names:  # `import numpy as np`: not here
                    try:
                        out[name] = importlib.import_module(enc["m"])
                    except Exception:
                        pass
                continue
            try:
                out[name] = wire.decode(enc, self.ref)
            except Exception as e:
                self.broken = f"the candidate's process sent a malformed value: {e}"
                raise Broken(self.broken) from None
        return out


def _used_names(code: types.CodeType) -> set:
    out = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            out |= _used_names(c)
    return out


def _fail(msg: str) -> None:
    _flush()
    print(msg, file=sys.stderr, flush=True)
    os._exit(1)


def main(cfg) -> None:
    link = Link(wire.Conn(cfg["rfd"], cfg["wfd"]))
    try:
        hello = link.conn.recv()
    except wire.ProtocolError as e:
        _fail(f"the candidate's code did not load: {e}")
    if hello != {"ready": True}:
        error = hello.get("error") if type(hello) is dict else None
        _fail(error if type(error) is str else f"the candidate's process sent {str(hello)[:200]} instead of starting")
    ns = _namespace("tests.py")
    try:
        setup, tests = _compile(cfg["setup"], "setup.py"), _compile(cfg["tests"], "tests.py")
        exec(_compile(cfg["prelude"], "prelude.py"), ns)
        entry = set(cfg["entry_points"])
        # The candidate's names the tests use, except builtins and the prelude's (trusted
        # helpers such as HumanEval's `poly`): a candidate cannot swap `abs` or `poly` for
        # its own. Entry points are bound even where they shadow one.
        wanted = {n for n in _used_names(setup) | _used_names(tests) if n not in ns
                  and not (n.startswith("__") and n.endswith("__")) and not hasattr(builtins, n)} | entry
        ns.update(link.names(wanted))
        for name in (wanted - entry) & set(sys.stdlib_module_names) & ns.keys():
            try:  # `math` is the real math, whatever the candidate bound to the name
                ns[name] = importlib.import_module(name)
            except ImportError:
                del ns[name]
        exec(setup, ns)
        exec(tests, ns)
    except SystemExit as e:
        _fail(f"the tests called exit({e.code!r})")
    except BaseException as e:
        _flush()
        tb = traceback.TracebackException(type(e), e, e.__traceback__.tb_next)
        tb.stack = traceback.StackSummary.from_list([f for f in tb.stack if f.filename != __file__])
        print("".join(tb.format()), end="", file=sys.stderr)
        _fail("tests failed")
    if link.broken:
        _fail(f"tests failed: {link.broken}")
    _flush()
    os._exit(0)
