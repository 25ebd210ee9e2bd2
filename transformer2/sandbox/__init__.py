"""Run untrusted, model-written Python in throwaway, locked-down processes (Linux).

`run_tests(candidate, tests, ...)` is the verdict to trust (benchmarks, RL rewards): the
candidate's code runs in one sandboxed process, the benchmark's tests in another (the
checker, see `checker`), and only plain data passes between them (`wire`), so nothing the
candidate does to its own interpreter - frames, trace hooks, patched modules, `__eq__`
that is always true, exit tricks, forged pipe messages - can make a test pass. `run_python`
runs a whole program and reports whether it ran to the end; the program decides that
itself, so it is no verdict.

Every sandbox process, as root or not (`confine`): new PID, network, IPC and mount
namespaces (in a user namespace when not root) where the kernel allows them, so nothing
outlives the run and a size-capped tmpfs is the only writable directory; rlimits (CPU,
address space, file size, open files, threads); as root a uid of the run's own; Landlock
(reads only of the interpreter and system libraries, writes only in its directory, no
execute, no TCP, no signals or abstract UNIX sockets outside the sandbox); a seccomp filter
(no sockets of any family, no new processes or programs, no memfd / SysV IPC / io_uring,
no ptrace, namespaces, mounts or file-metadata changes). `layers()` lists what this host
grants. Nothing here raises for anything the code under test does.
"""
from .host import SandboxLimits, SandboxResult, layers, run_many, run_python, run_tests, run_tests_many

__all__ = ["SandboxLimits", "SandboxResult", "layers", "run_many", "run_python", "run_tests", "run_tests_many"]
