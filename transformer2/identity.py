"""Run identity: one short hash of everything a resumable run depends on.

Settings (anything JSON-able) and the raw bytes of its inputs (data, expert vectors, files):
a checkpoint or cache is reused only when both match, so changed data never resumes an old run.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence


def run_fingerprint(identity: Any, blobs: Iterable[bytes] = ()) -> str:
    """A short stable hash of JSON-able settings, then the raw bytes of the run's inputs."""
    h = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    for blob in blobs:
        h.update(blob)
    return h.hexdigest()[:16]


def docs_bytes(docs: Sequence[Any]) -> bytes:
    """A dataset as bytes (its docs in order, keys sorted)."""
    return json.dumps(list(docs), sort_keys=True, default=str).encode()


def file_bytes(paths: Iterable[Path]) -> Iterator[bytes]:
    """Each file's bytes, or a marker for a missing one."""
    for path in paths:
        yield path.read_bytes() if path.is_file() else b"missing"
