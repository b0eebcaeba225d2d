"""Terminal-safe text: what the CLI prints from files, recipes and errors, on one line.

Recipe values, checkpoint key names, file names and captions come from strangers. A newline
in one forges extra output lines; an ANSI escape sequence (``ESC [ ...``) recolours, moves
the cursor or retitles the terminal; a bidirectional override reorders what is shown; a
file name with bytes that are not UTF-8 (kept by Python as lone surrogates) makes a strict
stream raise ``UnicodeEncodeError``. :func:`clean` escapes every such character visibly
(``\\n``, ``\\x1b``, ``\\u202e``, the original byte ``\\xff``) and leaves printable text,
including non-ASCII letters, as it is.
"""

from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (os.fsdecode's surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def clean(value: object, limit: int | None = None) -> str:
    """``str(value)`` with control, format, separator and unencodable characters escaped;
    cut to ``limit`` characters with an explicit count of what was left out. (Backslashes
    stay as they are, so Windows paths read normally.)"""
    text = str(value)
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else _escape(ch) for ch in text)
    if limit is not None and len(text) > limit:
        text = text[:limit] + f"... ({len(text) - limit} more characters)"
    return text
