"""Bounded parsing of documents from strangers: YAML recipes and JSON headers/indexes.

A 300-byte YAML document with nested aliases ("billion laughs") expands to gigabytes once
something walks it, and a 20,000-deep document makes recursive parsers raise
``RecursionError``. Recipes never need anchors or deep nesting, nor do safetensors headers
or shard indexes, so both are refused while parsing, before anything is expanded:

- :func:`yaml_load` parses YAML with PyYAML's safe loader but refuses every anchor and
  alias (:class:`AliasError`) and any nesting deeper than :data:`MAX_DEPTH`
  (:class:`NestingError`), checked while composing, so memory stays bounded by the text.
- :func:`json_loads` parses JSON and refuses nesting deeper than :data:`MAX_DEPTH`.

Both raise subclasses of ``ValueError`` that callers turn into their typed errors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

MAX_DEPTH = 64


class NestingError(ValueError):
    """A document nests deeper than :data:`MAX_DEPTH`."""

    def __init__(self, limit: int = MAX_DEPTH) -> None:
        super().__init__(f"nested deeper than {limit} levels")
        self.limit = limit


class AliasError(ValueError):
    """A YAML document uses an anchor (``&name``) or an alias (``*name``)."""

    def __init__(self, line: int | None = None) -> None:
        where = f" (line {line + 1})" if line is not None else ""
        super().__init__(f"recipes may not use YAML anchors/aliases{where}")


class _PlainLoader(yaml.SafeLoader):
    """The safe loader without anchors, aliases or deep nesting."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            mark = getattr(event, "start_mark", None)
            raise AliasError(getattr(mark, "line", None))
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise NestingError()
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def yaml_load(text: str) -> Any:
    """Parse one YAML document without anchors/aliases and at most :data:`MAX_DEPTH` deep.

    Raises :class:`AliasError`, :class:`NestingError` or ``yaml.YAMLError``."""
    loader = _PlainLoader(text)
    try:
        return loader.get_single_data()
    except (AliasError, NestingError):
        raise
    except ValueError as exc:  # e.g. an integer past Python's 4300-digit conversion limit
        raise yaml.YAMLError(f"value not representable: {str(exc)[:120]}") from None
    finally:
        loader.dispose()


def yaml_document(text: str, source: str | None, error: Callable[[str, str | None], Exception],
                  what: str, max_chars: int) -> Any:
    """Parse ``text``, one YAML document of kind ``what`` ("recipe", "sweep") from
    ``source``: at most ``max_chars`` characters, no anchors/aliases, at most
    :data:`MAX_DEPTH` deep. Every problem raises ``error(message, source)``."""
    if len(text) > max_chars:
        raise error(f"a {what} of {len(text):,} characters is larger than the {max_chars:,} allowed", source)
    try:
        return yaml_load(text)
    except AliasError as e:
        raise error(str(e), source) from None
    except NestingError as e:
        raise error(f"the YAML is {e}", source) from None
    except yaml.YAMLError as e:
        raise error(f"not valid YAML: {e}".replace("\n", " "), source) from None


def read_text_document(path: Path, error: Callable[[str, str | None], Exception], what: str) -> str:
    """The UTF-8 text of ``path`` (a recipe, a sweep); ``error(message, path)`` otherwise."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error("not a UTF-8 text file", str(path)) from None
    except OSError as e:
        raise error(f"cannot read {what}: {e.strerror or e}", str(path)) from None


def json_loads(text: str | bytes) -> Any:
    """``json.loads`` that refuses documents nested deeper than :data:`MAX_DEPTH`.

    Raises :class:`NestingError`, ``json.JSONDecodeError`` or ``UnicodeDecodeError``."""
    try:
        doc = json.loads(text)
    except RecursionError:  # the decoder recursed past the interpreter's limit
        raise NestingError() from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except ValueError as exc:  # e.g. an integer past Python's 4300-digit conversion limit
        raise json.JSONDecodeError(f"value not representable ({str(exc)[:80]})", "", 0) from None
    stack = [(doc, 1)]
    while stack:  # iterative, so the check itself cannot recurse
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise NestingError()
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, (dict, list)))
    return doc


def json_document(raw: bytes, path: str, what: str) -> Any:
    """Parse UTF-8 JSON ``raw`` read from ``path``: nesting, encoding and syntax problems
    become a :class:`~pivotmerge_gui.core.errors.CheckpointError` naming ``what`` it is."""
    from .errors import CheckpointError

    try:
        return json_loads(raw.decode("utf-8"))
    except NestingError as exc:
        raise CheckpointError(path, f"{what} is {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"{what} is not valid JSON ({exc})") from exc
