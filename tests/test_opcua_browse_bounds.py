"""`edge-agent browse` against hostile or huge servers (drivers/opcua/browse.py): a fake
session answering Browse, BrowseNext and Read as such a server would. Whatever it does, the
browse ends, keeps at most ``max_nodes`` nodes, releases the continuation points it leaves,
and fails with one clear line when the server answers nonsense."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import uvloop
from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.uaerrors import BadTooManyOperations

from drivers.base import DriverUnavailable
from drivers.opcua.browse import BadStartNode, BrowseLimits, Browser
from drivers.opcua.browse_text import left_out_reason, toml_blocks, tree_lines

HAS_COMPONENT = ua.NodeId(47, 0)
Children = Callable[[str], Iterator[tuple[str, ua.NodeClass]]]


def node(name: str) -> ua.NodeId:
    return ua.NodeId(name, 1)


def reference(name: str, klass: ua.NodeClass) -> ua.ReferenceDescription:
    return ua.ReferenceDescription(
        ReferenceTypeId=HAS_COMPONENT,
        NodeId=node(name),
        BrowseName=ua.QualifiedName(name.rsplit("/", 1)[-1], 1),
        NodeClass=klass,
    )


def datavalue(value: Any, vtype: ua.VariantType) -> ua.DataValue:
    return ua.DataValue(ua.Variant(value, vtype))


def bad(code: int) -> ua.DataValue:
    return ua.DataValue(StatusCode=ua.StatusCode(code))


def fan_out(width: int) -> Children:
    """Every node has ``width`` children, one in three a variable (made up when asked for)."""

    def children(parent: str) -> Iterator[tuple[str, ua.NodeClass]]:
        for index in range(width):
            klass = ua.NodeClass.Variable if index % 3 == 2 else ua.NodeClass.Object
            yield f"{parent}/{index}", klass

    return children


@dataclass
class FakeSession:
    """The session calls Browser makes, answered like a (mis)behaving server."""

    children: Children
    per_answer: int = 1000  # references per answer, whatever the client asked for
    endless: bool = False  # a continuation point with every answer, even an empty one
    value: Callable[[str], ua.DataValue] = lambda name: datavalue(1.5, ua.VariantType.Double)
    data_type: ua.NodeId = field(default_factory=lambda: ua.NodeId(11, 0))
    supertypes: dict[str, ua.NodeId] = field(default_factory=dict)
    too_many_above: int | None = None  # BadTooManyOperations for bigger requests
    short_reads: bool = False  # answer a Read with one result too few
    namespaces: Any = field(default_factory=lambda: ["http://opcfoundation.org/UA/", "urn:fake"])
    calls: Counter[str] = field(default_factory=Counter)
    references_sent: int = 0
    open_points: dict[bytes, Iterator[tuple[str, ua.NodeClass]]] = field(default_factory=dict)
    points: Iterator[int] = field(default_factory=itertools.count)

    def _answer(self, pending: Iterator[tuple[str, ua.NodeClass]]) -> ua.BrowseResult:
        chunk = [
            reference(name, klass) for name, klass in itertools.islice(pending, self.per_answer)
        ]
        self.references_sent += len(chunk)
        point = None
        if chunk or self.endless:
            point = f"cp{next(self.points)}".encode()
            self.open_points[point] = pending
        return ua.BrowseResult(ContinuationPoint=point, References=chunk)

    def _check_size(self, count: int) -> None:
        if self.too_many_above is not None and count > self.too_many_above:
            raise BadTooManyOperations()

    async def browse(self, params: ua.BrowseParameters) -> list[ua.BrowseResult]:
        self.calls["browse"] += 1
        self._check_size(len(params.NodesToBrowse))
        out = []
        for description in params.NodesToBrowse:
            name = str(description.NodeId.Identifier)
            if description.BrowseDirection == ua.BrowseDirection.Inverse:  # supertype
                parent = self.supertypes.get(name)
                refs = [ua.ReferenceDescription(NodeId=parent)] if parent is not None else []
                out.append(ua.BrowseResult(References=refs))
                continue
            out.append(self._answer(self.children(name)))
        return out

    async def browse_next(self, params: ua.BrowseNextParameters) -> list[ua.BrowseResult]:
        self.calls["browse_next"] += 1
        out = []
        for point in params.ContinuationPoints:
            pending = self.open_points.pop(point, None)
            if params.ReleaseContinuationPoints or pending is None:
                self.calls["released"] += params.ReleaseContinuationPoints
                out.append(ua.BrowseResult())
                continue
            out.append(self._answer(pending))
        return out

    async def read(self, params: ua.ReadParameters) -> list[ua.DataValue]:
        self.calls["read"] += 1
        self._check_size(len(params.NodesToRead))
        answers = [
            self._attribute(str(item.NodeId.Identifier), item.AttributeId)
            for item in params.NodesToRead
        ]
        return answers[:-1] if self.short_reads else answers

    def _attribute(self, name: str, attribute: int) -> ua.DataValue:
        ids = ua.AttributeIds
        if attribute == ids.NodeClass:
            if name == "missing":
                return bad(ua.StatusCodes.BadNodeIdUnknown)
            return datavalue(int(ua.NodeClass.Object), ua.VariantType.Int32)
        if attribute == ids.BrowseName:
            return datavalue(ua.QualifiedName(name, 1), ua.VariantType.QualifiedName)
        if attribute == ids.Value:
            return self.value(name)
        if attribute == ids.DataType:
            return datavalue(self.data_type, ua.VariantType.NodeId)
        if attribute == ids.ValueRank:
            return datavalue(-1, ua.VariantType.Int32)
        return datavalue(3, ua.VariantType.Byte)  # AccessLevel, UserAccessLevel


class FakeClient:
    def __init__(self, session: FakeSession) -> None:
        self.uaclient = session

    async def get_namespace_array(self) -> Any:
        return self.uaclient.namespaces


def browse(
    session: FakeSession, *, depth: int = 3, max_nodes: int = 500, start: str = "ns=1;s=root"
) -> Any:
    browser = Browser(cast(Client, FakeClient(session)), url="opc.tcp://fake:4840", timeout=0.2)
    return uvloop.run(browser.run(start, BrowseLimits(depth=depth, max_nodes=max_nodes)))


def test_a_huge_server_that_ignores_the_reference_limit_stops_at_max_nodes() -> None:
    # A billion children per node, 5,000 per answer (asked for at most 301), forever.
    session = FakeSession(children=fan_out(10**9), per_answer=5000)
    result = browse(session, depth=10, max_nodes=300)
    assert result.stopped_after == 300
    assert len(result.nodes) == 300
    assert session.references_sent <= 3 * 5000  # it never kept asking for more
    assert not session.open_points  # every continuation point left was released


def test_continuation_points_with_nothing_behind_them_are_not_followed() -> None:
    def empty(_parent: str) -> Iterator[tuple[str, ua.NodeClass]]:
        return iter(())

    session = FakeSession(children=empty, endless=True)
    result = browse(session)
    assert result.nodes == ()
    assert result.stopped_after is None
    assert session.calls["browse_next"] <= 2
    assert not session.open_points


def test_a_server_repeating_one_reference_forever_ends() -> None:
    def forever(_parent: str) -> Iterator[tuple[str, ua.NodeClass]]:
        return itertools.repeat(("root/same", ua.NodeClass.Object))

    session = FakeSession(children=forever, per_answer=1)
    result = browse(session, max_nodes=50)
    assert [n.path for n in result.nodes] == [("same",)]
    assert session.references_sent <= 10 * 50  # the bound on references looked at
    assert not session.open_points


def test_cycles_show_each_node_once() -> None:
    def cycle(parent: str) -> Iterator[tuple[str, ua.NodeClass]]:
        yield from (("root", ua.NodeClass.Object), (parent, ua.NodeClass.Object))
        yield ("root/child", ua.NodeClass.Object)

    result = browse(FakeSession(children=cycle), depth=20)
    assert [n.node_id for n in result.nodes] == ["ns=1;s=root/child"]


def test_a_cyclic_supertype_chain_is_an_unknown_type() -> None:
    session = FakeSession(
        children=fan_out(3),
        data_type=node("TypeA"),
        supertypes={"TypeA": node("TypeB"), "TypeB": node("TypeA")},
    )
    result = browse(session, depth=1)
    (variable,) = result.variables()
    assert variable.data_type == "TypeA"
    assert variable.base_type is None
    assert left_out_reason(variable) == "its data type TypeA does not derive from a built-in type"
    assert session.calls["browse"] <= 1 + 16  # the level, then at most 16 supertype steps
    lines, active = toml_blocks(result)
    assert active == 0
    assert "  # [[devices.tags]]" in lines


def test_a_huge_value_is_shown_cut() -> None:
    session = FakeSession(
        children=fan_out(3),
        value=lambda name: datavalue(list(range(1_000_000)), ua.VariantType.Int32),
    )
    result = browse(session, depth=1)
    (variable,) = result.variables()
    assert variable.value is not None
    assert len(variable.value) <= 60
    assert variable.value.startswith("[0, 1, 2")
    assert all(len(line) < 200 for line in tree_lines(result))


def test_requests_the_server_finds_too_big_are_split() -> None:
    session = FakeSession(children=fan_out(90), too_many_above=7)
    result = browse(session, depth=1)
    assert len(result.variables()) == 30
    assert all(v.value == "1.5" and v.base_type == "Double" for v in result.variables())


def test_a_read_answered_short_is_one_clear_error() -> None:
    session = FakeSession(children=fan_out(3), short_reads=True)
    with pytest.raises(DriverUnavailable, match=r"^opc.tcp://fake:4840: Read: 1 results for 2"):
        browse(session, depth=1)


def test_a_server_that_never_answers_is_one_clear_error() -> None:
    class Silent(FakeSession):
        async def browse(self, params: ua.BrowseParameters) -> list[ua.BrowseResult]:
            await asyncio.Event().wait()
            raise AssertionError

    with pytest.raises(DriverUnavailable, match=r"no answer to Browse within 0.2 s"):
        browse(Silent(children=fan_out(3)))


@pytest.mark.parametrize(
    ("start", "message"),
    [
        ("ns=1;s=missing", r"the server has no node ns=1;s=missing \(BadNodeIdUnknown\)"),
        ("nsu=urn:other;s=x", r"the server has no namespace urn:other"),
        ("i=9999999999", r"out of range"),
        ("Filler.State", r"invalid node id 'Filler.State'"),
    ],
)
def test_a_wrong_start_node_says_why(start: str, message: str) -> None:
    with pytest.raises(BadStartNode, match=message):
        browse(FakeSession(children=fan_out(3)), start=start)


def test_nonsense_names_classes_and_namespaces_are_survived() -> None:
    def odd(parent: str) -> Iterator[tuple[str, ua.NodeClass]]:
        if parent == "root":
            yield "root/" + "n" * 1_000_000, ua.NodeClass.Variable
            yield "root/odd", cast(ua.NodeClass, 3)  # not a node class

    session = FakeSession(children=odd, namespaces=None)
    result = browse(session, depth=2)
    long, weird = result.nodes
    assert len(long.path[0]) == 100
    assert long.config_node_id.startswith("ns=1;s=root/nnnn")  # no namespace URIs: ns=N
    assert weird.node_class == "Unspecified"
    assert max(len(line) for line in tree_lines(result)) < 400
