"""Files that are complete or absent.

Every output of the project goes through here: it is written to a hidden temporary name in its
own folder, flushed, and renamed into place (``os.replace`` is atomic on POSIX and Windows), so a
reader, a crash or a kill at any moment sees the previous file or the new one, never a part.
A full disk becomes one DeepvisError line and leaves no temporary behind. JSON is strict (NaN and
infinities become null), so every results file parses with any JSON reader.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import signal
import tempfile
import threading

from .errors import DeepvisError


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the running work stops and what is done is saved."""


_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)
_UMASK = os.umask(0)
os.umask(_UMASK)
TMP_SUFFIX = ".partial"


def disk_error(path, e: OSError) -> DeepvisError:
    """One line for a failed write: full disk, no permission, or what the system said."""
    path = os.fspath(path)
    if e.errno in _FULL:
        return DeepvisError(f"disk full while writing {path}: free some space and rerun "
                            "(finished files were kept; nothing was half-written)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return DeepvisError(f"cannot write {path}: {e.strerror} (a read-only or protected folder)")
    return DeepvisError(f"cannot write {path}: {e.strerror or e}")


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", fsync: bool = True):
    """``with atomic_write(p) as f: f.write(...)``: p appears whole when the block ends, or not
    at all (an exception, Ctrl-C or a kill inside the block leaves p as it was)."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=TMP_SUFFIX, dir=folder)
    except OSError as e:
        raise disk_error(path, e) from None
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs follow the umask
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, DeepvisError):
            raise disk_error(path, e) from None
        raise


def write_bytes(path, data: bytes, fsync: bool = True) -> None:
    with atomic_write(path, "wb", fsync=fsync) as f:
        f.write(data)


def write_text(path, text: str, fsync: bool = True) -> None:
    write_bytes(path, text.encode("utf-8"), fsync=fsync)


def strict(obj):
    """A copy of obj that strict JSON can hold: NaN / inf -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path, obj, indent: int | None = 1) -> None:
    write_text(path, json.dumps(strict(obj), indent=indent, allow_nan=False) + "\n")


def image_file_ok(path) -> bool:
    """The file exists and decodes whole (a truncated JPEG, which resume logic would otherwise
    count as done forever, does not)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # missing, truncated, garbage: all mean "make it again"
        return False


def save_npz(path, **arrays) -> None:
    """numpy arrays, written atomically; read back with np.load(path, allow_pickle=False)."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(path, buf.getvalue())


def file_sha256(path) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB chunks (a caffemodel can be hundreds of MB)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def tensors_sha256(tensors: dict, tail: bytes = b"") -> str:
    """SHA-256 of named torch tensors (name, dtype, shape and bytes, in name order; bfloat16,
    which numpy cannot hold, as float32), then ``tail``: what identifies a model's weights (the
    atlas's manifest, the Caffe cache's seal). arrays_digest is its numpy twin for sealed .npz
    files; the two keep their own formats so that no stored digest changes."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update((t.float() if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    h.update(tail)
    return h.hexdigest()


DIGEST_KEY = "_sha256"


def arrays_digest(arrays: dict) -> str:
    """SHA-256 of named numpy arrays (names, dtypes, shapes and bytes, in name order)."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for name in sorted(k for k in arrays if k != DIGEST_KEY):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_sealed_npz(path, **arrays) -> str:
    """save_npz with the arrays' digest stored beside them; returns the digest."""
    import numpy as np

    digest = arrays_digest(arrays)
    save_npz(path, **arrays, **{DIGEST_KEY: np.array(digest)})
    return digest


def load_sealed_npz(path, what: str, expected: str | None = None) -> dict:
    """The arrays of a save_sealed_npz file, checked against their own digest (and the expected
    one, e.g. a manifest's): a truncated, damaged or hand-edited file is a DeepvisError naming
    it, and so is one without its digest: deleting the seal must not unseal a file."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error
        raise DeepvisError(f"{what} {path} is damaged ({str(e)[:120] or type(e).__name__})") from None
    stored = str(arrays.pop(DIGEST_KEY)) if DIGEST_KEY in arrays else None
    if stored is None:
        raise DeepvisError(f"{what} {path} has no digest (edited by hand, or not written by this tool); "
                           "remove it and rerun")
    actual = arrays_digest(arrays)
    if stored != actual or (expected is not None and expected != actual):
        raise DeepvisError(f"{what} {path} does not match its digest (damaged or edited by hand)")
    return arrays


def remove_stale_partials(folder) -> int:
    """Delete temporaries a killed run left in folder (SIGKILL cannot be cleaned up after)."""
    n = 0
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))
                    n += 1
    return n


def check_writable_file(path, what: str) -> None:
    """Before any work: the folder of an output file exists and can be written to."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise DeepvisError(f"{what}: folder {folder} does not exist (for {path})")
    if not os.access(folder, os.W_OK):
        raise DeepvisError(f"{what}: folder {folder} is not writable (for {path})")


def check_output_dir(path, what: str) -> None:
    """Before any work: a folder that will be written (made if new) is not a file, and it, or
    the nearest folder above it that exists, can be written to."""
    p = os.path.abspath(os.fspath(path))
    if os.path.exists(p) and not os.path.isdir(p):
        raise DeepvisError(f"{what}={path} is a file, not a folder")
    probe = p
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise DeepvisError(f"{what}={path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DeepvisError(f"{what}={path}: folder {probe} is not writable")


@contextlib.contextmanager
def folder_lock(folder, what: str, advice: str):
    """Hold folder for one writer: a second run on it is refused in one line naming the first
    (its process id), instead of both writing and one deleting the other's temporaries. The lock
    is the kernel's (flock on folder/.lock), so a killed holder releases it at once."""
    import fcntl

    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise DeepvisError(f"{what} {folder} is in use by another run (process {holder}); {advice}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield folder
    finally:
        os.close(fd)  # releases the lock


def remove_stale_partials_below(folder) -> int:
    """remove_stale_partials in folder and every folder below it (a montage phase writes into
    max_im/<layer>/ ...)."""
    n = 0
    for root, _dirs, _files in os.walk(folder):
        n += remove_stale_partials(root)
    return n


@contextlib.contextmanager
def signals_deferred():
    """Let a writing phase finish: SIGINT / SIGTERM arriving inside the block are held and
    delivered (as KeyboardInterrupt / Terminated) when it ends. Only in the main thread;
    elsewhere a no-op (Python delivers signals to the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {}

    def hold(signum, _frame):
        got.append(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        old[s] = signal.signal(s, hold)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if got:
            # The handler that was in force decides (the CLI's SIGTERM handler records that the
            # run was terminated, for exit status 143, and raises Terminated itself).
            handler = old[got[0]]
            if callable(handler):
                handler(got[0], None)
            raise Terminated if got[0] == signal.SIGTERM else KeyboardInterrupt


#: Setting and backend files are a few hundred bytes; these bounds refuse a hostile file (an alias
#: "billion laughs" bomb of 491 bytes expands without end) before anything is expanded.
MAX_YAML_BYTES = 64 * 1024
MAX_YAML_NODES = 10_000


def load_yaml_file(path, what: str):
    """A small YAML file (a setting, a backend config) as an OmegaConf config, or one DeepvisError
    line: larger than MAX_YAML_BYTES, more than MAX_YAML_NODES values once its aliases are
    expanded, nested past Python's recursion limit, not UTF-8, or not YAML. Tags that construct
    objects (!!python/...) are refused by the safe loader."""
    import yaml
    from omegaconf import OmegaConf

    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        if size > MAX_YAML_BYTES:
            raise DeepvisError(f"{what} {path} is {size:,} bytes; a {what} holds at most {MAX_YAML_BYTES:,}")
        with open(path, "rb") as f:
            text = f.read(MAX_YAML_BYTES + 1).decode("utf-8")
    except UnicodeDecodeError:
        raise DeepvisError(f"{what} {path} is not UTF-8 text") from None
    except OSError as e:
        raise DeepvisError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # aliases stay shared: linear in the file
        if root is not None and _expanded_nodes(root) > MAX_YAML_NODES:
            raise DeepvisError(f"{what} {path} expands to more than {MAX_YAML_NODES:,} values (YAML aliases); "
                               "refused")
        data = yaml.safe_load(text)
    except DeepvisError:
        raise
    except RecursionError:
        raise DeepvisError(f"{what} {path} is nested too deeply") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DeepvisError(f"cannot read {what} {path}: {first}") from None
    try:
        return OmegaConf.create(data if data is not None else {})
    except Exception as e:  # keys OmegaConf cannot hold (a list of lists as a key, ...)
        raise DeepvisError(f"cannot read {what} {path}: {str(e).splitlines()[0][:200]}") from None


def _expanded_nodes(root) -> int:
    """How many values the YAML graph holds once every alias is expanded (memoized per node, so
    a bomb is measured without expanding it)."""
    import yaml

    memo: dict[int, int] = {}

    def size(node, depth=0) -> int:
        key = id(node)
        if key in memo:
            return memo[key]
        memo[key] = MAX_YAML_NODES + 1  # a cycle counts as too large
        if isinstance(node, yaml.MappingNode):
            n = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            n = 1 + sum(size(v, depth + 1) for v in node.value)
        else:
            n = 1
        memo[key] = min(n, 10 * MAX_YAML_NODES)
        return memo[key]

    return size(root)
