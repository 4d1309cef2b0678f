"""Generate config/agent.schema.json and docs/configuration.md from the config models.

Run `scripts/gen-docs` after changing a config model; tests fail when either file is stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.central.settings import central_schema  # noqa: E402
from agent.settings.schema import agent_schema  # noqa: E402
from drivers.config import DURATION_PATTERN, SIZE_PATTERN  # noqa: E402

# (heading, $defs name or "" for the root, TOML table as written in a file, intro)
AGENT_SECTIONS: list[tuple[str, str, str, str]] = [
    ("[gateway]", "GatewayConfig", "gateway", "Identity of this gateway and where it keeps state."),
    ("[mqtt]", "MqttConfig", "mqtt", "The broker, the topic roots and the durable path's pacing."),
    ("[buffer]", "BufferConfig", "buffer", "The SQLite outbox."),
    ("[http]", "HttpConfig", "http", "Health and metrics endpoint."),
    (
        "[sparkplug]",
        "SparkplugConfig",
        "sparkplug",
        "A Sparkplug B 3.0 edge node beside the JSON topics (docs/sparkplug.md).",
    ),
    (
        "[sparkplug.broker]",
        "SparkplugBrokerConfig",
        "sparkplug.broker",
        "The Sparkplug edge node's own broker connection (default: the [mqtt] one).",
    ),
    (
        '[[devices]] with driver = "modbus"',
        "ModbusDeviceConfig",
        "devices",
        "A Modbus TCP or RTU device.",
    ),
    ("[[devices.tags]] of a Modbus device", "ModbusTagConfig", "devices.tags", "A Modbus value."),
    (
        '[[devices]] with driver = "opcua"',
        "OpcUaDeviceConfig",
        "devices",
        "An OPC UA server.",
    ),
    (
        "[[devices.tags]] of an OPC UA device",
        "OpcUaTagConfig",
        "devices.tags",
        "An OPC UA variable.",
    ),
    ("[[machines]]", "MachineConfig", "machines", "One OEE calculation (ISO 22400-2)."),
    ("machines.state", "MachineStateConfig", "machines.state", "State code mapping."),
    ("[[calendars]]", "CalendarConfig", "calendars", "A shift plan."),
    ("calendars.shifts", "ShiftConfig", "calendars.shifts", "One shift."),
    ("[[workflows]]", "WorkflowConfig", "workflows", "A command workflow (saga)."),
    ("write step", "WriteStep", "workflows.steps", "Write a value to a writable tag."),
    ("wait step", "WaitStep", "workflows.steps", "Wait until a tag reads a value."),
    ("confirm step", "ConfirmStep", "workflows.steps", "Wait for the central store's ack."),
]
CENTRAL_SECTIONS: list[tuple[str, str, str, str]] = [
    ("[mqtt]", "IngestMqttConfig", "mqtt", "The ingest's broker connection."),
    ("[postgres]", "PostgresConfig", "postgres", "The central PostgreSQL."),
    ("[partitions]", "PartitionsConfig", "partitions", "Monthly partitions of edge_events."),
    ("[events]", "EventsConfig", "events", "Which event times the ingest accepts."),
    ("[http]", "IngestHttpConfig", "http", "Health and metrics of the ingest."),
]


def _type_of(prop: dict[str, Any]) -> str:
    if "$ref" in prop:
        return "table"
    if "anyOf" in prop:
        kinds = [_type_of(option) for option in prop["anyOf"] if option.get("type") != "null"]
        return " or ".join(dict.fromkeys(kinds))
    if "oneOf" in prop:
        return "table"
    if "enum" in prop:
        return "one of " + ", ".join(json.dumps(value) for value in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    kind = prop.get("type")
    if kind == "string":
        if prop.get("pattern") == DURATION_PATTERN:
            return "duration"
        if prop.get("pattern") == SIZE_PATTERN:
            return "size"
        if prop.get("format") == "path":
            return "path"
        if prop.get("format") == "password":
            return "secret"
        return "string"
    if kind == "array":
        if "prefixItems" in prop:
            return "[" + ", ".join(_type_of(item) for item in prop["prefixItems"]) + "]"
        items = prop.get("items", {})
        return f"array of {_type_of(items)}" if items else "array"
    if kind == "object":
        return "table"
    if isinstance(kind, str):
        return {"integer": "integer", "number": "number", "boolean": "boolean"}.get(kind, kind)
    return "value"


def _default(prop: dict[str, Any], required: bool) -> str:
    if required:
        return "**required**"
    if "default" not in prop:
        return "-"
    value = prop["default"]
    if value is None:
        return "unset"
    if value in ("", [], {}):
        return "empty"
    return f"`{json.dumps(value)}`"


def _example(prop: dict[str, Any]) -> str:
    examples = prop.get("examples")
    return f" Example: `{json.dumps(examples[0])}`." if examples else ""


def _table(definition: dict[str, Any]) -> list[str]:
    required = set(definition.get("required", []))
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, prop in definition.get("properties", {}).items():
        description = (prop.get("description") or "").replace("|", "\\|").replace("\n", " ")
        rows.append(
            f"| `{key}` | {_type_of(prop)} | {_default(prop, key in required)} | "
            f"{description}{_example(prop)} |"
        )
    return rows


def _sections(schema: dict[str, Any], sections: list[tuple[str, str, str, str]]) -> list[str]:
    out: list[str] = []
    for heading, name, table, intro in sections:
        definition = schema["$defs"][name]
        out += [f"### {heading}", "", f"{intro} (`{table}`)", "", *_table(definition), ""]
    return out


def configuration_markdown() -> str:
    """docs/configuration.md, generated from the config models."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- generated by scripts/gen-docs from the config models; do not edit -->",
        "",
        "The agent reads one TOML file (`edge-agent run -c FILE`); the central ingest reads",
        "another (`edge-agent ingest -c FILE`). `edge-agent check -c FILE` validates either and",
        "prints one line per problem, `path.to.field: reason (line N)`, all of them in the",
        "order of the file's lines, exit code 2. A key in the wrong place names where it goes",
        "(`devices[0].port: unknown key; put the port in url, e.g. 'tcp://192.168.10.11:502'`),",
        "a near-miss value the one it misses (`type: unknown value 'float'; did you mean",
        "'float32'?`). While a part has errors its own cross-field checks cannot run: the",
        "last line names the parts whose checks wait.",
        "`edge-agent schema` prints the JSON Schema (`config/agent.schema.json`).",
        "",
        "Conventions:",
        "",
        '* **duration**: a string with a unit, `ms s m h d w`, combinable: `"500ms"`, `"2s"`,',
        '  `"1h30m"`, `"30d"`. Bare numbers are refused (is `5` seconds or milliseconds?).',
        '* **size**: a string with a unit, `B KB MB GB TB KiB MiB GiB TiB`: `"2GiB"`.',
        "* Names of devices, tags and machines are topic levels: letters, digits, `_ . -`.",
        "* **Types are strict**: a value has the TOML type of its key. Numbers and booleans",
        "  are written without quotes (`unit_id = 1`, `scale = 0.1`, `writable = true`);",
        '  `unit_id = "1"` or `writable = "yes"` is an error, never converted.',
        "* **Environment overrides**: `EDGE_AGENT__SECTION__KEY` overrides a key of a table",
        "  (`EDGE_AGENT__MQTT__URL`, `EDGE_AGENT__GATEWAY__DATA_DIR`); a JSON value replaces a",
        "  whole array (`EDGE_AGENT__DEVICES='[...]'`). A variable is text: for a number or",
        "  boolean key its JSON reading is taken (`EDGE_AGENT__MQTT__SYNC_WINDOW=64`). Problems",
        "  name the variable.",
        "* **Secrets**: `password_file` / `dsn_file` name a file whose content (without the",
        "  final newline) is the secret. A relative path is looked up in",
        "  `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`) when it is set, else next to",
        "  the config file. Giving both `password` and `password_file` is an error.",
        "  A secret file is needed only by the commands that use it: `run` and `ingest` refuse",
        "  to start without it (exit 2); `probe` needs the devices' only; `check` reports a",
        "  missing one as a warning (exit 0), and `status` and `oee --replay` read none.",
        "* Nothing is silently repaired: an unknown key, a missing reference or an out-of-range",
        "  value stops the agent before it starts.",
        "",
        "Cross-field rules checked at load: unique device, machine, calendar and workflow",
        "names, unique tag names per device; Modbus addresses `co:/di:/ir:/hr:` with the whole",
        "value inside 0..65535; `string` needs `length`; co/di tags are `bool`; only co/hr are",
        "writable; machines reference existing `device/tag` names and calendars, counters are",
        "unscaled integer tags; a machine may not share its name with a device that has a",
        "`state` or `oee` tag (their topics would clash); workflows write only `writable` tags,",
        "and templates use declared parameters of a fitting type; OPC UA `security_mode` other",
        "than `None` needs a policy other than `None` and a `server_certificate`; shifts of a",
        "calendar never overlap and breaks lie inside their shift; `mqtt.url` is `mqtt://` or",
        "`mqtts://`; `gateway.id` matches `[A-Za-z0-9_-]{1,64}`.",
        "",
        "## Agent (`agent.toml`)",
        "",
        "See `config/agent.example.toml` for a complete, commented line.",
        "",
        *_sections(agent_schema(), AGENT_SECTIONS),
        "## Central ingest (`central.toml`)",
        "",
        "See `config/central.example.toml`.",
        "",
        *_sections(central_schema(), CENTRAL_SECTIONS),
    ]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    """Write both generated files."""
    (REPO / "config" / "agent.schema.json").write_text(
        json.dumps(agent_schema(), indent=2) + "\n", encoding="utf-8"
    )
    (REPO / "docs" / "configuration.md").write_text(configuration_markdown(), encoding="utf-8")
    print("wrote config/agent.schema.json and docs/configuration.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
