"""Small process-level helpers shared by the stages: timing, peak memory, process age, malloc settings."""
from __future__ import annotations

import os
import resource
import sys
import time
from contextlib import contextmanager
from typing import Iterator


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def proc_stat(pid: int | str = "self") -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first; [19] is field 22, the start
    time in clock ticks since boot), None where there is no such process or no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


PROCESS_STARTED_S: float | None = None  # set in a forkserver's child: when its stage process started


def process_started_s() -> float | None:
    """Seconds after boot at which this process started (Linux /proc, 10 ms resolution), None elsewhere; in a
    stage forked from the forkserver, when the stage's own process (the one DVC started) did."""
    if PROCESS_STARTED_S is not None:
        return PROCESS_STARTED_S
    fields = proc_stat()
    try:
        return int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (ValueError, IndexError, TypeError):
        return None


def process_age_s() -> float | None:
    """Seconds since this process started, None where unknown: a stage's start-up overhead (interpreter,
    imports, Prefect, MLflow) is the age at which its own work begins."""
    started = process_started_s()
    try:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return None if started is None else max(0.0, uptime - started)


def env_seconds(name: str, default: float) -> float:
    """A duration from the environment variable `name` (unset or blank: `default`); a bad value is a UserError."""
    value = os.environ.get(name, "")
    try:
        seconds = float(value) if value.strip() else default
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        from .errors import UserError

        raise UserError(f"{name}={value!r}: seconds, a number >= 0")
    return seconds


MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
MALLOC_SWITCH = "T2_MALLOPT"  # "off": leave glibc's malloc as it is


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30, top_pad: int = 256 << 20) -> bool:
    """Let glibc keep freed memory for reuse instead of returning it to the kernel; True where applied.

    A forward allocates and frees activations of 5-30 MB (2048 tokens x 1536 floats) many times;
    with glibc's default, adaptive thresholds much of that memory goes back to the kernel and
    comes back as fresh pages, each a page fault: ~3-5 million minor faults for one prefill of
    128 prompts (25k tokens) of SmolLM2-135M, 30 s; with these settings (blocks up to 32 MB from
    the heap, trimmed only past 1 GB free, grown 256 MB at a time) 0.47 million and 22.5 s. Process
    wide, so the stages call it, not the library; peak RSS in that prefill was 3.1-3.2 GB either
    way (what is kept is what the next forward needs). Skipped off glibc, with T2_MALLOPT=off, or when the user set
    glibc's own MALLOC_* / GLIBC_TUNABLES variables (theirs win).
    """
    if os.environ.get(MALLOC_SWITCH, "").strip().lower() == "off" or any(k in os.environ for k in MALLOC_ENV):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    return all(mallopt(option, value) == 1 for option, value in
               ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold), (M_TOP_PAD, top_pad)))


def peak_cuda_mb() -> float | None:
    """None where torch was never imported (a stage without a model): importing it here cost ~2 s."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
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
