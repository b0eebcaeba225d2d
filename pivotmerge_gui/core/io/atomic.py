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
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from ..errors import OutputError

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
