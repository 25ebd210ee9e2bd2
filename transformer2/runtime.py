"""Small process-level helpers shared by the stages: timing, peak memory."""
from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from typing import Iterator


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_cuda_mb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


@contextmanager
def timed() -> Iterator[dict]:
    """`with timed() as t: ...` then t["seconds"]."""
    out: dict = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = round(time.perf_counter() - start, 3)


def resource_metrics(seconds: float) -> dict:
    out = {"seconds": round(seconds, 3), "peak_rss_mb": round(peak_rss_mb(), 1)}
    cuda = peak_cuda_mb()
    if cuda is not None:
        out["peak_cuda_mb"] = round(cuda, 1)
    return out
