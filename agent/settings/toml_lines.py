"""Find the line of a config key in TOML text, so that every error can name its line.

`tomllib` keeps no positions, so this is a small line scanner for the TOML that people
write: ``[table]``, ``[[array.of.tables]]``, ``key = value`` (dotted keys too), inline tables
and arrays that span several lines. It only maps paths to lines; tomllib stays the parser.
"""

from __future__ import annotations

import re

Path = tuple[str | int, ...]

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
_KEY = re.compile(rf"^\s*({_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*=")


def _split_key(text: str) -> list[str]:
    parts = re.findall(r'"([^"]*)"|\'([^\']*)\'|([A-Za-z0-9_-]+)', text)
    return [a or b or c for a, b, c in parts]


def frame_of(stack: list[list[object]]) -> Path:
    """The path of the innermost open bracket."""
    path = stack[-1][1]
    assert isinstance(path, tuple)
    return path


def _scan_value(
    text: str, line: int, path: Path, lines: dict[Path, int], state: list[object]
) -> None:
    """Record positions of array elements and inline-table keys in a value's text."""
    # state: a stack of frames [kind, path, next_index]; strings are skipped.
    i = 0
    quote: str | None = None
    stack: list[list[object]] = state  # type: ignore[assignment]
    while i < len(text):
        char = text[i]
        if quote:
            if char == "\\" and quote == '"':
                i += 2
                continue
            if text.startswith(quote, i):
                i += len(quote)
                quote = None
                continue
            i += 1
            continue
        if char in "\"'":
            if stack and stack[-1][0] == "array":
                index = stack[-1][2]
                assert isinstance(index, int)
                lines.setdefault((*frame_of(stack), index), line)
                stack[-1][2] = index + 1
            quote = text[i : i + 3] if text.startswith(char * 3, i) else char
            i += len(quote)
            continue
        if char == "#":
            break
        frame_path: Path = path if not stack else stack[-1][1]  # type: ignore[assignment]
        if char in "[{":
            if stack and stack[-1][0] == "array":
                index = stack[-1][2]
                assert isinstance(index, int)
                element_path: Path = (*frame_path, index)
                lines.setdefault(element_path, line)
                stack[-1][2] = index + 1
            elif stack and stack[-1][0] == "table":
                element_path = stack[-1][3]  # type: ignore[assignment]
            else:
                element_path = frame_path
            stack.append(["array" if char == "[" else "table", element_path, 0, element_path])
            i += 1
            continue
        if char in "]}":
            if stack:
                stack.pop()
            i += 1
            continue
        if stack and stack[-1][0] == "array" and not char.isspace() and char != ",":
            # A scalar element: count it once, skip to the next separator.
            index = stack[-1][2]
            assert isinstance(index, int)
            lines.setdefault((*frame_path, index), line)
            stack[-1][2] = index + 1
            while i < len(text) and text[i] not in ",]#\"'":
                i += 1
            continue
        if stack and stack[-1][0] == "table":
            match = _KEY.match(text[i:])
            if match:
                keys = _split_key(match.group(1))
                key_path: Path = (*frame_path, *keys)
                lines.setdefault(key_path, line)
                stack[-1][3] = key_path
                i += match.end()
                continue
        i += 1


def key_lines(text: str) -> dict[Path, int]:
    """Map every key path (array-of-tables and array elements as ints) to its 1-based line."""
    lines: dict[Path, int] = {}
    table: Path = ()
    counters: dict[Path, int] = {}
    pending: list[object] = []  # open brackets of a value spanning lines
    for number, raw in enumerate(text.splitlines(), start=1):
        if pending:
            _scan_value(raw, number, (), lines, pending)
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
            rest = raw[match.end() :]
            _scan_value(rest, number, path, lines, pending)
    return lines


def line_of(lines: dict[Path, int], path: Path) -> int | None:
    """The line of the longest prefix of `path` that the scan found."""
    for end in range(len(path), 0, -1):
        found = lines.get(path[:end])
        if found is not None:
            return found
    return None
