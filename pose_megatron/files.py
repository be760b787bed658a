"""Writing files and directories so that a reader never sees a half-written one.

Everything this project writes for others to read (checkpoints, exports, datasets, caches, results)
is written under a temporary name beside its final place and renamed when complete: a rename within
one directory is atomic, so a kill at any moment leaves either the old content or the new one.
Temporary names start with a dot and carry the writer's pid, so a leftover is recognisable, hidden
from globbing readers, and never confused with another live writer's.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, List, Union

PathLike = Union[str, os.PathLike]

INCOMPLETE_SUFFIX = ".incomplete"
"""Suffix of a directory being written (`.NAME.incomplete`); what `atomic_directory` leaves after a
kill, and what loaders name when they find one instead of the real thing."""


def temporary_sibling(path: PathLike, tag: str = "") -> Path:
    """A hidden, process-specific name next to `path` (same directory, so a rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}{tag}.tmp-{os.getpid()}")


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def exchange_paths(a: PathLike, b: PathLike) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE).

    False, with nothing changed, where the C library or the file system cannot (older kernels and
    glibc, some network file systems); the caller then falls back to two renames."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(a), os.fspath(b))


def is_writable(path: PathLike) -> bool:
    """Whether `path` (existing, or to be created) can be written: a probe file in its nearest
    existing directory. (root's os.access ignores permissions but not read-only mounts; a probe
    sees both, and ACLs too.)"""
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        return False
    try:
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def remove_stale_temporaries(path: PathLike) -> List[Path]:
    """Remove the temporaries of `path` (see temporary_sibling) whose writer process is gone: what
    a killed run left behind. Live writers' temporaries are kept. Returns what was removed."""
    path = Path(path)
    removed = []
    for candidate in path.parent.glob(f".{glob.escape(path.name)}*.tmp-*"):
        pid = candidate.name.rsplit(".tmp-", 1)[1].split(".", 1)[0].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            if candidate.is_dir():
                shutil.rmtree(candidate, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    candidate.unlink()
            removed.append(candidate)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Build one file under a temporary name (for writers that take a path, e.g. a GGUF writer);
    it replaces `path` only if the block succeeds, fsynced. On an exception the temporary is removed
    and `path` is untouched."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never a mix; fsynced."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def incomplete_name(final: PathLike) -> Path:
    """Where `atomic_directory` builds `final`: `.NAME.incomplete` beside it."""
    final = Path(final)
    return final.with_name(f".{final.name}{INCOMPLETE_SUFFIX}")


@contextlib.contextmanager
def atomic_directory(final: PathLike, *, replace: bool = False,
                     concurrent: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name; it appears as `final` only if the block succeeds.

    Yields the (new, empty) temporary directory. A leftover temporary directory from an earlier,
    killed attempt is removed first. On an exception the temporary directory is removed and the
    exception propagates; `final` is untouched. With `replace`, an existing `final` is swapped out
    only after the new one is complete, in one atomic exchange where the file system allows
    (`exchange_paths`), so `final` always names one complete copy; elsewhere the old copy is
    renamed aside, the new one renamed in, then the old one deleted (for an instant `final` is
    absent, the old copy still complete beside it). `concurrent` is for writers that may run side
    by side (e.g. caches built by several processes): each gets its own temporary name and none
    removes another's.
    """
    final = Path(final)
    if final.exists() and not replace:
        raise FileExistsError(f"{final} already exists")
    if concurrent:
        tmp = temporary_sibling(final, f"-{uuid.uuid4().hex[:8]}")
    else:
        tmp = incomplete_name(final)
        if tmp.exists():
            shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists() and not replace:  # only with `concurrent`: another writer came first
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileExistsError(f"{final} was created by another writer meanwhile")
    try:
        if final.exists() and exchange_paths(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old copy
        elif final.exists():
            aside = temporary_sibling(final, f".old-{uuid.uuid4().hex[:8]}")
            os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except OSError as err:
        # Only with `concurrent`: another writer put its complete copy in place first.
        shutil.rmtree(tmp, ignore_errors=True)
        if final.exists():
            raise FileExistsError(f"{final} was created by another writer meanwhile") from err
        raise
