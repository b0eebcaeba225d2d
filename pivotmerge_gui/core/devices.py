"""Device resolution (``auto``: CUDA when available, ``cpu``, ``cuda``/``cuda:N``) and the
memory a merge may use on the host (system, ``ulimit -v`` and cgroup limits)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from .errors import DeviceError
from .options import DTYPE_ALIASES, DTYPES

# dtype name (and alias) -> torch dtype, for the names of core.options
_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPES}
_DTYPES.update({alias: _DTYPES[name] for alias, name in DTYPE_ALIASES.items()})


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise DeviceError(f"unknown dtype '{name}'; use one of {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    spec = "auto" if spec is None else str(spec)
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device '{spec}' requested but CUDA is not available on this machine; use 'cpu' or 'auto'")
        try:
            dev = torch.device(spec)
        except RuntimeError:
            raise DeviceError(f"'{spec}' is not a device name; use auto, cpu, cuda or cuda:N") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device '{spec}' does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return dev
    raise DeviceError(f"'{spec}' is not a device name; use auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class DeviceInfo:
    name: str  # "cpu" | "cuda:0"
    label: str  # human readable
    free_bytes: int | None
    total_bytes: int | None


def available_devices() -> list[DeviceInfo]:
    out = [DeviceInfo("cpu", "CPU", None, None)]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            name = torch.cuda.get_device_name(i)
            out.append(DeviceInfo(f"cuda:{i}", f"cuda:{i} - {name} ({free / 2**30:.1f} GiB free)", free, total))
    return out


# --------------------------------------------------------------------------- host memory
CGROUP_ROOT = Path("/sys/fs/cgroup")
_NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None  # "max" (v2: no limit) or garbage


def _inactive_file(stat: str | None, key: str) -> int:
    """Reclaimable page cache the cgroup's usage counts (``memory.stat``)."""
    for line in (stat or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return _int(value) or 0
    return 0


def cgroup_headroom(root: Path | None = None, proc_cgroup: str | None = None) -> int | None:
    """Bytes this process's memory cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``)
    still allows, the tightest over the cgroup and its ancestors; ``None`` without a limit.
    Reclaimable page cache (``inactive_file``) counts as free, as the kernel would reclaim it."""
    root = CGROUP_ROOT if root is None else root
    text = _read(Path("/proc/self/cgroup")) if proc_cgroup is None else proc_cgroup
    v2_path, v1_path = "/", "/"
    for line in (text or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] == "0" and parts[1] == "":
            v2_path = parts[2] or "/"
        elif len(parts) == 3 and "memory" in parts[1].split(","):
            v1_path = parts[2] or "/"
    found: list[int] = []
    for base, rel, limit_name, usage_name, cache_key in (
        (root, v2_path, "memory.max", "memory.current", "inactive_file"),
        (root / "memory", v1_path, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
    ):
        folder = base / rel.lstrip("/")
        while True:
            limit = _int(_read(folder / limit_name))
            if limit is not None and limit < _NO_LIMIT:
                usage = _int(_read(folder / usage_name)) or 0
                usage -= _inactive_file(_read(folder / "memory.stat"), cache_key)
                found.append(max(0, limit - max(0, usage)))
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return min(found) if found else None


def rlimit_headroom() -> int | None:
    """Bytes of address space ``ulimit -v`` (RLIMIT_AS) still allows this process; ``None``
    when unlimited or unknown (e.g. Windows)."""
    try:
        import resource
    except ImportError:
        return None
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    except (OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    try:
        used = psutil.Process().memory_info().vms
    except (OSError, psutil.Error):
        used = 0
    return max(0, soft - used)


def host_memory_available() -> int | None:
    """Bytes a CPU merge may still use: the least of the system's available memory
    (psutil), the RLIMIT_AS headroom and the cgroup headroom; ``None`` when none is known.
    Without the last two a merge under ``ulimit -v`` or in a container passes the check and
    then dies with ``std::bad_alloc`` or the OOM killer."""
    figures = [f for f in (_system_available(), rlimit_headroom(), cgroup_headroom()) if f is not None]
    return min(figures) if figures else None


def _system_available() -> int | None:
    try:
        return int(psutil.virtual_memory().available)
    except (OSError, RuntimeError):  # a sandbox that hides the system's memory figures
        return None
