"""Atomic artifact writes: a kill at any moment leaves the old file or the new one, never half.

Write to a temporary name in the same folder, fsync, rename over the target, fsync the folder
(so the rename itself survives a power cut). Every artifact, metrics file and checkpoint goes
through here. A folder that is one artifact (an expert, a CEM result, a LoRA adapter, the model
stage's checkpoint + model.json) is written whole into a temporary sibling and swapped in with one
rename (`atomic_dir`), so no reader ever sees the weights of one run beside the metadata of another.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """`with atomic_path(p) as tmp: write(tmp)` — on success `tmp` replaces `p`; on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_tree(folder: Path) -> None:
    for root, dirs, files in os.walk(folder):
        for name in files:
            with open(Path(root) / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where the OS or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def temp_siblings(path: Path) -> list[Path]:
    """Temporary folders `atomic_dir` left beside `path` when a writer was killed."""
    return sorted(path.parent.glob(f".{path.name}.tmp-*"))


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """`with atomic_dir(folder) as tmp: write(tmp / ...)` — on success the whole of `tmp` takes the place of
    `folder` in one rename (an atomic exchange when `folder` exists, then the old copy is deleted); on error,
    or a kill, `folder` keeps its old contents. Where the OS has no atomic exchange (not Linux, or a file
    system without it), the old folder is renamed away first: a kill in between leaves no folder, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in temp_siblings(path):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if not path.exists() and not path.is_symlink():
            os.rename(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
            os.replace(path, old / "old")
            os.rename(tmp, path)
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_text(data: Any, *, indent: int = 2, sort_keys: bool = True) -> str:
    """The project's JSON file format: indented, keys sorted (the same data gives the same bytes), newline."""
    return json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n"


def atomic_write_json(path: str | Path, data: Any, *, indent: int = 2, sort_keys: bool = True) -> Path:
    return atomic_write_text(path, json_text(data, indent=indent, sort_keys=sort_keys))


def write_json_files(folder: Path, files: Optional[Mapping[str, Any]]) -> None:
    """{name: data} as JSON files in `folder`: what a folder artifact's writer adds inside its `atomic_dir`, so
    that its records (validations, dispatch predictions, shots) are part of the one unit."""
    for name, data in (files or {}).items():
        if Path(name).name != name or not name.endswith(".json"):
            raise ValueError(f"extra file {name!r}: a plain .json file name, no folder")
        (folder / name).write_text(json_text(data))


def atomic_save(path: str | Path, save: Callable[[Path], Any]) -> Path:
    """Atomic write through a library's own saver (`torch.save`, safetensors' `save_file`, `savefig`)."""
    with atomic_path(path) as tmp:
        save(tmp)
    return Path(path)


def load_torch_checkpoint(path: str | Path) -> Optional[dict]:
    """A resumable run's checkpoint, or None (with a note) when it cannot be read: a damaged cache file
    means starting afresh, not a crash."""
    import pickle

    import torch

    try:
        data = torch.load(path, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        print(f"note: {path} cannot be read ({type(err).__name__}); starting afresh")
        return None
    if not isinstance(data, dict):
        print(f"note: {path} is not a checkpoint; starting afresh")
        return None
    return data


def safetensors_bytes(tensors: dict, metadata: Optional[dict[str, str]] = None) -> bytes:
    """safetensors.torch.save with its JSON header in sorted key order: the library keeps metadata in a hash
    map whose order changes from call to call, so the same tensors and metadata would not give the same bytes
    (and the same result would look changed to DVC and to a determinism check)."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes
    return len(header).to_bytes(8, "little") + header + data[8 + n:]
