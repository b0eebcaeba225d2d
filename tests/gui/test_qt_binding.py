"""Guard against Qt bindings whose ``Signal.emit`` corrupts reference counts.

PySide6 6.12.0 (with CPython 3.11) returns ``True`` from ``SignalInstance.emit`` without
taking a reference; every emit drops one reference to ``True`` and a long merge with
progress signals aborts the app ("bool_dealloc: deallocating True or False"). The check
runs in a subprocess because the failure mode is an interpreter abort.
"""

from __future__ import annotations

import subprocess
import sys

CODE = r"""
import sys
from PySide6.QtCore import QCoreApplication, QObject, Signal
app = QCoreApplication([])
class S(QObject):
    sig = Signal(object)
s = S()
s.sig.connect(lambda v: None)
before = (sys.getrefcount(True), sys.getrefcount(False), sys.getrefcount(None))
for _ in range(200):
    s.sig.emit(None)
after = (sys.getrefcount(True), sys.getrefcount(False), sys.getrefcount(None))
print([a - b for a, b in zip(after, before)])
"""


def test_signal_emit_keeps_reference_counts():
    proc = subprocess.run([sys.executable, "-c", CODE], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[0, 0, 0]", (
        "this Qt binding corrupts reference counts on Signal.emit; "
        "install a fixed PySide6 (pyproject excludes 6.12.0): " + proc.stdout)
