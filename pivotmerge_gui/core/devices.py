"""Device resolution: ``auto`` (CUDA when available), ``cpu``, ``cuda``/``cuda:N``."""

from __future__ import annotations

from dataclasses import dataclass

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
