"""Browsed OPC UA nodes as text (pure): the tree `edge-agent browse` prints, and the ready
``[[devices.tags]]`` blocks of ``--toml`` (docs/opcua.md, "Browsing a server").

* A tag's name is its browse path below the start node, levels joined with ``.``; characters
  a tag name cannot hold become ``_`` (accents are dropped first: ``Öl`` gives ``Ol``); a path
  longer than 64 characters keeps its deepest levels; a name already taken gets ``_2``,
  ``_3``, ...
* A variable is offered as a tag when the driver can read it: a variable that is not
  readable, whose data type is unknown or unsupported, or whose node id the config cannot
  hold, is printed as a commented-out block saying why.
* ``writable = true`` when the access level (and the user's) allows CurrentWrite and the
  driver writes that data type.

Everything a server sends is shown escaped: names and values may hold control characters.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

from asyncua import ua
from asyncua.ua.uaerrors import UaError

from drivers.opcua.config import check_node_id
from drivers.opcua.values import WRITE_TYPES

NAME_MAX: Final = 64
ACCESS_READ: Final = 0x01  # AccessLevel bit CurrentRead
ACCESS_WRITE: Final = 0x02  # AccessLevel bit CurrentWrite
_ID_SHOWN: Final = 100  # node id characters in the tree (the tag blocks hold them all)
_INVALID_RUN: Final = re.compile(r"[^A-Za-z0-9_-]+")
_INVALID_EDGES: Final = re.compile(r"^[^A-Za-z0-9_-]+|[^A-Za-z0-9_-]+$")

# The JSON a value of each built-in base type is published as (docs/opcua.md, "Values").
_KINDS: Final[Mapping[str, str]] = {
    "Boolean": "boolean",
    **dict.fromkeys(
        ("SByte", "Byte", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64"), "integer"
    ),
    **dict.fromkeys(("Integer", "UInteger", "Enumeration"), "integer"),
    **dict.fromkeys(("Float", "Double", "Number"), "number"),
    **dict.fromkeys(
        (
            "String",
            "LocalizedText",
            "DateTime",
            "ByteString",
            "Guid",
            "XmlElement",
            "NodeId",
            "ExpandedNodeId",
            "QualifiedName",
            "StatusCode",
        ),
        "string",
    ),
    "Structure": "object",
    "BaseDataType": "any JSON",
}
# An enumeration is written as its Int32 value.
_WRITABLE_BASES: Final = frozenset(vtype.name for vtype in WRITE_TYPES) | {"Enumeration"}
# Read results that will not change by themselves: the tag would never be good.
_LASTING_STATUS: Final = frozenset(
    {"BadNotReadable", "BadUserAccessDenied", "BadNodeIdUnknown", "BadAttributeIdInvalid"}
)


@dataclass(frozen=True, slots=True)
class BrowsedNode:
    """One node of the browsed tree, as shown and as it would be configured."""

    depth: int  # 0: the start node
    path: tuple[str, ...]  # browse names below the start node (the start node: its own name)
    node_id: str  # ns=2;s=Filler.State
    config_node_id: str  # as a tag's node_id: nsu=URI;s=... when the URI can be written
    node_class: str  # Object, Variable, Property (a variable by HasProperty), Method, View
    data_type: str | None = None  # UInt16, UtcTime, a structure's name
    base_type: str | None = None  # the built-in type it derives from: DateTime, Enumeration
    value_rank: int | None = None  # -1 scalar, 1 one dimension, ... (OPC 10000-3 5.6.2)
    access: int | None = None  # AccessLevel & UserAccessLevel
    value: str | None = None  # the current value as JSON text, cut
    status: str | None = None  # the status name of a value that is not Good
    undecoded: bool = False  # a structure the client could not decode
    note: str | None = None  # why its children were not browsed

    @property
    def is_variable(self) -> bool:
        """A Variable or a Property."""
        return self.node_class in ("Variable", "Property")


@dataclass(frozen=True, slots=True)
class BrowseResult:
    """What a browse found: the start node and the nodes below it in tree order."""

    start: BrowsedNode
    nodes: tuple[BrowsedNode, ...]
    namespaces: tuple[str, ...]
    stopped_after: int | None = None  # the node bound was reached: nodes collected
    unexpanded: int = 0  # objects at the depth limit whose children were not browsed

    def variables(self) -> list[BrowsedNode]:
        """The variables a tag list is made of: the start node when it is one, then every
        Variable below it (properties are metadata of their variable, not tags)."""
        start = [self.start] if self.start.node_class == "Variable" else []
        return start + [node for node in self.nodes if node.node_class == "Variable"]


# ---------------------------------------------------------------------- escaping


def printable(text: str) -> str:
    """``text`` with every character a terminal or a TOML comment must not get escaped."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string; ValueError when TOML cannot hold it (a surrogate)."""
    out = ['"']
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif 0xD800 <= code <= 0xDFFF:
            raise ValueError("a lone surrogate")
        elif char.isprintable():
            out.append(char)
        else:
            out.append(f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}")
    out.append('"')
    return "".join(out)


# ---------------------------------------------------------------------- names


def _segment(text: str) -> str:
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return _INVALID_RUN.sub("_", _INVALID_EDGES.sub("", plain))


def tag_name(path: Sequence[str]) -> str:
    """A valid tag name from a browse path: ``("Filler", "Counters", "Total")`` gives
    ``Filler.Counters.Total``."""
    parts = [part for part in map(_segment, path) if part]
    if not parts:
        return "tag"
    name = parts[-1][-NAME_MAX:]
    for part in reversed(parts[:-1]):
        longer = f"{part}.{name}"
        if len(longer) > NAME_MAX:
            break
        name = longer
    if name[0] == "-":  # the only character a segment may start with that a name may not
        name = "_" + name[1:]
    return name


def unique_names(paths: Iterable[Sequence[str]], taken: Iterable[str] = ()) -> list[str]:
    """A distinct tag name per path, none of them in ``taken``; collisions get ``_2``, ..."""
    used = set(taken)
    next_suffix: dict[str, int] = {}
    names = []
    for path in paths:
        base = name = tag_name(path)
        number = next_suffix.get(base, 2)
        while name in used:
            suffix = f"_{number}"
            name = base[: NAME_MAX - len(suffix)] + suffix
            number += 1
        next_suffix[base] = number
        used.add(name)
        names.append(name)
    return names


# ---------------------------------------------------------------------- node ids


def make_node_id(identifier: Any, namespace: int, kind: ua.NodeIdType) -> ua.NodeId:
    """An asyncua NodeId (its annotations want the protocol's integer aliases)."""
    return ua.NodeId(identifier, cast(ua.Int16, namespace), kind)


def node_id_text(node: ua.NodeId) -> str:
    """``ns=2;s=Filler.State`` (``i=85`` in namespace 0)."""
    return str(node.to_string())


def config_node_id(node: ua.NodeId, namespaces: Sequence[str]) -> str:
    """The node id as a tag's node_id: ``nsu=URI;s=...`` (the driver looks the URI up, so a
    server that renumbers its namespaces keeps the tag), ``ns=N;...`` when the URI cannot be
    written, ``i=...`` in namespace 0."""
    plain = node_id_text(node)
    index = node.NamespaceIndex
    if index == 0 or index >= len(namespaces):
        return plain
    uri = namespaces[index]
    if namespaces.index(uri) != index:  # the URI appears twice: it would name the first
        return plain
    local = node_id_text(make_node_id(node.Identifier, 0, node.NodeIdType))
    candidate = f"nsu={uri};{local}"
    try:
        check_node_id(candidate)
        parsed = ua.NodeId.from_string(candidate)
    except (ValueError, UaError):
        return plain
    if getattr(parsed, "NamespaceUri", None) != uri or parsed.Identifier != node.Identifier:
        return plain
    return candidate


def namespace_index_form(text: str, namespaces: Sequence[str]) -> str | None:
    """A configured node id (``nsu=`` or ``ns=``) in the ``ns=N`` form of this server; None
    when it names a namespace the server does not have or is not a node id."""
    try:
        node = ua.NodeId.from_string(text)
    except (ValueError, UaError):
        return None
    uri = getattr(node, "NamespaceUri", None)
    index: int = node.NamespaceIndex
    if uri:
        if uri not in namespaces:
            return None
        index = namespaces.index(uri)
    return node_id_text(make_node_id(node.Identifier, index, node.NodeIdType))


# ---------------------------------------------------------------------- types and access


def type_label(node: BrowsedNode) -> str:
    """``UInt16``, ``Double[]``, ``Int32[][]``; ``?`` when unknown."""
    rank = node.value_rank
    dims = "[]" * max(rank, 1) if rank is not None and rank >= 0 else ""
    return f"{node.data_type or '?'}{dims}"


def access_label(access: int | None) -> str:
    """``r``, ``rw``, ``w`` or ``-`` from the access level bits."""
    if access is None:
        return ""
    read = "r" if access & ACCESS_READ else ""
    write = "w" if access & ACCESS_WRITE else ""
    return read + write or "-"


def json_kind(base_type: str | None) -> str | None:
    """What a value of this built-in base type is published as; None when unsupported."""
    return _KINDS.get(base_type) if base_type is not None else None


def left_out_reason(node: BrowsedNode) -> str | None:
    """Why a variable is not offered as a tag (its block is commented out); None if it is."""
    if node.access is not None and not node.access & ACCESS_READ:
        return "not readable (its access level has no CurrentRead)"
    if node.status in _LASTING_STATUS:
        return f"the server answers {node.status} when it is read"
    if node.base_type is None:
        if node.data_type is None:
            return "its data type is unknown"
        return f"its data type {node.data_type} does not derive from a built-in type"
    if json_kind(node.base_type) is None:
        return f"{node.base_type} values are not supported by the driver"
    if node.undecoded:
        return f"structure {node.data_type} is unknown to the client (its bytes would be published)"
    return None


def write_refusal(node: BrowsedNode) -> str | None:
    """Why a variable the server lets us write is not offered as writable; None if it is."""
    if node.base_type not in _WRITABLE_BASES:
        return f"the driver does not write {node.base_type or 'unknown'} values"
    if node.value_rank is not None and node.value_rank >= 2:
        return "the driver does not write multi-dimensional arrays"
    return None


def is_writable(node: BrowsedNode) -> bool:
    """CurrentWrite for this user, and a type the driver writes."""
    allowed = node.access is not None and bool(node.access & ACCESS_WRITE)
    return allowed and write_refusal(node) is None


# ---------------------------------------------------------------------- the tree


def _value_cell(node: BrowsedNode) -> str:
    if node.note is not None:
        return f"({node.note})"
    if node.status is not None and node.value is None:
        return node.status
    if node.status is not None:
        return f"{node.value} ({node.status})"
    return node.value or ""


def tree_lines(result: BrowseResult) -> list[str]:
    """The tree: browse path (indented by depth), node id, class, data type, access, value."""
    rows = [("path", "node id", "class", "type", "access", "value")]
    for node in (result.start, *result.nodes):
        is_variable = node.is_variable
        rows.append(
            (
                "  " * node.depth + "/".join(node.path),
                node.node_id
                if len(node.node_id) <= _ID_SHOWN
                else node.node_id[:_ID_SHOWN] + "...",
                node.node_class,
                type_label(node) if is_variable else "",
                access_label(node.access) if is_variable else "",
                _value_cell(node),
            )
        )
    shown = [tuple(printable(cell) for cell in row) for row in rows]
    widths = [min(max(len(row[column]) for row in shown), 60) for column in range(5)]
    return [
        "  ".join([*(row[column].ljust(widths[column]) for column in range(5)), row[5]]).rstrip()
        for row in shown
    ]


# ---------------------------------------------------------------------- the tag list


def _comment(node: BrowsedNode) -> str:
    path = printable("/".join(node.path))
    access = {"r": "read", "rw": "read/write", "w": "write only", "-": "no access"}.get(
        access_label(node.access), "access unknown"
    )
    if node.status is not None and node.value is None:
        now = f"status {node.status}"
    else:
        now = f"value {node.value}" if node.value is not None else "no value"
    return f"# {path}: {printable(type_label(node))}, {access}, {printable(now)}"


def tag_block(
    node: BrowsedNode, name: str, *, configured_as: str | None = None
) -> tuple[list[str], bool]:
    """One ``[[devices.tags]]`` block and whether it is active (else it is commented out)."""
    reason = (
        f"already configured as tag {configured_as!r}"
        if configured_as is not None
        else left_out_reason(node)
    )
    try:
        check_node_id(node.config_node_id)
        node_id = toml_string(node.config_node_id)
    except ValueError:
        reason = reason or "its node id cannot be written in the config"
        node_id = '"' + printable(node.config_node_id) + '"'
    body = ["[[devices.tags]]", f"name = {toml_string(name)}", f"node_id = {node_id}"]
    notes = [_comment(node)]
    if reason is None and is_writable(node):
        body.append("writable = true")
    elif reason is None and node.access is not None and node.access & ACCESS_WRITE:
        notes.append(f"# writable on the server, but {write_refusal(node)}")
    if reason is not None:
        notes.append(f"# left out: {printable(reason)}")
        body = ["# " + line for line in body]
    return [*notes, *body], reason is None


def toml_blocks(
    result: BrowseResult,
    *,
    taken: Iterable[str] = (),
    configured: Mapping[str, str] | None = None,
) -> tuple[list[str], int]:
    """``[[devices.tags]]`` blocks for the variables (indented to go below a ``[[devices]]``)
    and how many are active. ``taken``: tag names the device has already; ``configured``:
    its node ids (``ns=N`` form) and their tag names, offered again only as comments."""
    configured = configured or {}
    variables = result.variables()
    names = unique_names((node.path for node in variables), taken)
    lines: list[str] = []
    active = 0
    for node, name in zip(variables, names, strict=True):
        block, is_active = tag_block(node, name, configured_as=configured.get(node.node_id))
        active += is_active
        lines.append("")
        lines += ["  " + line for line in block]
    return lines, active
