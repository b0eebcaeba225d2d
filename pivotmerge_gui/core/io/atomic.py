"""Atomic, input-protecting file writes: everything PivotMerge writes goes through here.

A write goes to a temp file in the destination folder (same file system, so the final
``os.replace`` is atomic), is flushed and fsynced, then renamed over the destination and
the folder fsynced. If the write function raises (or the process dies) the destination
keeps its previous content and the temp file is removed (a killed process can leave a
``.*.pmtmp`` file, never a half-written destination).

Before writing we refuse (:class:`OutputError`) to replace any ``protected`` path (the
input checkpoints) -- compared by resolved path, so symlinks are followed, and by
``(st_dev, st_ino)``, so hard links are caught too -- and to replace an existing output
unless ``overwrite=True``.

Whole output folders (:func:`atomic_folder`, what a merge's save uses) are all-or-nothing:
everything is written into a sibling temp folder ``.OUT.tmp-<random>`` (same parent, so
same file system), each file and the folder are fsynced, then the folder is swapped in. A
new ``OUT`` is one ``os.rename(tmp, OUT)``; an existing one (``overwrite=True``) is renamed
aside to ``.OUT.old-<random>``, the temp folder renamed to ``OUT``, and the old one removed.
A crash between those two renames leaves ``OUT`` missing, with the complete old output in
``.OUT.old-*`` beside the complete new one in ``.OUT.tmp-*``; the next save into ``OUT``
(:func:`recover_folder`, run under the lock) restores the old folder and removes the
leftovers, so a reader only ever finds the old or the new complete set. A lock file
``.OUT.lock`` in the parent (created with ``O_EXCL``, holding the writer's pid; stale once
that process is gone) keeps two writers apart (:class:`OutputLocked`). Files of ``OUT``
that the save does not write are carried into the new folder (hard links, else copies);
sub-folders are refused, since they could not be carried without copying them.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ..errors import OutputError, OutputLocked

if TYPE_CHECKING:
    from ..progress import CancelToken

T = TypeVar("T")
TMP_SUFFIX = ".pmtmp"


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def check_writable(path: str | os.PathLike[str], protected: Iterable[str | os.PathLike[str]] = (), overwrite: bool = False) -> Path:
    """Raise :class:`OutputError` if writing ``path`` would clobber an input or an output."""
    target = Path(path).expanduser()
    resolved = target.resolve()
    for item in protected:
        prot = Path(item).expanduser()
        prot_resolved = prot.resolve()
        if prot_resolved == resolved or _same_file(prot, target):
            raise OutputError(str(target), f"refusing to overwrite the input checkpoint '{item}'")
        if prot_resolved.is_dir() and (resolved == prot_resolved or (target.exists() and prot_resolved in resolved.parents)):
            raise OutputError(str(target), f"refusing to overwrite a file inside the input folder '{item}'")
    if target.is_dir():
        raise OutputError(str(target), "is a folder; expected a file path")
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise OutputError(str(target), "already exists; allow overwriting (CLI: --overwrite) or pick another output folder")
    return target


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike[str],
    *,
    protected: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on normal exit it replaces ``path`` atomically."""
    target = check_writable(path, protected, overwrite)
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(str(folder), f"cannot create folder: {exc.strerror or exc}") from exc
    tmp = folder / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    try:
        yield tmp
        if not tmp.exists():
            raise OutputError(str(target), "the writer produced no file")
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        # re-check right before the rename: an input may have appeared meanwhile
        check_writable(target, protected, overwrite)
        os.replace(tmp, target)
        _fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write(
    path: str | os.PathLike[str],
    write_fn: Callable[[Path], T],
    *,
    protected: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> Path:
    """Call ``write_fn(temp_path)`` then atomically move the result to ``path``."""
    protected = list(protected)
    with atomic_path(path, protected=protected, overwrite=overwrite) as tmp:
        write_fn(tmp)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, **kwargs) -> Path:  # type: ignore[no-untyped-def]
    """Atomically write ``data`` (same keyword arguments as :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), **kwargs)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8", **kwargs) -> Path:  # type: ignore[no-untyped-def]
    """Atomically write ``text`` (the recipe YAML, the model card)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding), **kwargs)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform (Windows): the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- whole folders
_LEFTOVER = re.compile(r"(tmp|old)-[0-9a-f]{12}")
LOCK_GRACE_S = 30.0  # an empty lock file younger than this is a writer that is starting


def _leftovers(out: Path) -> list[tuple[str, Path]]:
    """(kind, path) of the ``.OUT.tmp-*`` / ``.OUT.old-*`` folders beside ``out``."""
    prefix = f".{out.name}."
    found = []
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return []
    for entry in entries:
        rest = entry.name[len(prefix):] if entry.name.startswith(prefix) else ""
        if _LEFTOVER.fullmatch(rest):
            found.append((rest[:3], Path(entry.path)))
    return found


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    shutil.rmtree(path)


def recover_folder(path: str | os.PathLike[str]) -> list[Path]:
    """Finish after a save that was killed: restore ``OUT`` from ``.OUT.old-*`` if it is
    missing, then remove every ``.OUT.tmp-*`` / ``.OUT.old-*`` left. Returns the removed
    paths. Call it only while holding the folder's lock (:func:`folder_lock`)."""
    out = Path(path)
    left = _leftovers(out)
    olds = sorted((p for kind, p in left if kind == "old"), key=lambda p: p.lstat().st_ctime, reverse=True)
    if olds and not out.exists() and not out.is_symlink():
        os.rename(olds.pop(0), out)
    removed = [p for kind, p in left if kind == "tmp"] + olds
    for p in removed:
        _remove_tree(p)
    if removed:
        _fsync_dir(out.parent)
    return removed


def _lock_holder(lock: Path) -> tuple[int | None, bool]:
    """(pid in the lock file, whether that writer is still alive)."""
    try:
        st = lock.stat()
        text = lock.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        return None, False
    except OSError:
        return None, True  # cannot tell: assume it is held
    if not text.isdigit():
        return None, time.time() - st.st_mtime < LOCK_GRACE_S
    pid = int(text)
    if pid <= 0:
        return None, False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return pid, False
    except PermissionError:
        pass
    except (OSError, OverflowError):
        return pid, False
    # a pid reused by a process started after the lock was taken does not hold it
    with contextlib.suppress(Exception):  # psutil missing or the process just ended: keep kill(0)'s answer
        import psutil

        if psutil.Process(pid).create_time() > st.st_mtime + 1.0:
            return pid, False
    return pid, True


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold ``.OUT.lock`` in the parent of ``path`` (the parent must exist); raise
    :class:`OutputLocked` if a live writer holds it. A lock whose process is gone is stale
    and taken over."""
    out = Path(path)
    lock = out.parent / f".{out.name}.lock"
    fd = -1
    for _attempt in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            pid, alive = _lock_holder(lock)
            if alive:
                raise OutputLocked(str(out), pid, str(lock)) from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # stale: its writer is gone
        except OSError as exc:
            raise OutputError(str(out.parent), f"cannot create the lock file {lock.name}: {exc.strerror or exc}") from exc
    else:
        pid, _alive = _lock_holder(lock)
        raise OutputLocked(str(out), pid, str(lock))
    try:
        try:
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        finally:
            os.close(fd)
        yield lock
    finally:
        pid, _alive = _lock_holder(lock)
        if pid == os.getpid():
            with contextlib.suppress(OSError):
                lock.unlink()


def check_folder(
    path: str | os.PathLike[str],
    names: Sequence[str],
    protected: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
    replace: bool = False,
) -> Path:
    """Raise :class:`OutputError` if a whole-folder save of ``names`` into ``path`` would
    replace an input or an earlier output (without ``overwrite``), or drop something the
    folder holds (unless ``replace``: the caller replaces the whole folder and has checked
    that it may). Returns the folder's resolved path (symlinks followed)."""
    given = Path(path).expanduser()
    out = given.resolve()
    protected = list(protected)
    if out.exists() and not out.is_dir():
        raise OutputError(str(given), "is a file; expected a folder")
    if out.parent == out:
        raise OutputError(str(given), "is a file system root; pick a folder inside it")
    for name in names:
        check_writable(out / name, protected, overwrite)
    for item in protected:
        prot = Path(item).expanduser().resolve()
        if prot == out or out in prot.parents:
            raise OutputError(
                str(given),
                f"refusing to overwrite the input '{item}': the folder holds it and a save "
                "replaces the whole folder; write the output elsewhere",
            )
    if out.is_dir() and not replace:
        try:
            entries = list(os.scandir(out))
        except OSError as exc:
            raise OutputError(str(given), f"cannot read the folder: {exc.strerror or exc}") from exc
        for entry in entries:
            if entry.name in names:
                continue
            if entry.is_dir(follow_symlinks=False):
                raise OutputError(
                    str(given),
                    f"holds the sub-folder '{entry.name}', which a whole-folder save cannot keep; "
                    "move it or pick another output folder",
                )
            if not (entry.is_symlink() or entry.is_file(follow_symlinks=False)):
                raise OutputError(str(given), f"holds '{entry.name}', which is not a regular file")
    return out


def _carry_over(out: Path, tmp: Path, names: Sequence[str]) -> None:
    """Put ``out``'s other files into ``tmp`` (hard links, else copies; symlinks as links)."""
    if not out.is_dir():
        return
    for entry in os.scandir(out):
        if entry.name in names:
            continue
        src, dst = Path(entry.path), tmp / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif entry.is_file(follow_symlinks=False):
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        else:
            raise OutputError(str(out), f"holds '{entry.name}', which a whole-folder save cannot keep")


def _fsync_tree(folder: Path) -> None:
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            with open(entry.path, "rb") as fh:  # read-only: a hard-linked input stays untouched
                os.fsync(fh.fileno())
        elif entry.is_dir(follow_symlinks=False):
            _fsync_tree(Path(entry.path))
    _fsync_dir(folder)


@contextlib.contextmanager
def atomic_folder(
    path: str | os.PathLike[str],
    *,
    names: Sequence[str],
    protected: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
    cancel: CancelToken | None = None,
    replace: bool = False,
) -> Iterator[Path]:
    """Yield an empty temp folder beside ``path``; write ``names`` into it. On normal exit it
    becomes ``path`` all at once (see the module docstring); on any exception (a typed
    error, a full disk, ``KeyboardInterrupt``, a cancel seen before the swap) ``path`` is
    left exactly as it was and the temp folder is removed. ``OSError`` becomes
    :class:`OutputError`. ``replace``: nothing of an existing ``path`` is carried over
    (the new folder is the whole output; a full-model export), sub-folders allowed."""
    protected = list(protected)
    given = Path(path).expanduser()
    out = check_folder(given, names, protected, overwrite, replace)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(str(out.parent), f"cannot create folder: {exc.strerror or exc}") from exc
    with folder_lock(out):
        try:
            recover_folder(out)
        except OSError as exc:
            raise OutputError(str(given), f"cannot clean up an earlier interrupted save: {exc.strerror or exc}") from exc
        out = check_folder(given, names, protected, overwrite, replace)  # a restored folder is checked too
        token = secrets.token_hex(6)
        tmp = out.parent / f".{out.name}.tmp-{token}"
        old = out.parent / f".{out.name}.old-{token}"
        committed = False
        try:
            os.mkdir(tmp, 0o700)
            if not replace:
                _carry_over(out, tmp, names)
            yield tmp
            if cancel is not None:
                cancel.raise_if_cancelled()
            missing = [n for n in names if not (tmp / n).is_file()]
            if missing:
                raise OutputError(str(given), f"the save produced no {', '.join(missing)}")
            check_folder(given, names, protected, overwrite, replace)  # an input may have appeared meanwhile
            umask = os.umask(0)
            os.umask(umask)
            mode = stat.S_IMODE(out.stat().st_mode) if out.is_dir() else 0o777 & ~umask
            os.chmod(tmp, mode)
            _fsync_tree(tmp)
            if out.exists():
                os.rename(out, old)
                os.rename(tmp, out)
            else:
                os.rename(tmp, out)
            committed = True
        except BaseException as exc:
            if not committed:
                with contextlib.suppress(OSError):
                    if old.exists() and not out.exists():
                        os.rename(old, out)
                with contextlib.suppress(OSError):
                    _remove_tree(tmp)
                if isinstance(exc, OSError):
                    raise OutputError(
                        str(given), f"cannot write the output ({exc.strerror or exc}); the folder was left as it was"
                    ) from exc
            raise
        try:  # the save is complete; what is left here the next save cleans up
            _fsync_dir(out.parent)
            if old.exists() or old.is_symlink():
                with contextlib.suppress(OSError):
                    _remove_tree(old)
        except KeyboardInterrupt:
            pass
