"""The pure side of `edge-agent browse` (drivers/opcua/browse_text.py): tag names from browse
paths, node ids as the config writes them, type and access rules, escaping, the tree, and a
property: whatever a server names its nodes, the `--toml` output parses and `check` accepts it
with every active tag's node id naming the browsed node."""

from __future__ import annotations

import re
import tempfile
import tomllib
import uuid
from pathlib import Path

import pytest
from asyncua import ua
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.settings.config_file import AgentSettings
from agent.settings.loader import load_settings_with_warnings, no_secret
from drivers.config import NAME_PATTERN
from drivers.opcua.browse_text import (
    BrowsedNode,
    BrowseResult,
    access_label,
    config_node_id,
    is_writable,
    json_kind,
    left_out_reason,
    namespace_index_form,
    printable,
    tag_block,
    tag_name,
    toml_blocks,
    toml_string,
    tree_lines,
    type_label,
    unique_names,
)
from drivers.opcua.config import OpcUaDeviceConfig

NAMESPACES = ("http://opcfoundation.org/UA/", "urn:plc:server", "urn:plc:line")
HEADER = """
[gateway]
id = "gw1"
site = "plant1"
area = "assembly"
line = "line3"
data_dir = "/tmp/edge-agent-browse-test"

[mqtt]
url = "mqtt://127.0.0.1:1"

[[devices]]
name = "filler"
driver = "opcua"
url = "opc.tcp://127.0.0.1:4840"
"""


def variable(path: tuple[str, ...], **keys: object) -> BrowsedNode:
    fields: dict[str, object] = {
        "depth": len(path),
        "path": path,
        "node_id": "ns=2;s=" + ".".join(path),
        "config_node_id": "nsu=urn:plc:line;s=" + ".".join(path),
        "node_class": "Variable",
        "data_type": "UInt16",
        "base_type": "UInt16",
        "value_rank": -1,
        "access": 1,
        "value": "1",
    }
    fields.update(keys)
    return BrowsedNode(**fields)


# ---------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("path", "name"),
    [
        (("Filler", "Counters", "Total"), "Filler.Counters.Total"),
        (("State",), "State"),
        (("Temp (°C)",), "Temp_C"),
        (("Öl-Druck",), "Ol-Druck"),
        (("a b", "c/d", "e+f#g"), "a_b.c_d.e_f_g"),
        (("_private",), "_private"),
        (("-5V",), "_5V"),
        (("", "温度"), "tag"),  # nothing usable: a placeholder, made unique by unique_names
        (("x" * 40, "y" * 40), "y" * 40),  # too long: the deepest levels that fit
        (("z" * 80,), "z" * 64),
        (("DB1", "Motor.Speed"), "DB1.Motor_Speed"),  # a dot inside a level is not a level
        (("line\nbreak", "tab\there"), "line_break.tab_here"),
    ],
)
def test_tag_names_from_browse_paths(path: tuple[str, ...], name: str) -> None:
    assert tag_name(path) == name
    assert re.fullmatch(NAME_PATTERN, name)


def test_colliding_names_are_numbered_and_avoid_taken_ones() -> None:
    paths = [("A", "x"), ("A", "x"), ("A x",), ("A_x",), ("A", "x")]
    assert unique_names(paths, taken=["A.x_2"]) == ["A.x", "A.x_3", "A_x", "A_x_2", "A.x_4"]
    long = ("n" * 64,)
    assert unique_names([long, long]) == ["n" * 64, "n" * 62 + "_2"]


# ---------------------------------------------------------------------- node ids


@pytest.mark.parametrize(
    ("node", "written"),
    [
        (ua.NodeId(85, 0), "i=85"),
        (ua.NodeId("Filler.State", 2), "nsu=urn:plc:line;s=Filler.State"),
        (ua.NodeId(1042, 2, ua.NodeIdType.Numeric), "nsu=urn:plc:line;i=1042"),
        (ua.NodeId("Mixed;Up", 1), "nsu=urn:plc:server;s=Mixed;Up"),
        (
            ua.NodeId(uuid.UUID("12345678-1234-5678-1234-567812345678"), 2),
            "nsu=urn:plc:line;g=12345678-1234-5678-1234-567812345678",
        ),
        (ua.NodeId(b"\x01\xff", 2), "nsu=urn:plc:line;b=Af8="),
        (ua.NodeId("Beyond", 7), "ns=7;s=Beyond"),  # no such namespace: the index as it is
    ],
)
def test_node_ids_are_written_with_the_namespace_uri(node: ua.NodeId, written: str) -> None:
    assert config_node_id(node, NAMESPACES) == written
    assert namespace_index_form(written, NAMESPACES) == node.to_string()


def test_a_namespace_uri_the_config_cannot_hold_keeps_the_index() -> None:
    namespaces = ("http://opcfoundation.org/UA/", "urn:a;b")
    assert config_node_id(ua.NodeId("X", 1), namespaces) == "ns=1;s=X"
    assert namespace_index_form("nsu=urn:other;s=X", namespaces) is None
    assert namespace_index_form("not a node id", namespaces) is None
    # A URI listed twice would name its first index: the second keeps its index.
    twice = ("http://opcfoundation.org/UA/", "urn:x", "urn:x")
    assert config_node_id(ua.NodeId("X", 2), twice) == "ns=2;s=X"
    assert config_node_id(ua.NodeId("X", 1), twice) == "nsu=urn:x;s=X"


# ---------------------------------------------------------------------- types and access


@pytest.mark.parametrize(
    ("base", "kind"),
    [
        ("Boolean", "boolean"),
        ("UInt64", "integer"),
        ("Enumeration", "integer"),
        ("Float", "number"),
        ("DateTime", "string"),
        ("LocalizedText", "string"),
        ("Structure", "object"),
        ("BaseDataType", "any JSON"),
        ("DataValue", None),
        ("DiagnosticInfo", None),
        (None, None),
    ],
)
def test_data_types_map_to_what_is_published(base: str | None, kind: str | None) -> None:
    assert json_kind(base) == kind


@pytest.mark.parametrize(
    ("keys", "reason"),
    [
        ({}, None),
        ({"access": 0}, "not readable (its access level has no CurrentRead)"),
        (
            {"status": "BadUserAccessDenied"},
            "the server answers BadUserAccessDenied when it is read",
        ),
        ({"status": "BadSensorFailure", "value": None}, None),  # may heal: offered
        ({"base_type": None, "data_type": None}, "its data type is unknown"),
        (
            {"base_type": None, "data_type": "Odd"},
            "its data type Odd does not derive from a built-in type",
        ),
        ({"base_type": "DiagnosticInfo"}, "DiagnosticInfo values are not supported by the driver"),
        (
            {"base_type": "Structure", "data_type": "Recipe", "undecoded": True},
            "structure Recipe is unknown to the client (its bytes would be published)",
        ),
        ({"base_type": "Structure", "data_type": "Range"}, None),
    ],
)
def test_what_is_left_out_and_why(keys: dict[str, object], reason: str | None) -> None:
    assert left_out_reason(variable(("X",), **keys)) == reason


@pytest.mark.parametrize(
    ("keys", "writable"),
    [
        ({"access": 3}, True),
        ({"access": 1}, False),
        ({"access": 3, "base_type": "Enumeration"}, True),
        ({"access": 3, "base_type": "Structure"}, False),
        ({"access": 3, "base_type": "Number"}, False),  # abstract: the driver cannot pick a type
        ({"access": 3, "value_rank": 1}, True),
        ({"access": 3, "value_rank": 2}, False),
        ({"access": None}, False),
    ],
)
def test_writable_needs_current_write_and_a_type_the_driver_writes(
    keys: dict[str, object], writable: bool
) -> None:
    assert is_writable(variable(("X",), **keys)) is writable


def test_labels() -> None:
    assert [access_label(a) for a in (None, 0, 1, 2, 3, 7)] == ["", "-", "r", "w", "rw", "rw"]
    assert type_label(variable(("X",), data_type="Int32", value_rank=2)) == "Int32[][]"
    assert type_label(variable(("X",), data_type="Int32", value_rank=0)) == "Int32[]"
    assert type_label(variable(("X",), data_type=None, value_rank=-2)) == "?"


# ---------------------------------------------------------------------- escaping and blocks


def test_text_from_the_server_is_escaped() -> None:
    assert printable("ok text") == "ok text"
    assert printable("a\x1b[2Jb\nc\x85\u2028") == "a\\x1b[2Jb\\nc\\x85\\u2028".replace(
        "\\n", "\\x0a"
    )
    assert toml_string('q"b\\\n\x7f\U0001f600') == '"q\\"b\\\\\\u000A\\u007F\U0001f600"'
    assert tomllib.loads("k = " + toml_string('q"b\\\n\x7f'))["k"] == 'q"b\\\n\x7f'
    with pytest.raises(ValueError, match="surrogate"):
        toml_string("\udc80")


def test_blocks_say_why_a_variable_is_left_out_or_not_writable() -> None:
    writable, active = tag_block(variable(("Speed",), access=3, value="120.5"), "Speed")
    assert active
    assert writable == [
        "# Speed: UInt16, read/write, value 120.5",
        "[[devices.tags]]",
        'name = "Speed"',
        'node_id = "nsu=urn:plc:line;s=Speed"',
        "writable = true",
    ]
    no_write, active = tag_block(
        variable(("Range",), access=3, base_type="Structure", data_type="Range"), "Range"
    )
    assert active
    assert "# writable on the server, but the driver does not write Structure values" in no_write
    assert "writable = true" not in no_write
    bad_id = variable(("Odd",), config_node_id="ns=2;s=line\nbreak")
    lines, active = tag_block(bad_id, "Odd")
    assert not active
    assert lines[1:] == [
        "# left out: its node id cannot be written in the config",
        "# [[devices.tags]]",
        '# name = "Odd"',
        '# node_id = "ns=2;s=line\\x0abreak"',
    ]
    known, active = tag_block(variable(("State",)), "State_2", configured_as="state")
    assert not active
    assert "# left out: already configured as tag 'state'" in known


def test_the_tree_shows_every_column_indented_by_depth() -> None:
    start = BrowsedNode(0, ("Objects",), "i=85", "i=85", "Object")
    folder = BrowsedNode(1, ("Filler",), "ns=2;s=Filler", "nsu=urn:plc:line;s=Filler", "Object")
    state = variable(("Filler", "State"), depth=2, access=3, status="UncertainLastUsableValue")
    evil = variable(("Filler", "Ev\x1bil"), depth=2, value='"\x1b[31m"', status="BadWaitingX")
    result = BrowseResult(start, (folder, state, evil), NAMESPACES)
    lines = tree_lines(result)
    assert lines[0].split() == ["path", "node", "id", "class", "type", "access", "value"]
    assert lines[1].split() == ["Objects", "i=85", "Object"]
    assert lines[2].startswith("  Filler ")
    assert lines[3].startswith("    Filler/State ")
    assert lines[3].split()[1:] == [
        "ns=2;s=Filler.State",
        "Variable",
        "UInt16",
        "rw",
        "1",
        "(UncertainLastUsableValue)",
    ]
    assert "\x1b" not in "\n".join(lines)
    assert "Filler/Ev\\x1bil" in lines[4]


# ---------------------------------------------------------------------- the property


def _text(max_size: int = 12) -> st.SearchStrategy[str]:
    # Any character a server could send, surrogates and controls included.
    return st.text(st.characters(exclude_categories=()), max_size=max_size)


BASE_TYPES = [None, "Boolean", "Int32", "Double", "String", "Enumeration", "Structure"]
BASE_TYPES += ["BaseDataType", "DataValue", "DateTime", "Number"]
_identifiers = st.one_of(
    st.integers(0, 2**32 - 1).map(lambda i: (i, ua.NodeIdType.Numeric)),
    _text().filter(bool).map(lambda s: (s, ua.NodeIdType.String)),
    st.uuids().map(lambda g: (g, ua.NodeIdType.Guid)),
    st.binary(min_size=1, max_size=8).map(lambda b: (b, ua.NodeIdType.ByteString)),
)


@st.composite
def browsed_variables(draw: st.DrawFn) -> tuple[list[ua.NodeId], BrowseResult]:
    namespaces = (NAMESPACES[0], *draw(st.lists(_text(20), min_size=1, max_size=3)))
    nodes = []
    browsed = []
    for _ in range(draw(st.integers(0, 12))):
        identifier, kind = draw(_identifiers)
        node = ua.NodeId(identifier, draw(st.integers(0, len(namespaces))), kind)
        path = tuple(draw(st.lists(_text(), min_size=1, max_size=4)))
        nodes.append(node)
        browsed.append(
            BrowsedNode(
                depth=len(path),
                path=path,
                node_id=node.to_string(),
                config_node_id=config_node_id(node, namespaces),
                node_class="Variable",
                data_type=draw(st.none() | _text()),
                base_type=draw(st.sampled_from(BASE_TYPES)),
                value_rank=draw(st.sampled_from([None, -3, -2, -1, 0, 1, 2])),
                access=draw(st.none() | st.integers(0, 255)),
                value=draw(st.none() | _text(30)),
                status=draw(st.sampled_from([None, "BadNotReadable", "UncertainX", "BadY"])),
                undecoded=draw(st.booleans()),
            )
        )
    start = BrowsedNode(0, ("Objects",), "i=85", "i=85", "Object")
    return nodes, BrowseResult(start, tuple(browsed), namespaces)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    found=browsed_variables(),
    taken=st.lists(st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,10}", fullmatch=True), max_size=3),
)
def test_rendered_toml_parses_and_check_accepts_it(
    found: tuple[list[ua.NodeId], BrowseResult], taken: list[str]
) -> None:
    nodes, result = found
    lines, active = toml_blocks(result, taken=taken)
    text = "\n".join(lines)
    tomllib.loads(text)  # comments included: every line is valid TOML
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "agent.toml"
        path.write_text(HEADER + text + "\n", encoding="utf-8")
        loaded, _ = load_settings_with_warnings(AgentSettings, path, secrets_needed=no_secret)
    device = loaded.devices[0]
    assert isinstance(device, OpcUaDeviceConfig)
    assert len(device.tags) == active
    names = [tag.name for tag in device.tags]
    assert len(set(names)) == len(names)
    assert not set(names) & set(taken)
    # Each active tag names the node it was browsed from.
    by_id = {config_node_id(node, result.namespaces): node for node in nodes}
    for tag in device.tags:
        written = namespace_index_form(tag.node_id, result.namespaces)
        assert written == by_id[tag.node_id].to_string()
