"""Browsing a server's address space for `edge-agent browse` (docs/opcua.md, "Browsing a
server"): the hierarchical references below a node, level by level, each variable's data
type, access level and current value read in batches.

Bounded whatever the server does: at most ``depth`` levels and ``max_nodes`` nodes are
collected (references beyond them are dropped and continuation points released), at most
``10 x max_nodes`` references are looked at (a server repeating references or handing out
empty continuation points forever), supertype chains are followed at most 16 steps and for
at most 200 data types, and every request has a deadline.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, TypeVar

from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIdNames
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError

from drivers.base import DriverFault, DriverUnavailable
from drivers.opcua.browse_text import (
    BrowsedNode,
    BrowseResult,
    config_node_id,
    make_node_id,
    node_id_text,
)
from drivers.opcua.config import check_node_id
from drivers.opcua.values import NotFinite, json_value, status_name

_NUMERIC = ua.NodeIdType.Numeric
_HIERARCHICAL: Final = make_node_id(33, 0, _NUMERIC)  # HierarchicalReferences and subtypes
_HAS_PROPERTY: Final = make_node_id(46, 0, _NUMERIC)
_HAS_SUBTYPE: Final = make_node_id(45, 0, _NUMERIC)
# The server's own object (diagnostics, capabilities): hundreds of nodes that are not the line.
_SERVER_OBJECT: Final = (0, 2253)
_SHOWN_CLASSES: Final = (
    ua.NodeClass.Object | ua.NodeClass.Variable | ua.NodeClass.Method | ua.NodeClass.View
)
_BROWSE_BATCH: Final = 20  # nodes per Browse request
_READ_BATCH: Final = 40  # variables per Read request (5 attributes each)
_MAX_REFERENCES_PER_NODE: Final = 1000
_REFERENCES_PER_NODE_BOUND: Final = 10  # references looked at per node collected
_SUPERTYPE_STEPS: Final = 16
_DATA_TYPES_MAX: Final = 200
_VALUE_TEXT_MAX: Final = 60
_NAME_MAX: Final = 100
_VALUE_ITEMS_MAX: Final = 10
_VARIABLE_ATTRIBUTES: Final = (
    AttributeIds.Value,
    AttributeIds.DataType,
    AttributeIds.ValueRank,
    AttributeIds.AccessLevel,
    AttributeIds.UserAccessLevel,
)
# DataType ids below 30 in namespace 0 are the built-in types and the abstract roots.
_BUILT_IN_LIMIT: Final = 30

ResultT = TypeVar("ResultT")
ItemT = TypeVar("ItemT")


class BadStartNode(DriverFault):
    """The node to browse from is not written right or not on the server."""


class _TooManyOperations(DriverUnavailable):
    """The server refused a request for holding too many nodes (smaller batches may pass)."""


@dataclass(frozen=True, slots=True)
class BrowseLimits:
    """How far a browse goes: levels below the start node, and nodes collected."""

    depth: int
    max_nodes: int


@dataclass(slots=True)
class _Node:
    """A node while browsing: what the Browse said, then what the Read said."""

    node_id: ua.NodeId
    depth: int
    path: tuple[str, ...]
    node_class: str
    children: list[_Node] = field(default_factory=list)
    note: str | None = None
    shown: BrowsedNode | None = None  # once its attributes are read
    data_type: ua.NodeId | None = None


def _key(node: ua.NodeId) -> tuple[int, Any]:
    # NodeId equality also compares the encoding (TwoByte, Numeric): the same node.
    return node.NamespaceIndex, node.Identifier


class _Session:
    """The client's requests under a deadline, failures as the driver's errors."""

    def __init__(self, client: Client, *, url: str, timeout: float) -> None:
        self.client = client
        self.url = url
        self.timeout = timeout

    async def call(self, what: str, request: Awaitable[ResultT]) -> ResultT:
        """One request under a deadline; failures as the driver's errors."""
        try:
            async with asyncio.timeout(self.timeout + 1.0):
                return await request
        except TimeoutError:
            raise DriverUnavailable(
                f"{self.url}: no answer to {what} within {self.timeout:g} s"
            ) from None
        except OSError as exc:
            raise DriverUnavailable(f"{self.url}: connection lost ({exc})") from None
        except UaStatusCodeError as exc:
            kind = _TooManyOperations if exc.code == StatusCodes.BadTooManyOperations else None
            raise (kind or DriverUnavailable)(
                f"{self.url}: {what} failed: {status_name(int(exc.code))}"
            ) from None

    async def batched(
        self,
        what: str,
        items: Sequence[ItemT],
        size: int,
        send: Callable[[Sequence[ItemT]], Awaitable[list[ResultT]]],
    ) -> list[ResultT]:
        """``send`` over ``items`` in batches; a batch the server finds too big is halved."""
        results: list[ResultT] = []
        for index in range(0, len(items), size):
            batch = items[index : index + size]
            try:
                answer = await send(batch)
            except _TooManyOperations:
                if len(batch) == 1:
                    raise
                answer = await self.batched(what, batch, max(1, len(batch) // 2), send)
            if len(answer) != len(batch):
                raise DriverUnavailable(
                    f"{self.url}: {what}: {len(answer)} results for {len(batch)} nodes"
                )
            results += answer
        return results


class _DataTypes:
    """Data types by node id: their names and built-in bases, cached (at most 200)."""

    def __init__(self, session: _Session) -> None:
        self._session = session
        self._names: dict[tuple[int, Any], str] = {}
        self._bases: dict[tuple[int, Any], str | None] = {}

    async def resolve(self, data_type: ua.NodeId) -> tuple[str, str | None]:
        """The data type's name and the built-in type (or abstract root) it derives from."""
        key = _key(data_type)
        if key not in self._bases:
            if len(self._bases) >= _DATA_TYPES_MAX:
                return node_id_text(data_type), None
            self._names[key] = await self._type_name(data_type)
            self._bases[key] = await self._base_of(data_type)
        return self._names[key], self._bases[key]

    async def _type_name(self, data_type: ua.NodeId) -> str:
        if data_type.NamespaceIndex == 0 and isinstance(data_type.Identifier, int):
            known = ObjectIdNames.get(data_type.Identifier)
            if known is not None:
                return str(known)
        request = ua.ReadParameters(
            NodesToRead=[ua.ReadValueId(NodeId=data_type, AttributeId=AttributeIds.BrowseName)]
        )
        results = await self._session.call("Read", self._session.client.uaclient.read(request))
        name = _value(results[0]) if results else None
        return name.Name if isinstance(name, ua.QualifiedName) else node_id_text(data_type)

    async def _base_of(self, data_type: ua.NodeId) -> str | None:
        """The built-in type (or abstract root) a data type derives from, by its supertypes."""
        current: ua.NodeId | None = data_type
        for _ in range(_SUPERTYPE_STEPS):
            if current is None:
                return None
            built_in = _built_in(current)
            if built_in is not None:
                return built_in
            current = await self._supertype(current)
        return None

    async def _supertype(self, data_type: ua.NodeId) -> ua.NodeId | None:
        params = ua.BrowseParameters(
            RequestedMaxReferencesPerNode=1,
            NodesToBrowse=[
                ua.BrowseDescription(
                    NodeId=data_type,
                    BrowseDirection=ua.BrowseDirection.Inverse,
                    ReferenceTypeId=_HAS_SUBTYPE,
                    IncludeSubtypes=False,
                    ResultMask=int(ua.BrowseResultMask.None_),
                )
            ],
        )
        results = await self._session.call("Browse", self._session.client.uaclient.browse(params))
        if not results or not results[0].References:
            return None
        target = results[0].References[0].NodeId
        return make_node_id(target.Identifier, target.NamespaceIndex, target.NodeIdType)


class Browser:
    """One browse over a connected client (see the module notes for its bounds)."""

    def __init__(self, client: Client, *, url: str, timeout: float) -> None:
        self._session = _Session(client, url=url, timeout=timeout)
        self._types = _DataTypes(self._session)
        self._namespaces: tuple[str, ...] = ()
        self._references_left = 0

    async def run(self, start: str, limits: BrowseLimits) -> BrowseResult:
        """The tree below ``start`` (a node id as written in the config)."""
        namespaces = await self._session.call(
            "read the namespace array", self._session.client.get_namespace_array()
        )
        # Anything but a list of URIs: node ids are then written with indexes (ns=N).
        self._namespaces = tuple(map(str, namespaces)) if isinstance(namespaces, list) else ()
        root = await self._start_node(start)
        self._references_left = _REFERENCES_PER_NODE_BOUND * limits.max_nodes
        level = [root]
        seen = {_key(root.node_id)}
        collected = 0
        stopped = False
        for _ in range(limits.depth):
            expandable = [node for node in level if node.note is None]
            children, stopped = await self._browse_level(
                expandable, seen, limits.max_nodes - collected
            )
            collected += len(children)
            level = children
            if stopped or not level:
                break
        unexpanded = (
            0 if stopped else sum(n.node_class == "Object" and n.note is None for n in level)
        )
        await self._read_variables([root, *self._walk(root)])
        nodes = tuple(node.shown for node in self._walk(root) if node.shown is not None)
        assert root.shown is not None
        return BrowseResult(
            start=root.shown,
            nodes=nodes,
            namespaces=self._namespaces,
            stopped_after=collected if stopped else None,
            unexpanded=unexpanded,
        )

    # -- the start node ------------------------------------------------------------------

    async def _start_node(self, text: str) -> _Node:
        node_id = self._parse_start(text)
        request = ua.ReadParameters(
            NodesToRead=[
                ua.ReadValueId(NodeId=node_id, AttributeId=attribute)
                for attribute in (AttributeIds.NodeClass, AttributeIds.BrowseName)
            ]
        )
        results = await self._session.call("Read", self._session.client.uaclient.read(request))
        if len(results) != 2:
            raise DriverUnavailable(
                f"{self._session.url}: Read: {len(results)} results for 2 attributes"
            )
        node_class, browse_name = results
        status = node_class.StatusCode
        if status is not None and not status.is_good():
            raise BadStartNode(
                f"the server has no node {text} ({status_name(status.value)}); browse without "
                "--node to see the tree"
            )
        klass = _value(node_class)
        name = _value(browse_name)
        return _Node(
            node_id=node_id,
            depth=0,
            path=(_shown_name(name.Name if isinstance(name, ua.QualifiedName) else text),),
            node_class=_class_name(klass),
        )

    def _parse_start(self, text: str) -> ua.NodeId:
        try:
            check_node_id(text)
            parsed = ua.NodeId.from_string(text)
        except (ValueError, UaError) as exc:
            raise BadStartNode(f"--node: {exc}") from None
        index: int = parsed.NamespaceIndex
        uri = getattr(parsed, "NamespaceUri", None)
        if uri:
            if uri not in self._namespaces:
                raise BadStartNode(f"the server has no namespace {uri} (node {text})")
            index = self._namespaces.index(uri)
        numeric = isinstance(parsed.Identifier, int) and parsed.Identifier > 0xFFFFFFFF
        if index > 0xFFFF or numeric:
            raise BadStartNode(f"--node: {text} is out of range for a node id")
        return make_node_id(parsed.Identifier, index, parsed.NodeIdType)

    # -- browsing --------------------------------------------------------------------------

    async def _browse_level(
        self, parents: list[_Node], seen: set[tuple[int, Any]], budget: int
    ) -> tuple[list[_Node], bool]:
        """The children of ``parents`` not seen before; True when the node bound stopped it."""
        children: list[_Node] = []
        for index in range(0, len(parents), _BROWSE_BATCH):
            batch = parents[index : index + _BROWSE_BATCH]
            results = await self._browse(batch, budget - len(children))
            for parent, references in zip(batch, results, strict=True):
                for reference in references:
                    if len(children) >= budget or self._references_left <= 0:
                        return children, True
                    self._references_left -= 1
                    child = self._child(parent, reference, seen)
                    if child is not None:
                        parent.children.append(child)
                        children.append(child)
        return children, False

    async def _browse(
        self, parents: list[_Node], budget: int
    ) -> list[list[ua.ReferenceDescription]]:
        """Forward hierarchical references of each parent, following continuation points
        while the budget lasts and releasing the rest."""
        wanted = max(1, min(budget + 1, _MAX_REFERENCES_PER_NODE))
        descriptions = [
            ua.BrowseDescription(
                NodeId=parent.node_id,
                BrowseDirection=ua.BrowseDirection.Forward,
                ReferenceTypeId=_HIERARCHICAL,
                IncludeSubtypes=True,
                NodeClassMask=int(_SHOWN_CLASSES),
                ResultMask=int(ua.BrowseResultMask.All),
            )
            for parent in parents
        ]

        async def send(batch: Sequence[ua.BrowseDescription]) -> list[ua.BrowseResult]:
            params = ua.BrowseParameters(
                RequestedMaxReferencesPerNode=wanted, NodesToBrowse=list(batch)
            )
            return await self._session.call("Browse", self._session.client.uaclient.browse(params))

        results = await self._session.batched("Browse", descriptions, len(descriptions), send)
        out: list[list[ua.ReferenceDescription]] = []
        for parent, result in zip(parents, results, strict=True):
            if result.StatusCode is not None and not result.StatusCode.is_good():
                parent.note = f"browse failed: {status_name(result.StatusCode.value)}"
                out.append([])
                continue
            out.append(await self._rest(list(result.References or []), result, budget))
        return out

    async def _rest(
        self, references: list[ua.ReferenceDescription], result: ua.BrowseResult, budget: int
    ) -> list[ua.ReferenceDescription]:
        """BrowseNext while a continuation point comes with new references and budget lasts."""
        point = result.ContinuationPoint
        while point and len(references) <= budget and self._references_left > len(references):
            params = ua.BrowseNextParameters(
                ReleaseContinuationPoints=False, ContinuationPoints=[point]
            )
            answer = await self._session.call(
                "BrowseNext", self._session.client.uaclient.browse_next(params)
            )
            following = answer[0] if answer else ua.BrowseResult()
            more = list(following.References or [])
            references += more
            point = following.ContinuationPoint
            if not more:
                break  # a continuation point with nothing behind it is not followed
        if point:
            release = ua.BrowseNextParameters(
                ReleaseContinuationPoints=True, ContinuationPoints=[point]
            )
            await self._session.call(
                "BrowseNext", self._session.client.uaclient.browse_next(release)
            )
        return references

    def _child(
        self, parent: _Node, reference: ua.ReferenceDescription, seen: set[tuple[int, Any]]
    ) -> _Node | None:
        """A new node from a reference; None for one seen before or on another server."""
        target = reference.NodeId
        if getattr(target, "ServerIndex", None):
            return None
        index: int = target.NamespaceIndex
        uri = getattr(target, "NamespaceUri", None)
        if uri:
            if uri not in self._namespaces:
                return None
            index = self._namespaces.index(uri)
        node_id = make_node_id(target.Identifier, index, target.NodeIdType)
        if _key(node_id) in seen:
            return None
        seen.add(_key(node_id))
        klass = _class_name(reference.NodeClass)
        if klass == "Variable" and _key(reference.ReferenceTypeId) == _key(_HAS_PROPERTY):
            klass = "Property"
        name = reference.BrowseName.Name if reference.BrowseName is not None else None
        # Paths start below the start node: its children's paths are their own names.
        above = parent.path if parent.depth else ()
        child = _Node(
            node_id=node_id,
            depth=parent.depth + 1,
            path=(*above, _shown_name(name)),
            node_class=klass,
        )
        if _key(node_id) == _SERVER_OBJECT:
            child.note = f"not browsed: the server's own object; --node {node_id_text(node_id)}"
        return child

    @staticmethod
    def _walk(root: _Node) -> list[_Node]:
        """The nodes below ``root`` in tree order (pre-order), without recursion."""
        order: list[_Node] = []
        stack = list(reversed(root.children))
        while stack:
            node = stack.pop()
            order.append(node)
            stack += reversed(node.children)
        return order

    # -- attributes ----------------------------------------------------------------------

    async def _read_variables(self, nodes: list[_Node]) -> None:
        """Give every node its shown form; variables with their attributes and value."""
        variables = [node for node in nodes if node.node_class in ("Variable", "Property")]

        async def send(batch: Sequence[ua.ReadValueId]) -> list[ua.DataValue]:
            params = ua.ReadParameters(NodesToRead=list(batch))
            return await self._session.call("Read", self._session.client.uaclient.read(params))

        reads = [
            ua.ReadValueId(NodeId=node.node_id, AttributeId=attribute)
            for node in variables
            for attribute in _VARIABLE_ATTRIBUTES
        ]
        width = len(_VARIABLE_ATTRIBUTES)
        values = await self._session.batched("Read", reads, _READ_BATCH * width, send)
        for index, node in enumerate(variables):
            node.shown = self._variable(node, values[index * width : (index + 1) * width])
        for node in variables:
            if node.data_type is not None and node.shown is not None:
                name, base = await self._types.resolve(node.data_type)
                node.shown = replace(node.shown, data_type=name, base_type=base)
        for node in nodes:
            if node.shown is None:
                node.shown = self._shown(node)

    def _shown(self, node: _Node) -> BrowsedNode:
        return BrowsedNode(
            depth=node.depth,
            path=node.path,
            node_id=node_id_text(node.node_id),
            config_node_id=config_node_id(node.node_id, self._namespaces),
            node_class=node.node_class,
            note=node.note,
        )

    def _variable(self, node: _Node, results: list[ua.DataValue]) -> BrowsedNode:
        value, dtype, rank, access, user_access = results
        data_type = _value(dtype)
        node.data_type = data_type if isinstance(data_type, ua.NodeId) else None
        rank_value = _value(rank)
        levels = [_value(access), _value(user_access)]
        known = [level for level in levels if isinstance(level, int)]
        effective = known[0] & known[-1] if known else None
        text, status, undecoded = _value_text(value)
        return replace(
            self._shown(node),
            value_rank=rank_value if isinstance(rank_value, int) else None,
            access=effective,
            value=text,
            status=status,
            undecoded=undecoded,
        )


def _shown_name(name: str | None) -> str:
    """A browse name as a path level: at most 100 characters (a server may send megabytes)."""
    return (name or "?")[:_NAME_MAX]


def _class_name(value: Any) -> str:
    """``Object``, ``Variable``, ... of a NodeClass value (``Unspecified`` for anything else)."""
    try:
        return ua.NodeClass(value).name
    except (ValueError, TypeError):
        return "Unspecified"


def _built_in(data_type: ua.NodeId) -> str | None:
    """The name of a built-in data type or abstract root (Structure, Enumeration, ...)."""
    identifier = data_type.Identifier
    if data_type.NamespaceIndex != 0 or not isinstance(identifier, int):
        return None
    return str(ObjectIdNames[identifier]) if 0 < identifier < _BUILT_IN_LIMIT else None


def _value(result: ua.DataValue) -> Any:
    """The attribute value of a Read result; None when it has none or is not good."""
    status = result.StatusCode
    if status is not None and not status.is_good():
        return None
    return result.Value.Value if result.Value is not None else None


def _value_text(result: ua.DataValue) -> tuple[str | None, str | None, bool]:
    """A value as short JSON text, the status name when not Good, and whether it is a
    structure the client could not decode."""
    code = result.StatusCode.value if result.StatusCode is not None else 0
    status = status_name(code) if code >> 30 else None  # Good with info bits is Good
    if code >> 30 >= 2 or result.Value is None:
        return None, status, False
    raw = result.Value.Value
    items = raw if isinstance(raw, list) else [raw]
    undecoded = any(isinstance(item, ua.ExtensionObject) for item in items[:_VALUE_ITEMS_MAX])
    shown = raw[:_VALUE_ITEMS_MAX] if isinstance(raw, list) else raw
    try:
        text = json.dumps(json_value(shown), ensure_ascii=False)
    except NotFinite as exc:
        text = str(exc)
    if isinstance(raw, list) and len(raw) > _VALUE_ITEMS_MAX and text.endswith("]"):
        text = text[:-1] + ", ...]"
    if len(text) > _VALUE_TEXT_MAX:
        text = text[: _VALUE_TEXT_MAX - 3] + "..."
    return text, status, undecoded
