"""Replacing a whole folder at once (the harness's references): a reader, a crash or a kill sees
the old set or the new one, never a mix.

The new set is written into a hidden sibling folder; then the two folders are exchanged with one
``renameat2(RENAME_EXCHANGE)`` call (Linux 3.15+, ext4, xfs, btrfs, tmpfs), which is atomic, and the
old set (now in the sibling) is deleted. Where the exchange is not available, the old folder is
renamed aside and the new one into place; a kill between the two renames is repaired by
:func:`recover` on the next run (the old set comes back).
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path

from .files import _UMASK, disk_error, signals_deferred

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a, b) -> bool:
    """Swap two paths atomically; False where the system cannot (then nothing happened)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(os.fspath(a)), _AT_FDCWD, os.fsencode(os.fspath(b)), _RENAME_EXCHANGE) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(e, os.strerror(e), os.fspath(b))


def _aside(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.old"


def recover(dest) -> None:
    """Undo what a kill in the middle of a replacement left: the old set back in place if the
    folder is gone, and no half-written sibling folders."""
    dest = Path(dest)
    old = _aside(dest)
    if old.exists():
        if not dest.exists():
            os.rename(old, dest)
        else:
            shutil.rmtree(old, ignore_errors=True)
    if dest.parent.is_dir():
        for p in dest.parent.glob(f".{dest.name}.new-*"):
            shutil.rmtree(p, ignore_errors=True)


def replace_folder(dest, fill) -> None:
    """Make ``dest`` hold what ``fill(folder)`` writes into an empty folder, all at once."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover(dest)
    try:
        new = Path(tempfile.mkdtemp(prefix=f".{dest.name}.new-", dir=dest.parent))
    except OSError as e:
        raise disk_error(dest, e) from None
    try:
        os.chmod(new, 0o777 & ~_UMASK)
        fill(new)
        with signals_deferred():
            if not dest.exists():
                os.rename(new, dest)
            elif exchange(new, dest):
                shutil.rmtree(new, ignore_errors=True)  # the old set, now in the sibling
            else:
                old = _aside(dest)
                os.rename(dest, old)
                os.rename(new, dest)
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
