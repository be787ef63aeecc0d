"""Writing outputs so that a crash, a full disk or Ctrl-C never leaves half
of one: the file (or an evaluation's whole folder) is written beside its
target under a temporary name and renamed into place when complete.

Used for configs, summaries, reports, metrics, pictures, tuning results and
models tfface saves itself, the models saved during training included;
Keras's own log writers (CSVLogger, TensorBoard) and resume backups write
in place, and a resumed run mends them.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


def current_umask() -> int:
    """The process umask (reading it means setting it, so set it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _discard(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# Write failures whose error names no file when a write() call raises them
# (a full disk: "[Errno 28] No space left on device"), or names the
# temporary file beside the target instead of the target.
WRITE_FAILURE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM)


@contextlib.contextmanager
def naming_the_target(target, temporary=None, note="anything there before is unchanged"):
    """Re-raises a write failure in the block as one that names `target`
    and says `note`. Only a failure that names no file, or names one under
    `temporary` (the path the target is written at first), is the
    target's: a block that also reads (an evaluation reading its images)
    keeps the errors that name other files as they are, and a failure an
    inner block named already is not named again."""
    try:
        yield
    except OSError as e:
        named = os.fsdecode(e.filename) if e.filename is not None else None
        ours = named is None or (temporary is not None and named.startswith(os.fspath(temporary)))
        if e.errno not in WRITE_FAILURE_ERRNOS or not ours or isinstance(e, FolderBusyError) or hasattr(e, "target"):
            raise
        error = OSError(e.errno, f"{e.strerror or os.strerror(e.errno)}, writing {target} ({note})")
        error.target = target
        raise error from e


@contextlib.contextmanager
def atomic_path(path, suffix: str = ""):
    """Yields a temporary path beside `path` to write to; it replaces
    `path` only if the block ends without an error. `suffix` keeps writers
    that check the file name happy (Keras wants ".keras"). A symlink is
    followed (its target is replaced); a pipe or device (`/dev/stdout`) is
    written directly, as it cannot be replaced."""
    path = Path(os.path.realpath(path))
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a file")
    if path.exists() and not path.is_file():
        yield path
        return
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder not found for {path}")
    with naming_the_target(path, temporary=path.parent / f".{path.name}."):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
        os.close(fd)
        tmp = Path(tmp)
        try:
            yield tmp
            # mkstemp makes the file private; give it the usual permissions.
            os.chmod(tmp, 0o666 & ~current_umask())
            os.replace(tmp, path)
        except BaseException:
            _discard(tmp)
            raise


def write_atomic(path, data) -> Path:
    """Writes text or bytes to `path` whole, or not at all."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if tmp.is_file():  # pipes and devices cannot be synced
                os.fsync(f.fileno())
    return Path(path)


def save_model_atomic(model, path) -> Path:
    """`model.save(path)` for a `.keras` file, whole or not at all (Keras
    writes straight into its target)."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"{path}: a model file must end in .keras")
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)
        with open(tmp, "rb") as f:  # on disk before the rename makes it the model
            os.fsync(f.fileno())
    return path


def sync_folder(folder) -> None:
    """fsync every file and folder under `folder`, deepest first, and the
    folder itself: a folder renamed into place after this holds its data
    after a power cut too (without it, the rename can reach the disk before
    the files' contents, leaving a complete-looking folder of empty files)."""
    folder = Path(folder)
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        sync_directory(root)


def sync_directory(folder) -> None:
    """fsync a folder's entries (the names renamed or created in it), where
    the system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder
        pass
    finally:
        os.close(fd)


def discard_leftovers(path) -> list:
    """Removes the temporary files `atomic_path` writes beside `path` that a
    killed process left (`.NAME.*.tmp*`); returns their names. Only for a
    caller that alone writes `path` (one that holds its folder's lock)."""
    path = Path(path)
    removed = []
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp*"):
        if leftover.is_file():
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
                removed.append(leftover.name)
    return removed


def check_output_folder(out_dir, may_replace: Callable[[str], bool], marker: str) -> Path:
    """Refuses an output folder `replaced_folder` would not replace (see
    there), so a command can check it before its work; returns its real path."""
    out_dir = Path(os.path.realpath(out_dir))
    if not out_dir.exists():
        return out_dir
    if not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} is a file, not an output folder")
    entries = list(out_dir.iterdir())
    foreign = sorted(p.name for p in entries if not (p.is_file() and may_replace(p.name)))
    if foreign:
        raise FileExistsError(
            f"{out_dir} holds other files ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
            "choose a new or empty output folder"
        )
    if entries and not (out_dir / marker).is_file():
        shown = sorted(p.name for p in entries)
        raise FileExistsError(
            f"{out_dir} holds {', '.join(shown[:3])}{', ...' if len(shown) > 3 else ''} but no {marker}, so it "
            "is not a whole earlier output to replace; choose a new or empty output folder"
        )
    cwd = Path.cwd().resolve()
    if out_dir == cwd or out_dir in cwd.parents:
        raise ValueError(f"{out_dir} holds the working directory; choose another output folder")
    return out_dir


@contextlib.contextmanager
def replaced_folder(out_dir, may_replace: Callable[[str], bool], marker: str):
    """Yields an empty folder beside `out_dir` to fill; when the block ends
    without an error it becomes `out_dir`, replacing an earlier one whole
    (no mix of old and new files) and keeping its permissions. Checked
    before any work: a non-empty `out_dir` is replaced only if it holds
    `marker` (the file that says it is an earlier output of the same kind)
    and every entry in it is a file `may_replace(name)` accepts; any other
    folder is refused, never emptied, as is one that holds the working
    directory. The folder beside it is made in its parent, which must be
    writable."""
    out_dir = check_output_folder(out_dir, may_replace, marker)
    mode = (out_dir.stat().st_mode & 0o7777) if out_dir.exists() else 0o777 & ~current_umask()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir.parent, os.W_OK | os.X_OK):
        raise PermissionError(
            f"cannot write in {out_dir.parent}: the output is written in a new folder beside {out_dir.name} "
            "and renamed into place, so its parent folder must be writable"
        )
    with working_folder(out_dir.parent, f".{out_dir.name}.tmp-") as staging, naming_the_target(out_dir, staging):
        try:
            yield staging
            os.chmod(staging, mode)
            sync_folder(staging)
            if not out_dir.exists():
                os.replace(staging, out_dir)
                sync_directory(out_dir.parent)
                return
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            try:
                os.replace(out_dir, old)
            except BaseException:
                old.rmdir()
                raise
            try:
                os.replace(staging, out_dir)
            except BaseException:
                os.replace(old, out_dir)  # put the earlier output back
                raise
            sync_directory(out_dir.parent)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            _discard(staging)
            raise


@contextlib.contextmanager
def closing_files_of_a_failed_write():
    """A write that fails inside Keras (a full disk during a resume backup)
    leaves its HDF5 file open, held by the traceback. Released later, in
    whatever order the garbage collector picks, its objects crashed the
    process (segfault, after the error was printed); closed here the way
    h5py closes a file (its objects first), quietly. (Where KerasTuner has
    caught the failed write itself, the file is past closing: only
    `require_free_space` before the write avoids that crash.)"""
    try:
        yield
    except OSError:
        import h5py

        hook = sys.unraisablehook
        sys.unraisablehook = lambda unraisable: None  # h5py reports the failed close again
        try:
            for file_id in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE):
                with contextlib.suppress(Exception):
                    h5py.File(file_id).close()
        finally:
            sys.unraisablehook = hook
        raise


def estimated_weights_file_bytes(variables) -> int:
    """Bytes a `.weights.h5` of `variables` takes: their values plus HDF5's
    bookkeeping (about 4 KiB each)."""
    import numpy as np

    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize + 4096 for v in variables)


def require_free_space(folder, file_bytes: int, what: str, freed: int = 0, hint: str = "") -> None:
    """Raises OSError(ENOSPC) naming `what` and `folder` unless the disk
    holding `folder` has room for a file of about `file_bytes` (10% and
    1 MiB to spare), counting `freed` bytes the write removes first.
    Checked before HDF5 writes: HDF5 crashed the process (segfault) when
    the disk filled in the middle of its file."""
    needed = int(file_bytes * 1.1) + (1 << 20)
    folder = Path(folder)
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free + freed < needed:
        raise OSError(
            errno.ENOSPC,
            f"not enough free space for {what} in {folder}: it needs about {needed / 2**20:.1f} MB, "
            f"{free / 2**20:.1f} MB are free" + (f"; {hint}" if hint else ""),
        )


try:
    import fcntl

    _CAN_LOCK = True
except ImportError:  # Windows
    _CAN_LOCK = False


class FolderBusyError(OSError):
    """Another process holds the folder's lock (`folder_lock(wait=False)`)."""


@contextlib.contextmanager
def folder_lock(folder, wait: bool = True):
    """Holds an exclusive lock on `folder` (flock) for the block, so two
    processes never write its files at once, and yields whether it holds
    one: not on Windows, nor on a file system without locks (NFS mounted
    with nolock), where the block runs unguarded. `wait=False` raises
    `FolderBusyError` at once instead of waiting."""
    if not _CAN_LOCK:
        yield False
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise FolderBusyError(f"{folder} is in use by another process") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                raise
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def claimed_folder(folder, busy_message: str, lock: bool = True):
    """`folder`, made if need be and, with `lock`, locked for the block
    (`folder_lock`): a second process that claims it while the block runs
    gets `FolderBusyError(busy_message)` instead of writing the same files.
    A folder this call made is removed again if the block fails while it
    is still empty."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if lock:
            try:
                stack.enter_context(folder_lock(folder, wait=False))
            except FolderBusyError:
                raise FolderBusyError(busy_message) from None
        try:
            yield folder
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only while still empty
            raise


@contextlib.contextmanager
def working_folder(parent, prefix: str):
    """A new folder `parent/<prefix><random>` to write a large output in
    before it is renamed into place, locked while the block runs. Folders
    of that prefix no process holds are what a killed run left (nothing
    renamed them into place): they are removed first, so they do not pile
    up. Where folders cannot be locked none is removed."""
    parent = Path(parent)
    with contextlib.ExitStack() as held:
        with folder_lock(parent) as locked:  # no other process is between creating its folder and locking it
            for stale in parent.iterdir() if locked else ():
                if stale.name.startswith(prefix) and stale.is_dir() and not stale.is_symlink():
                    try:
                        with folder_lock(stale, wait=False) as free:
                            if free:
                                shutil.rmtree(stale, ignore_errors=True)
                                log.warning("removed %s, left by an interrupted run", stale)
                    except FolderBusyError:
                        pass  # being written by another process
                    except OSError:
                        pass  # gone meanwhile, or not ours to open
            folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
            held.enter_context(folder_lock(folder, wait=False))
        yield folder
