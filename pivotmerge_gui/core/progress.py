"""Progress events and cancellation shared by every long-running core generator."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from .errors import Cancelled


@dataclass(frozen=True)
class ProgressEvent:
    """One step of long work. ``fraction`` is in [0, 1] for the whole job."""

    stage: str
    fraction: float
    message: str = ""
    payload: Any = None


class CancelToken:
    """Thread-safe cancellation flag checked by core loops between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled()


