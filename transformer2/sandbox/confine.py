"""Entry point of every sandbox process and the layers that confine it (stdlib only, Linux).

The host starts `python -I -S` on `main()` and writes the run's JSON config to its stdin.
Three processes follow, so that what must outlive the program never runs its code:

    wrapper --fork--> init (PID 1 of a new PID namespace) --fork--> worker (confined, runs code)

The wrapper enters the namespaces (user namespace when not root; PID, network, IPC, UTS,
mount), mounts a size-capped tmpfs on the working directory and hides /dev/shm. When the
worker exits, init exits and the kernel kills every process left in the namespace; the host
SIGKILLs the process group as well. The worker sets rlimits, drops to the run's uid (as root)
or every capability (user namespace), then Landlock and a seccomp filter, and only then tells
the host it is ready (a byte on a pipe it closes before any untrusted code runs, so a program
cannot fake "the sandbox failed to start").
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import signal
import sys
import traceback

from . import checker, child

SETUP_FAILED = 121
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_KEEPCAPS, _PR_SET_SECCOMP = 1, 4, 8, 22
_PR_SET_NO_NEW_PRIVS = 38
_NEWNS, _NEWUTS, _NEWIPC, _NEWUSER, _NEWPID, _NEWNET = (0x20000, 0x04000000, 0x08000000,
                                                       0x10000000, 0x20000000, 0x40000000)
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 1, 2, 4, 8, 0x4000, 0x40000

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def _check(ret, what):
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _prctl(*args) -> int:
    return libc.prctl(*(a if isinstance(a, ctypes._SimpleCData) or not isinstance(a, int)
                        else ctypes.c_ulong(a) for a in args))


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


# ------------------------------------------------------------------------- namespaces

def _namespaces(cfg, layers: list) -> None:
    """In the wrapper: new namespaces, a size-capped tmpfs as working directory, no /dev/shm.
    Where the kernel refuses new namespaces altogether, nothing changes (see the README)."""
    root = cfg["uid"] is not None
    flags = _NEWNS | _NEWUTS | _NEWIPC | _NEWPID | _NEWNET | (0 if root else _NEWUSER)
    if "namespaces" in cfg["skip"] or libc.unshare(flags) != 0:
        return
    if not root:
        uid, gid = os.getuid(), os.getgid()
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
        layers.append("userns")
    layers += ["pidns", "netns", "ipcns", "mountns"]
    _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "private mounts")
    owner = cfg["uid"] if root else os.getuid()
    lim = cfg["limits"]
    opts = f"size={lim['disk_mb']}m,nr_inodes={lim['inodes']},mode=0700,uid={owner},gid={owner}"
    _check(libc.mount(b"tmpfs", cfg["work"].encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                      opts.encode()), "tmpfs on the working directory")
    layers.append("tmpfs")
    if os.path.isdir("/dev/shm"):
        _check(libc.mount(b"tmpfs", b"/dev/shm", b"tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                          b"size=4k,nr_inodes=2"), "hide /dev/shm")


# ------------------------------------------------------------------------- Landlock

def _landlock(cfg) -> int:
    """Writes only in the working directory, reads only of the interpreter and system
    libraries, no execute, no TCP (ABI >= 4), no abstract UNIX sockets or signals outside
    the sandbox (ABI >= 6). Returns the ABI, 0 where the kernel has no Landlock."""
    abi = libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return 0
    fs = (1 << (13, 14, 15, 15, 16)[min(abi, 5) - 1]) - 1  # every fs right this ABI knows
    attr = (ctypes.c_uint64 * 3)(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)  # +tcp, +scopes
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    rs = libc.syscall(444, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    _check(rs, "landlock_create_ruleset")

    class Beneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]

    file_ok = 1 | 2 | 4 | (1 << 14) | (1 << 15)  # rights a rule on a plain file may carry
    rules = [(cfg["work"], fs & ~1)] + [(p, 4 | 8) for p in cfg["read"]]
    rules += [("/dev/null", 2 | 4 | (1 << 14)), ("/dev/urandom", 4), ("/dev/zero", 4)]
    for path, rights in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        rights &= fs if os.path.isdir(path) else fs & file_ok
        _check(libc.syscall(445, ctypes.c_int(rs), ctypes.c_int(1),
                            ctypes.byref(Beneath(rights, fd)), ctypes.c_uint32(0)), path)
        os.close(fd)
    _check(libc.syscall(446, ctypes.c_int(rs), ctypes.c_uint32(0)), "landlock_restrict_self")
    os.close(rs)
    return abi


# ------------------------------------------------------------------------- seccomp

# Denied outright (EPERM): new sockets of any family (pathname/abstract UNIX, UDP, raw...),
# new processes and programs, memory outside RLIMIT_AS (memfd, SysV IPC, io_uring), other
# processes' memory, namespaces and mounts, keyrings, BPF, handle-based opens, leaving the
# process group, and file metadata changes (mode, owner, times, xattrs: Landlock has no
# rights for these, so outside files would otherwise be open to them). Threads stay
# allowed (clone with CLONE_THREAD; clone3 says ENOSYS, so libc falls back to clone);
# kill(-1) and prlimit64 on another process are refused.
_DENY = ("socket socketpair fork vfork execve execveat setsid setpgid memfd_create memfd_secret "
         "shmget msgget semget io_uring_setup io_uring_enter io_uring_register ptrace "
         "process_vm_readv process_vm_writev pidfd_getfd bpf perf_event_open userfaultfd keyctl "
         "add_key request_key unshare setns mount umount2 pivot_root chroot open_tree move_mount "
         "fsopen fsconfig fsmount fspick mount_setattr open_by_handle_at name_to_handle_at "
         "kexec_load kexec_file_load init_module finit_module chmod fchmod fchmodat fchmodat2 chown "
         "fchown lchown fchownat utime utimes futimesat utimensat setxattr lsetxattr fsetxattr "
         "removexattr lremovexattr fremovexattr setxattrat removexattrat open_tree_attr "
         "process_madvise").split()
_COMMON = dict(io_uring_setup=425, io_uring_enter=426, io_uring_register=427, open_tree=428,
               move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433, clone3=435,
               pidfd_getfd=438, process_madvise=440, mount_setattr=442, memfd_secret=447, fchmodat2=452,
               setxattrat=463, removexattrat=466, open_tree_attr=467)
_SYSCALLS = {
    "x86_64": (0xC000003E, dict(_COMMON, shmget=29, socket=41, socketpair=53, clone=56, fork=57,
               vfork=58, execve=59, kill=62, semget=64, msgget=68, ptrace=101, setpgid=109,
               setsid=112, pivot_root=155, chroot=161, mount=165, umount2=166, init_module=175,
               kexec_load=246, add_key=248, request_key=249, keyctl=250, unshare=272,
               perf_event_open=298, prlimit64=302, name_to_handle_at=303, open_by_handle_at=304,
               setns=308, process_vm_readv=310, process_vm_writev=311, finit_module=313,
               memfd_create=319, kexec_file_load=320, bpf=321, execveat=322, userfaultfd=323,
               chmod=90, fchmod=91, chown=92, fchown=93, lchown=94, utime=132, utimes=235,
               fchownat=260, futimesat=261, fchmodat=268, utimensat=280, setxattr=188, lsetxattr=189,
               fsetxattr=190, removexattr=197, lremovexattr=198, fremovexattr=199)),
    "aarch64": (0xC00000B7, dict(_COMMON, umount2=39, mount=40, pivot_root=41, chroot=51, unshare=97,
                kexec_load=104, init_module=105, ptrace=117, kill=129, setpgid=154, setsid=157,
                msgget=186, semget=190, shmget=194, socket=198, socketpair=199, add_key=217,
                request_key=218, keyctl=219, clone=220, execve=221, perf_event_open=241,
                prlimit64=261, name_to_handle_at=264, open_by_handle_at=265, setns=268,
                process_vm_readv=270, process_vm_writev=271, finit_module=273, memfd_create=279,
                bpf=280, execveat=281, userfaultfd=282, kexec_file_load=294, setxattr=5, lsetxattr=6,
                fsetxattr=7, removexattr=14, lremovexattr=15, fremovexattr=16, fchmod=52, fchmodat=53,
                fchownat=54, fchown=55, utimensat=88)),
}
_CLONE_THREAD, _CLONE_NS = 0x10000, _NEWNS | _NEWUTS | _NEWIPC | _NEWUSER | _NEWPID | _NEWNET | 0x02000000 | 0x80


def _bpf(arch: int, nr: dict, x32: bool) -> list:
    """The filter as (code, jt, jf, k) instructions; arg 0's low word is at offset 16."""
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, KILL, EPERM, ENOSYS = 0x7FFF0000, 0x80000000, 0x50000 | errno.EPERM, 0x50000 | errno.ENOSYS
    p = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, KILL), (LD, 0, 0, 0)]
    if x32:  # x32 syscalls (nr | 0x40000000) would dodge the numbers below
        p += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, KILL)]
    for name in _DENY:
        if name in nr:
            p += [(JEQ, 0, 1, nr[name]), (RET, 0, 0, EPERM)]
    p += [(JEQ, 0, 1, nr["clone3"]), (RET, 0, 0, ENOSYS)]
    p += [(JEQ, 0, 5, nr["clone"]), (LD, 0, 0, 16), (JSET, 2, 0, _CLONE_NS), (JSET, 0, 1, _CLONE_THREAD),
          (RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]
    p += [(JEQ, 0, 4, nr["kill"]), (LD, 0, 0, 16), (JEQ, 1, 0, 0xFFFFFFFF), (RET, 0, 0, ALLOW),
          (RET, 0, 0, EPERM)]
    p += [(JEQ, 0, 4, nr["prlimit64"]), (LD, 0, 0, 16), (JEQ, 0, 1, 0), (RET, 0, 0, ALLOW),
          (RET, 0, 0, EPERM)]
    return p + [(RET, 0, 0, ALLOW)]


def _seccomp() -> bool:
    """Install the filter; False where this architecture or kernel has none."""
    machine = os.uname().machine
    if machine not in _SYSCALLS:
        return False
    arch, nr = _SYSCALLS[machine]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]

    ins = _bpf(arch, nr, machine == "x86_64")
    prog = Prog(len(ins), (Filter * len(ins))(*(Filter(*i) for i in ins)))
    if _prctl(_PR_SET_SECCOMP, 2, ctypes.byref(prog), 0, 0) != 0:
        if ctypes.get_errno() == errno.EINVAL:  # kernel built without seccomp filters
            return False
        _check(-1, "seccomp")
    return True


# ------------------------------------------------------------------------- the worker

def _confine(cfg, layers: list) -> None:
    """In the worker, before any code of the run: limits, identity, Landlock, seccomp."""
    os.chdir(cfg["work"])
    lim = cfg["limits"]
    for name, n in (("CPU", lim["cpu_s"]), ("NPROC", lim["nproc"]), ("FSIZE", lim["fsize"]),
                    ("CORE", 0), ("NOFILE", lim["nofile"]), ("MSGQUEUE", 0)):
        resource.setrlimit(getattr(resource, "RLIMIT_" + name), (n, n + (name == "CPU")))
    layers.append("rlimits")
    hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
    if cfg["uid"] is not None:  # root: a uid of this run's own, no way back
        uid = cfg["uid"]
        _check(_prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "PR_SET_KEEPCAPS")
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        keep = 4 if cfg["dac_search"] else 0  # CAP_DAC_READ_SEARCH: an interpreter under /root
        if libc.capset(hdr, (ctypes.c_uint32 * 6)(keep, keep, 0, 0, 0, 0)) != 0:
            _check(libc.capset(hdr, (ctypes.c_uint32 * 6)()), "capset")
        layers.append("uid")
    elif "userns" in layers:  # the user namespace's capabilities go too
        _check(libc.capset(hdr, (ctypes.c_uint32 * 6)()), "capset")
    _check(_prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "PR_SET_DUMPABLE")
    _check(_prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    abi = _landlock(cfg)
    if abi:
        layers.append(f"landlock{abi}")
    if "seccomp" not in cfg["skip"] and _seccomp():
        layers.append("seccomp")
    resource.setrlimit(resource.RLIMIT_AS, (lim["mem"], lim["mem"]))


def _setup_failed(e: BaseException) -> None:
    print(f"sandbox setup failed: {e!r}", file=sys.stderr, flush=True)
    traceback.print_exception(type(e), e, e.__traceback__)
    os._exit(SETUP_FAILED)


def _status(st: int) -> int:
    """A wait status as an exit code: signals as 128 + signal number (the host maps them back)."""
    return os.WEXITSTATUS(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st)


def _close(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def main() -> None:
    cfg = json.loads(sys.stdin.buffer.read())
    sys.path.extend(cfg["site"])  # started with -S: site-packages without running their .pth files
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    passed = cfg["fds"]  # the pipes of this run: only the worker may keep them
    layers: list = []
    try:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != cfg["host"]:  # the host died before we could notice
            os._exit(1)
        _namespaces(cfg, layers)  # before PR_SET_DUMPABLE: it makes /proc/self/uid_map root's
        _prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
        init = os.fork()
    except BaseException as e:
        _setup_failed(e)
    if init:  # wrapper: outside the namespaces, waits for init
        _close(passed)
        os._exit(_status(os.waitpid(init, 0)[1]))
    try:  # init: PID 1 when the namespace exists; reaps orphans until the worker is done
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        worker = os.fork()
    except BaseException as e:
        _setup_failed(e)
    if worker:
        _close(passed)
        while True:
            pid, st = os.waitpid(-1, 0)
            if pid == worker:
                os._exit(_status(st))
    try:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        _confine(cfg, layers)
        os.write(cfg["ready"], b"1")
        os.close(cfg["ready"])
    except BaseException as e:
        _setup_failed(e)
    role = cfg["role"]
    if role == "probe":
        print(json.dumps(layers), flush=True)
        os._exit(0)
    (checker.main if role == "checker" else child.main)(cfg)
