"""Progress events and cancellation shared by every long-running core generator."""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
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




ProgressGen = Generator[ProgressEvent, None, Any]


def drain(gen: ProgressGen, on_event: Callable[[ProgressEvent], Any] | None = None,
          cancel: CancelToken | None = None) -> Any:
    """Run a progress generator to its end and return its value.

    ``on_event`` sees every event; with ``cancel``, the generator is closed and
    :class:`Cancelled` raised as soon as the token is set (checked between events)."""
    try:
        while True:
            if cancel is not None and cancel.cancelled:
                gen.close()
                raise Cancelled()
            try:
                ev = next(gen)
            except StopIteration as stop:
                return stop.value
            if on_event is not None:
                on_event(ev)
    finally:
        gen.close()


def rescaled(gen: ProgressGen, start: float, end: float,
             cancel: CancelToken | None = None) -> ProgressGen:
    """Forward a sub-job's events with their fraction mapped into ``[start, end]`` of the
    whole job; returns the sub-job's value (use with ``yield from``)."""
    span = end - start
    while True:
        try:
            ev = next(gen)
        except StopIteration as stop:
            return stop.value
        if cancel is not None:
            cancel.raise_if_cancelled()
        yield ProgressEvent(ev.stage, start + span * min(max(ev.fraction, 0.0), 1.0), ev.message, ev.payload)
