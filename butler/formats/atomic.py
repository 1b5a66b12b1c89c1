"""Atomic writes: build the output beside its target, make it durable, then rename it into place.

Every writer in :mod:`butler.formats` goes through this module, so a reader (or the registry) never
sees a half-written file:

1. the data are written to a hidden sibling of the target (same directory, hence same filesystem,
   so the final rename is atomic): ``.<name>.tmp-<random>``;
2. the temporary file -- or every file of a temporary directory tree -- is ``fsync``-ed, and so
   are the directories holding them;
3. the temporary is renamed onto the target (``os.replace`` for files) and the parent directory is
   ``fsync``-ed so that the rename itself survives a power cut;
4. if anything raises before step 3 (including ``KeyboardInterrupt``) the temporary is removed
   and the target is left untouched -- no partial file ever appears under the target's name.

Targets are never overwritten unless ``overwrite=True``.  Without it, a file is published with
``os.link`` (which fails if the name exists, closing the check-then-rename race) and a directory with
``os.rename`` (which refuses a non-empty target).  Replacing an existing *directory* takes two
renames (old tree aside, new tree in); the old tree is restored if the second rename fails, and
removed once the new one is in place.  POSIX has no portable atomic directory swap, so a crash
between the two renames can leave the old tree under a hidden ``.<name>.old-<random>`` name: the
data are not lost, and :func:`is_temporary_name` lets a datastore recognise and clean such names.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import FormatError

__all__ = [
    "atomic_directory",
    "atomic_file",
    "atomic_write_bytes",
    "fsync_directory",
    "fsync_tree",
    "is_temporary_name",
    "temporary_sibling",
]

_log = logging.getLogger(__name__)

_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"


def temporary_sibling(target: str | os.PathLike[str], mark: str = _TMP_MARK) -> Path:
    """A fresh hidden path in the target's directory: ``<dir>/.<name>.tmp-<random>``."""
    target = target if isinstance(target, Path) else Path(target)
    return target.with_name(f".{target.name}{mark}{os.urandom(6).hex()}")


def is_temporary_name(name: str) -> bool:
    """True for names made by this module (in-progress writes, or an old tree set aside)."""
    return name.startswith(".") and (_TMP_MARK in name or _OLD_MARK in name)


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """``fsync`` a directory so that the names created in (or renamed into) it are durable.

    Silently does nothing on platforms that cannot open directories (Windows).
    """
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # pragma: no cover - some filesystems refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike[str]) -> None:
    """``fsync`` every regular file below ``path``, then every directory, deepest first."""
    directories: list[str] = []
    for root, _dirs, files in os.walk(os.fspath(path)):
        directories.append(root)
        for name in files:
            _fsync_file(os.path.join(root, name))
    for directory in reversed(directories):
        fsync_directory(directory)


def _remove(path: Path, attempts: int = 3) -> None:
    """Remove a file or a directory tree, ignoring a path that is already gone.

    A tree is retried a few times: if the writer was interrupted (e.g. ``KeyboardInterrupt``)
    while background threads were still writing into it, a first ``rmtree`` can race with them.
    """
    error: OSError | None = None
    for attempt in range(attempts):
        if not (path.exists() or path.is_symlink()):
            return
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as exc:  # includes a file vanishing under rmtree: look again
            error = exc
            time.sleep(0.05 * (attempt + 1))
    if path.exists() or path.is_symlink():
        _log.warning("could not remove %s (left behind; is_temporary_name() recognises it): %s", path, error)


def _exists_error(target: Path) -> FormatError:
    return FormatError(f"{target} already exists; pass overwrite=True to replace it")


def _check_target(target: Path, overwrite: bool) -> None:
    # One lstat for "exists or is a (dangling) symlink", one stat for the parent: a put of a
    # small file made seven such calls, ~10% of its time (measured).
    if not overwrite and os.path.lexists(target):
        raise _exists_error(target)
    parent = target.parent
    if not parent.is_dir():
        parent.mkdir(parents=True, exist_ok=True)


def _publish_file(tmp: Path, target: Path, overwrite: bool) -> None:
    if overwrite:
        if target.is_dir() and not target.is_symlink():
            raise FormatError(f"{target} is a directory; cannot replace it with a file")
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)  # atomic "create if absent"
    except FileExistsError:
        raise _exists_error(target) from None
    except OSError as exc:  # no hard links on this filesystem: best effort check-then-rename
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if target.exists():
            raise _exists_error(target) from None
        os.replace(tmp, target)
        return
    tmp.unlink()


@contextlib.contextmanager
def atomic_file(
    target: str | os.PathLike[str], *, overwrite: bool = False, fsync: bool = True
) -> Iterator[Path]:
    """Context manager yielding a temporary path to write; published at ``target`` on success.

    Parameters
    ----------
    target : path-like
        Final file name.  Missing parent directories are created.
    overwrite : bool
        Replace an existing file; otherwise an existing target raises :class:`FormatError`
        (checked before anything is written, and again, atomically, at publication).
    fsync : bool
        Flush the file and its directory to stable storage (the default).  ``False`` keeps the
        rename atomic for other processes but not across a power cut; for scratch data.

    Yields
    ------
    pathlib.Path
        The temporary path; the caller creates and writes it (any library may open it by name).

    Raises
    ------
    FormatError
        ``target`` exists and ``overwrite`` is false, or the caller did not create the file.
    """
    target = Path(target)
    _check_target(target, overwrite)
    tmp = temporary_sibling(target)
    try:
        yield tmp
        if not tmp.is_file():
            raise FormatError(f"writing {target}: the writer produced no file at {tmp}")
        _finish_file(tmp, target, overwrite, fsync)
    except BaseException:
        _remove(tmp)
        raise


def _finish_file(tmp: Path, target: Path, overwrite: bool, fsync: bool) -> None:
    """Steps 2-3 for a complete temporary file: sync it if asked, publish it, sync the directory."""
    if fsync:
        _fsync_file(os.fspath(tmp))
    _publish_file(tmp, target, overwrite)
    if fsync:
        fsync_directory(target.parent)
    _log.debug("wrote %s atomically", target)


def atomic_write_bytes(
    target: str | os.PathLike[str], data: bytes, *, overwrite: bool = False, fsync: bool = True
) -> Path:
    """Write ``data`` to ``target`` atomically (see :func:`atomic_file`); returns the target path."""
    target = target if isinstance(target, Path) else Path(target)
    _check_target(target, overwrite)
    tmp = temporary_sibling(target)
    try:
        with open(tmp, "xb") as stream:
            stream.write(data)
        _finish_file(tmp, target, overwrite, fsync)
    except BaseException:
        _remove(tmp)
        raise
    return target


@contextlib.contextmanager
def atomic_directory(
    target: str | os.PathLike[str], *, overwrite: bool = False, fsync: bool = True
) -> Iterator[Path]:
    """Context manager yielding a fresh temporary directory; renamed to ``target`` on success.

    Used for directory formats such as Zarr groups: the whole tree is written aside, every file
    in it is ``fsync``-ed, and one rename publishes it.

    Parameters
    ----------
    target : path-like
        Final directory name.  Missing parent directories are created.
    overwrite : bool
        Replace an existing target (file or directory): the old one is renamed aside, the new one
        renamed in, and the old one deleted.  Otherwise an existing target raises
        :class:`FormatError`.
    fsync : bool
        Make the tree and the renames durable (the default).

    Yields
    ------
    pathlib.Path
        The temporary directory (already created, empty).

    Raises
    ------
    FormatError
        ``target`` exists and ``overwrite`` is false.
    """
    target = Path(target)
    _check_target(target, overwrite)
    tmp = temporary_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        if fsync:
            fsync_tree(tmp)
        _publish_directory(tmp, target, overwrite)
        if fsync:
            fsync_directory(target.parent)
    except BaseException:
        _remove(tmp)
        raise
    _log.debug("wrote directory %s atomically", target)


def _publish_directory(tmp: Path, target: Path, overwrite: bool) -> None:
    if not (target.exists() or target.is_symlink()):
        try:
            os.rename(tmp, target)
            return
        except OSError as exc:
            # Someone created the target since the check: fall through to the "exists" handling.
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise
    if not overwrite:
        raise _exists_error(target)
    old = temporary_sibling(target, _OLD_MARK)
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)  # put the previous version back
        raise
    try:
        _remove(old)
    except OSError as exc:  # the new data are in place; a leftover is only clutter
        _log.warning("could not remove the replaced %s (set aside as %s): %s", target, old, exc)
