"""Find the line of a config key in TOML text, so that every error can name its line.

`tomllib` keeps no positions, so this is a small line scanner for the TOML that people
write: ``[table]``, ``[[array.of.tables]]``, ``key = value`` (dotted keys too), inline tables
and arrays that span several lines. It only maps paths to lines; tomllib stays the parser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Path = tuple[str | int, ...]

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
_KEY = re.compile(rf"^\s*({_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*=")


def _split_key(text: str) -> list[str]:
    parts = re.findall(r'"([^"]*)"|\'([^\']*)\'|([A-Za-z0-9_-]+)', text)
    return [a or b or c for a, b, c in parts]


@dataclass(slots=True)
class _Frame:
    """An open bracket of a value: an array counts its elements, an inline table its keys."""

    kind: Literal["array", "table"]
    path: Path
    next_index: int = 0
    last_key: Path = ()  # a table's latest key: a bracket after it opens that key's value


class _ValueScanner:
    """Records the lines of array elements and inline-table keys in a value's text; the open
    brackets carry over to the next line (a value spanning lines)."""

    def __init__(self, lines: dict[Path, int]) -> None:
        self._lines = lines
        self._stack: list[_Frame] = []

    @property
    def open(self) -> bool:
        """Whether a bracket of the value is still open at the end of the last line."""
        return bool(self._stack)

    def scan(self, text: str, line: int, path: Path) -> None:
        """Scan one line of a value whose key is `path` (ignored inside open brackets)."""
        i = 0
        while i < len(text):
            char = text[i]
            if char in "\"'":
                self._element(line)
                i = _after_string(text, i)
            elif char == "#":
                break
            elif char in "[{":
                self._open("array" if char == "[" else "table", line, path)
                i += 1
            elif char in "]}":
                if self._stack:
                    self._stack.pop()
                i += 1
            else:
                i = self._other(text, i, line)

    def _element(self, line: int) -> None:
        """Inside an array, the next element starts here."""
        if self._stack and self._stack[-1].kind == "array":
            top = self._stack[-1]
            self._lines.setdefault((*top.path, top.next_index), line)
            top.next_index += 1

    def _open(self, kind: Literal["array", "table"], line: int, path: Path) -> None:
        if not self._stack:
            element = path
        elif self._stack[-1].kind == "array":
            top = self._stack[-1]
            element = (*top.path, top.next_index)
            self._element(line)
        else:
            element = self._stack[-1].last_key
        self._stack.append(_Frame(kind, element, 0, element))

    def _other(self, text: str, i: int, line: int) -> int:
        """A character outside strings and brackets; the index to go on from."""
        top = self._stack[-1] if self._stack else None
        if top is not None and top.kind == "array" and not text[i].isspace() and text[i] != ",":
            # A scalar element: count it once, skip to the next separator.
            self._element(line)
            while i < len(text) and text[i] not in ",]#\"'":
                i += 1
            return i
        if top is not None and top.kind == "table":
            match = _KEY.match(text[i:])
            if match:
                key_path: Path = (*top.path, *_split_key(match.group(1)))
                self._lines.setdefault(key_path, line)
                top.last_key = key_path
                return i + match.end()
        return i + 1


def _after_string(text: str, start: int) -> int:
    """The index after the string that starts at `start` (or the line's end)."""
    char = text[start]
    quote = char * 3 if text.startswith(char * 3, start) else char
    i = start + len(quote)
    while i < len(text):
        if text[i] == "\\" and quote == '"':
            i += 2
        elif text.startswith(quote, i):
            return i + len(quote)
        else:
            i += 1
    return i


def key_lines(text: str) -> dict[Path, int]:
    """Map every key path (array-of-tables and array elements as ints) to its 1-based line."""
    lines: dict[Path, int] = {}
    table: Path = ()
    counters: dict[Path, int] = {}
    value = _ValueScanner(lines)  # holds the open brackets of a value spanning lines
    for number, raw in enumerate(text.splitlines(), start=1):
        if value.open:
            value.scan(raw, number, ())
            continue
        header = _HEADER.match(raw)
        if header and not _KEY.match(raw):
            keys = _split_key(header.group(2))
            resolved: list[str | int] = []
            # Resolve each prefix to the latest element of any array of tables it names.
            for key in keys[:-1]:
                resolved.append(key)
                prefix = tuple(resolved)
                if prefix in counters:
                    resolved.append(counters[prefix] - 1)
            resolved.append(keys[-1])
            if header.group(1) == "[[":
                prefix = tuple(resolved)
                counters[prefix] = counters.get(prefix, 0) + 1
                lines.setdefault(prefix, number)
                resolved.append(counters[prefix] - 1)
            table = tuple(resolved)
            lines.setdefault(table, number)
            continue
        match = _KEY.match(raw)
        if match:
            path: Path = (*table, *_split_key(match.group(1)))
            lines.setdefault(path, number)
            value.scan(raw[match.end() :], number, path)
    return lines


def line_of(lines: dict[Path, int], path: Path) -> int | None:
    """The line of the longest prefix of `path` that the scan found."""
    for end in range(len(path), 0, -1):
        found = lines.get(path[:end])
        if found is not None:
            return found
    return None
