"""Plain data over a pipe, between the candidate's process and the checker (stdlib only).

Values cross as tagged JSON, so the checker only ever holds values of built-in types it
builds itself (None, bool, int, float, complex, str, bytes, bytearray, list, tuple, dict,
set, frozenset), built-ins by name (`int`, `len`, `...`), or opaque references to the
candidate's objects: nothing the candidate defines can run on the checker's side, so no
`__eq__` of its choosing can decide a test.
"""
from __future__ import annotations

import builtins
import json
import os
import struct
import types

MAX_MESSAGE = 16 << 20  # bytes: a bigger message breaks the connection
MAX_DEPTH = 200  # nesting of one value
_BIG = 1 << 63  # ints beyond this travel as hex (JSON ints would hit str-conversion limits)


class ProtocolError(Exception):
    """The other side died or sent something that is not a well-formed message."""


class TooLarge(ProtocolError):
    """A message over MAX_MESSAGE: nothing was sent, the connection is still usable."""


class Conn:
    """Length-prefixed JSON messages over two pipe ends."""

    def __init__(self, rfd: int, wfd: int):
        self.rfd, self.wfd = rfd, wfd

    def send(self, obj) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode()
        if len(data) > MAX_MESSAGE:
            raise TooLarge(f"message of {len(data)} bytes is over the limit")
        view = memoryview(struct.pack(">I", len(data)) + data)
        try:
            while view:
                view = view[os.write(self.wfd, view):]
        except OSError as e:
            raise ProtocolError(f"write failed: {e}") from None

    def _read(self, n: int) -> bytes:
        chunks = []
        while n:
            try:
                chunk = os.read(self.rfd, min(n, 1 << 20))
            except OSError as e:
                raise ProtocolError(f"read failed: {e}") from None
            if not chunk:
                raise ProtocolError("the other side closed the connection")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def recv(self):
        (n,) = struct.unpack(">I", self._read(4))
        if n > MAX_MESSAGE:
            raise ProtocolError(f"message of {n} bytes is over the limit")
        try:
            return json.loads(self._read(n))
        except (ValueError, RecursionError) as e:
            raise ProtocolError(f"malformed message: {e}") from None


def encode(x, other, depth: int = 0):
    """`x` as JSON-able data; `other(x, depth)` encodes anything that is not plain data."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    t, d = type(x), depth + 1
    if x is None or t is bool or t is str or t is float:
        return x
    if t is int:
        return x if -_BIG <= x < _BIG else {"I": hex(x)}
    if t is list:
        return [encode(v, other, d) for v in x]
    if t is tuple:
        return {"t": [encode(v, other, d) for v in x]}
    if t is dict:
        return {"d": [[encode(k, other, d), encode(v, other, d)] for k, v in x.items()]}
    if t is set or t is frozenset:
        return {"s" if t is set else "f": [encode(v, other, d) for v in x]}
    if t is bytes or t is bytearray:
        return {"b" if t is bytes else "B": x.hex()}
    if t is complex:
        return {"c": [x.real, x.imag]}
    name = x.__name__ if t in _NAMED else "Ellipsis" if x is ... else None
    if name is not None and _builtin(name) is x:
        return {"n": name}
    return other(x, depth)


_NAMED = (type, types.BuiltinFunctionType)


def _builtin(name):
    """The built-in called `name` if it is a type, a built-in function or `...`, else None."""
    x = getattr(builtins, name, None) if type(name) is str else None
    return x if type(x) in _NAMED or x is ... else None


def decode(j, ref, depth: int = 0):
    """The value `encode` made; `ref(tag, value)` resolves "h" (object) and "m" (module) tags.
    Raises ValueError on anything malformed."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    t, d = type(j), depth + 1
    if j is None or t is bool or t is int or t is float or t is str:
        return j
    if t is list:
        return [decode(v, ref, d) for v in j]
    if t is not dict or len(j) != 1:
        raise ValueError(f"not an encoded value: {type(j).__name__}")
    ((tag, v),) = j.items()
    if tag in ("t", "s", "f") and type(v) is list:
        return {"t": tuple, "s": set, "f": frozenset}[tag](decode(x, ref, d) for x in v)
    if tag == "d" and type(v) is list and all(type(p) is list and len(p) == 2 for p in v):
        return {decode(k, ref, d): decode(x, ref, d) for k, x in v}
    if tag in ("b", "B") and type(v) is str:
        return (bytes if tag == "b" else bytearray).fromhex(v)
    if tag == "c" and type(v) is list and len(v) == 2 and all(type(p) in (int, float) for p in v):
        return complex(*v)
    if tag == "I" and type(v) is str:
        return int(v, 16)
    if tag in ("h", "m") and type(v) in ((int,) if tag == "h" else (str,)):
        return ref(tag, v)
    if tag == "n" and _builtin(v) is not None:
        return _builtin(v)
    raise ValueError(f"bad tag {tag!r}")
