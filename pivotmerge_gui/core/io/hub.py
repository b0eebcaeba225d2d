"""Resolve ``org/name[@revision][:filename]`` to local files, fetching only the projector.

For a repo with a shard index we download the index (a few KB), find the projector keys
in its ``weight_map`` and download only the shards that hold them; for single-file repos
the one checkpoint file. ``HF_HUB_OFFLINE`` (read from the environment at call time) makes
every step use the local cache; a file that is not cached then raises :class:`HubError`
saying how to fix it. Progress of downloads reaches the caller through a ``tqdm_class``
adapter that reports :class:`ProgressEvent` and prints nothing.

The functions of ``huggingface_hub`` are looked up on the module at call time, so tests
can replace them (the test suite never touches the network).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import HubError
from ..progress import CancelToken, ProgressEvent
from .discovery import AmbiguousCheckpoint, NoCheckpoint, choose_checkpoint, read_index
from .families import projector_keys

ProgressFn = Callable[[ProgressEvent], None]

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


# set (per thread / task) by :func:`unreachable_hub`: the Hub did not answer a quick probe
_UNREACHABLE: contextvars.ContextVar[str | None] = contextvars.ContextVar("hub_unreachable", default=None)


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it once at import), or the Hub
    was found unreachable by :func:`probe_hub` for this call."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or _UNREACHABLE.get() is not None


def hub_address() -> tuple[str, int]:
    """The Hub's host and port (``HF_ENDPOINT`` when set)."""
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def probe_hub(timeout: float = 3.0) -> str | None:
    """None when a TCP connection to the Hub opens within ``timeout`` seconds, else why not
    (offline, no DNS, a firewall). huggingface_hub itself waits 10 s per request and retries,
    so an offline lookup took 15-60 s before it said anything."""
    import socket

    host, port = hub_address()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"cannot reach {host} ({exc.strerror or type(exc).__name__})"


@contextlib.contextmanager
def unreachable_hub(reason: str) -> Iterator[None]:
    """Within this block the Hub counts as offline: files in the local cache are used, and
    anything else fails at once with ``reason``."""
    token = _UNREACHABLE.set(reason)
    try:
        yield
    finally:
        _UNREACHABLE.reset(token)


def hub_cache_dir() -> Path:
    """The Hub cache folder as the environment says now (``HF_HUB_CACHE`` > ``HF_HOME``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _progress_class(progress: ProgressFn | None, label: str, lo: float, hi: float) -> Any:
    """A tqdm subclass (huggingface_hub's) that forwards byte counts to ``progress``."""
    if progress is None:
        return None
    from huggingface_hub.utils import tqdm as hf_tqdm  # lazy: core start path stays light

    class _Sink:
        def write(self, _s: str) -> int:
            return 0

        def flush(self) -> None:
            return None

    class _ProgressAdapter(hf_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["file"] = _Sink()
            kwargs.pop("name", None)
            super().__init__(*args, **kwargs)
            self._pm_done = kwargs.get("initial") or 0  # resumed downloads start there

        def update(self, n: float | None = 1) -> bool | None:
            self._pm_done += n or 0
            total = self.total or 0
            frac = (self._pm_done / total) if total else 0.0
            progress(
                ProgressEvent(
                    "download",
                    lo + (hi - lo) * min(1.0, frac),
                    f"downloading {label}",
                    {"file": label, "bytes": int(self._pm_done), "total": int(total)},
                )
            )
            return super().update(n)

    return _ProgressAdapter


def _hub_error(spec: str, repo: str, revision: str | None, filename: str | None, exc: BaseException) -> HubError:
    from huggingface_hub import errors as e

    what = f"'{filename}' of {repo}" if filename else repo
    rev = f" at revision '{revision}'" if revision else ""
    if isinstance(exc, (e.LocalEntryNotFoundError, e.OfflineModeIsEnabled)):
        if _UNREACHABLE.get() is not None:
            return HubError(spec, f"{_UNREACHABLE.get()} and {what}{rev} is not in the local Hub cache: "
                                  "connect to the network, or use a local file")
        if hub_offline():
            return HubError(
                spec,
                f"{what}{rev} is not in the local Hub cache ({hub_cache_dir()}) and HF_HUB_OFFLINE is set: "
                "unset HF_HUB_OFFLINE (or run once online) to download it, or pass a local path",
            )
        return HubError(spec, f"cannot reach the Hub for {what}{rev} and it is not cached: check the network")
    if isinstance(exc, e.GatedRepoError):
        return HubError(spec, f"{repo} is gated: accept its terms on the Hub and log in (`hf auth login`)")
    if isinstance(exc, e.RepositoryNotFoundError):
        return HubError(spec, f"repository {repo} not found (or private: log in with `hf auth login`)")
    if isinstance(exc, e.RevisionNotFoundError):
        return HubError(spec, f"revision '{revision}' not found in {repo}")
    if isinstance(exc, e.EntryNotFoundError):
        return HubError(spec, f"file '{filename}' not found in {repo}{rev}")
    return HubError(spec, f"cannot fetch {what}{rev}: {type(exc).__name__}: {exc}")


def _list_cached(repo: str, revision: str | None, spec: str) -> list[str]:
    root = hub_cache_dir() / ("models--" + repo.replace("/", "--"))
    commit = revision if revision and _COMMIT.match(revision) else None
    if commit is None:
        ref = root / "refs" / (revision or "main")
        try:
            commit = ref.read_text().strip()
        except OSError:
            commit = None
    snap = root / "snapshots" / commit if commit else None
    if snap is None or not snap.is_dir():
        rev = f"@{revision}" if revision else ""
        if _UNREACHABLE.get() is not None:
            raise HubError(spec, f"{_UNREACHABLE.get()} and {repo}{rev} is not in the local Hub cache: "
                                 "connect to the network, or use a local file")
        raise HubError(
            spec,
            f"{repo}{rev} is not in the local Hub cache ({hub_cache_dir()}) and HF_HUB_OFFLINE is set: "
            "unset HF_HUB_OFFLINE (or run once online) to download it, or pass a local path",
        )
    return sorted(str(p.relative_to(snap)).replace(os.sep, "/") for p in snap.rglob("*") if p.is_file() or p.is_symlink())


def _list_files(repo: str, revision: str | None, spec: str) -> list[str]:
    if hub_offline():
        return _list_cached(repo, revision, spec)
    import huggingface_hub

    try:
        return list(huggingface_hub.list_repo_files(repo, revision=revision))
    except Exception as exc:  # network / HTTP errors of several libraries
        raise _hub_error(spec, repo, revision, None, exc) from exc


def _download(
    repo: str,
    filename: str,
    revision: str | None,
    spec: str,
    progress: ProgressFn | None,
    lo: float,
    hi: float,
) -> Path:
    import huggingface_hub

    try:
        local = huggingface_hub.hf_hub_download(
            repo,
            filename,
            revision=revision,
            cache_dir=str(hub_cache_dir()),
            local_files_only=hub_offline(),
            tqdm_class=_progress_class(progress, filename, lo, hi),
        )
    except Exception as exc:
        raise _hub_error(spec, repo, revision, filename, exc) from exc
    if progress is not None:
        progress(ProgressEvent("download", hi, f"have {filename}", {"file": filename}))
    return Path(local)


def resolve_hub(
    repo: str,
    revision: str | None = None,
    filename: str | None = None,
    *,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    spec: str | None = None,
) -> Path:
    """Local path of the checkpoint file (or shard index, its needed shards fetched beside
    it in the same snapshot folder) for a Hub repo."""
    spec = spec or repo + (f"@{revision}" if revision else "") + (f":{filename}" if filename else "")
    if filename is None:
        names = _list_files(repo, revision, spec)
        try:
            choice = choose_checkpoint(names, allow_safetensors_set=False)
        except NoCheckpoint:
            raise HubError(spec, f"{repo} holds no checkpoint file ({len(names)} files: {', '.join(names[:10])})") from None
        except AmbiguousCheckpoint as exc:
            raise HubError(
                spec, f"{repo} holds several checkpoint files ({', '.join(exc.candidates)}); pick one as {repo}:FILENAME"
            ) from None
        filename = choice.files[0]
    if cancel is not None:
        cancel.raise_if_cancelled()
    if not filename.endswith(".index.json"):
        return _download(repo, filename, revision, spec, progress, 0.0, 1.0)
    index_path = _download(repo, filename, revision, spec, progress, 0.0, 0.05)
    weight_map = read_index(index_path)
    _, _, keys = projector_keys(weight_map.keys(), spec)
    folder = str(Path(filename).parent).replace(os.sep, "/")
    shards = sorted({weight_map[k] for k in keys})
    for i, shard in enumerate(shards):
        if cancel is not None:
            cancel.raise_if_cancelled()
        name = shard if folder in ("", ".") else f"{folder}/{shard}"
        lo = 0.05 + 0.95 * i / len(shards)
        _download(repo, name, revision, spec, progress, lo, lo + 0.95 / len(shards))
    return index_path
