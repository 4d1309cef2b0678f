"""The agent's config file as one model (docs/configuration.md): its sections, lookups, and the
checks that span sections.

Structure is checked by pydantic; everything that spans fields (references between sections,
unique names, address ranges) is checked by `problems()` afterwards, so that one run reports
every problem, each as ``path.to.field: reason``. Nothing is ever silently repaired."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from agent.settings.common import HttpConfig, SettingsFile
from agent.settings.gateway import BufferConfig, GatewayConfig, MqttConfig
from agent.settings.machines import CalendarConfig, MachineConfig
from agent.settings.sparkplug import SparkplugConfig
from agent.settings.workflows import (
    ParamSpec,
    StepValue,
    WaitStep,
    WorkflowConfig,
    WriteStep,
    template_fields,
)
from drivers.config import (
    DeviceConfigBase,
    Problem,
    TagConfigBase,
)
from drivers.registry import DeviceConfig


class AgentSettings(SettingsFile):
    """The whole agent config file."""

    model_config = SettingsConfigDict(title="edge-agent configuration")

    gateway: GatewayConfig
    mqtt: MqttConfig
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    sparkplug: SparkplugConfig = Field(default_factory=SparkplugConfig)
    devices: tuple[DeviceConfig, ...] = Field(default=(), description="PLCs and other sources.")
    machines: tuple[MachineConfig, ...] = Field(default=(), description="OEE per machine.")
    calendars: tuple[CalendarConfig, ...] = Field(default=(), description="Shift plans.")
    workflows: tuple[WorkflowConfig, ...] = Field(default=(), description="Command sagas.")

    CROSS_SECTION_CHECKS: ClassVar[str] = "the names and references between sections"

    @classmethod
    def completed(cls, data: Any) -> Any:
        """topic_root defaults to {site}/{area}/{line}: filled in by the loader before
        validation, so that the loaded model is complete and immutable. (Not a "before"
        validator: pydantic validates what one returns as Python data, where strict mode
        refuses an array for a tuple.)"""
        if isinstance(data, dict):
            gateway, mqtt = data.get("gateway"), data.get("mqtt")
            if isinstance(gateway, dict) and isinstance(mqtt, dict) and not mqtt.get("topic_root"):
                parts = [gateway.get(key) for key in ("site", "area", "line")]
                if all(isinstance(part, str) and part for part in parts):
                    data = {**data, "mqtt": {**mqtt, "topic_root": "/".join(parts)}}  # type: ignore[arg-type]
        return data

    # -- lookups ---------------------------------------------------------------------------

    def device(self, name: str) -> DeviceConfigBase | None:
        """The device of that name."""
        return next((device for device in self.devices if device.name == name), None)

    def tag(self, ref: str) -> tuple[DeviceConfigBase, TagConfigBase] | None:
        """Resolve 'device/tag'."""
        device_name, _, tag_name = ref.partition("/")
        device = self.device(device_name)
        if device is None:
            return None
        tag = next((tag for tag in device.tag_list() if tag.name == tag_name), None)
        return None if tag is None else (device, tag)

    @property
    def client_id(self) -> str:
        """MQTT client id of the agent."""
        return self.mqtt.client_id or f"edge-agent-{self.gateway.id}"

    @property
    def sparkplug_edge_node_id(self) -> str:
        """The Sparkplug edge node id: sparkplug.edge_node_id, else gateway.id."""
        return self.sparkplug.edge_node_id or self.gateway.id

    @property
    def sync_topic_base(self) -> str:
        """S = {sync_prefix}/{gateway.id}."""
        return f"{self.mqtt.sync_prefix}/{self.gateway.id}"

    # -- cross-field checks ------------------------------------------------------------------

    def problems(self) -> Iterator[Problem]:
        """Every cross-field problem, with locations from the file's root."""
        for loc, reason in self.mqtt.problems():
            yield (("mqtt", *loc), reason)
        for loc, reason in self.http.problems():
            yield (("http", *loc), reason)
        for loc, reason in self.sparkplug.problems():
            yield (("sparkplug", *loc), reason)
        if self.sparkplug.enabled:
            # Devices and machines are both Sparkplug devices of this edge node.
            devices = {device.name for device in self.devices}
            for index, machine in enumerate(self.machines):
                if machine.name in devices:
                    yield (
                        ("machines", index, "name"),
                        f"machine {machine.name!r} has a device's name; with [sparkplug] "
                        "enabled both are Sparkplug devices, whose ids must differ",
                    )
        yield from _unique("devices", [device.name for device in self.devices], "device")
        yield from _unique("machines", [machine.name for machine in self.machines], "machine")
        yield from _unique("calendars", [cal.name for cal in self.calendars], "calendar")
        yield from _unique("workflows", [flow.name for flow in self.workflows], "workflow")
        for index, device in enumerate(self.devices):
            for loc, reason in device.problems():
                yield (("devices", index, *loc), reason)
        for index, calendar in enumerate(self.calendars):
            for loc, reason in calendar.problems():
                yield (("calendars", index, *loc), reason)
        for index, machine in enumerate(self.machines):
            yield from self._machine_problems(index, machine)
        for index, workflow in enumerate(self.workflows):
            yield from self._workflow_problems(index, workflow)

    def warnings(self) -> Iterator[Problem]:
        """What is allowed but unsafe (cleartext passwords), with locations from the root."""
        for loc, reason in self.mqtt.warnings():
            yield (("mqtt", *loc), reason)
        for loc, reason in self.sparkplug.warnings():
            yield (("sparkplug", *loc), reason)
        for index, device in enumerate(self.devices):
            for loc, reason in device.warnings():
                yield (("devices", index, *loc), reason)

    def _ref_problem(self, loc: tuple[str | int, ...], ref: str) -> Iterator[Problem]:
        device_name, _, tag_name = ref.partition("/")
        if self.device(device_name) is None:
            yield (loc, f"unknown device {device_name!r} in {ref!r}")
        elif self.tag(ref) is None:
            yield (loc, f"device {device_name!r} has no tag {tag_name!r}")

    def _machine_problems(self, index: int, machine: MachineConfig) -> Iterator[Problem]:
        base: tuple[str | int, ...] = ("machines", index)
        yield from self._ref_problem((*base, "state", "tag"), machine.state.tag)
        state_tag = self.tag(machine.state.tag)
        state_kind = "unknown" if state_tag is None else state_tag[1].value_kind()
        if state_kind == "float":
            yield ((*base, "state", "tag"), "a state code tag must not be a float value")
        seen: dict[Any, str] = {}
        for group in ("running", "planned_stop", "unplanned_stop"):
            for code_index, code in enumerate(getattr(machine.state, group)):
                code_key = (type(code).__name__, code)
                if code_key in seen:
                    yield ((*base, "state", group), f"code {code!r} is also in {seen[code_key]}")
                seen.setdefault(code_key, group)
                # A code of another type than the tag's values never matches a reading: the
                # machine would be 'unknown' (unplanned downtime) all the time.
                wrong = _code_mismatch(code, state_kind, machine.state.tag)
                if wrong:
                    yield ((*base, "state", group, code_index), wrong)
        yield from self._product_problems(base, machine)
        counters: list[tuple[str, str]] = [("total_count", machine.total_count)]
        if machine.reject_count is not None and machine.good_count is not None:
            yield ((*base, "good_count"), "give reject_count or good_count, not both")
        for key in ("reject_count", "good_count"):
            ref = getattr(machine, key)
            if ref is not None:
                counters.append((key, ref))
        for key, ref in counters:
            yield from self._ref_problem((*base, key), ref)
            resolved = self.tag(ref)
            if resolved is not None and resolved[1].value_kind() not in ("int", "unknown"):
                yield (
                    (*base, key),
                    f"{ref} is a {resolved[1].value_kind()} value; a counter must be an "
                    "unscaled integer tag",
                )
        if machine.calendar not in {calendar.name for calendar in self.calendars}:
            yield ((*base, "calendar"), f"unknown calendar {machine.calendar!r}")
        device = self.device(machine.name)
        if device is not None:
            clash = {"state", "oee"} & {tag.name for tag in device.tag_list()}
            if clash:
                yield (
                    (*base, "name"),
                    f"topic clash: machine {machine.name!r} publishes "
                    f"R/{machine.name}/{sorted(clash)[0]}, which device {machine.name!r} "
                    "already uses for a tag; rename the machine or the tag",
                )

    def _product_problems(
        self, base: tuple[str | int, ...], machine: MachineConfig
    ) -> Iterator[Problem]:
        """The product tag, and the keys of ideal_cycle_times against its value type."""
        if machine.product is None:
            if machine.ideal_cycle_times:
                yield (
                    (*base, "ideal_cycle_times"),
                    "ideal cycle times per product need a product tag (product = 'device/tag')",
                )
            return
        yield from self._ref_problem((*base, "product"), machine.product)
        resolved = self.tag(machine.product)
        kind = "unknown" if resolved is None else resolved[1].value_kind()
        if kind == "float":
            yield ((*base, "product"), "a product tag must not be a float value")
            return
        for key in machine.ideal_cycle_times:
            wrong = _product_key_mismatch(key, kind, machine.product)
            if wrong:
                yield ((*base, "ideal_cycle_times", key), wrong)

    def _workflow_problems(self, index: int, workflow: WorkflowConfig) -> Iterator[Problem]:
        base: tuple[str | int, ...] = ("workflows", index)
        declared = set(workflow.params)
        specs = workflow.param_specs
        for step_index, step in enumerate(workflow.steps):
            loc = (*base, "steps", step_index)
            if isinstance(step, WriteStep):
                yield from self._ref_problem((*loc, "write"), step.write)
                resolved = self.tag(step.write)
                if resolved is not None and not resolved[1].writable:
                    yield ((*loc, "write"), f"{step.write} is not writable (writable = true)")
                values = [("value", step.value)]
                if step.compensate_value is not None:
                    values.append(("compensate_value", step.compensate_value))
            elif isinstance(step, WaitStep):
                yield from self._ref_problem((*loc, "wait"), step.wait)
                values = [("value", step.value)]
            else:
                if not self.mqtt.sync_enabled:
                    yield (
                        (*loc, "confirm"),
                        "waits for the central store, which a live-only gateway has none of "
                        "(mqtt.sync_enabled = false)",
                    )
                values = []
            for key, value in values:
                try:
                    names = template_fields(value)
                except ValueError as exc:
                    yield ((*loc, key), f"invalid template {value!r}: {exc}")
                    continue
                for name in names:
                    if name not in declared:
                        yield (
                            (*loc, key),
                            f"template refers to undeclared parameter {name!r}"
                            + (f"; declared: {', '.join(sorted(declared))}" if declared else ""),
                        )
                if isinstance(step, WriteStep) and not any(n not in declared for n in names):
                    resolved = self.tag(step.write)
                    if resolved is not None:
                        kind = _value_kind(value, specs)
                        wanted = resolved[1].value_kind()
                        if not _kind_fits(kind, wanted):
                            yield (
                                (*loc, key),
                                f"a {kind} value cannot be written to {step.write} "
                                f"(a {wanted} tag)",
                            )


def _value_kind(value: StepValue, specs: dict[str, ParamSpec]) -> str:
    """The JSON kind a step value will have once its template is filled."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    names = template_fields(value)
    if len(names) == 1 and value == "{" + names[0] + "}" and names[0] in specs:
        return {"str": "string", "int": "int", "float": "float", "bool": "bool"}[
            specs[names[0]].type
        ]
    return "string"


def _kind_fits(kind: str, wanted: str) -> bool:
    if wanted == "unknown" or kind == wanted:
        return True
    return wanted == "float" and kind == "int"


_KIND_NAMES = {"int": "an integer", "string": "a string", "bool": "a bool"}


def _code_mismatch(code: object, kind: str, ref: str) -> str | None:
    """Why a state code can never equal a reading of a `kind` tag (None: it can)."""
    if kind not in _KIND_NAMES:
        return None  # OPC UA tags do not say their type: accept
    found = "bool" if isinstance(code, bool) else "int" if isinstance(code, int) else "string"
    if found == kind:
        return None
    hint = {"int": "an integer like 1", "string": 'text like "RUN"', "bool": "true or false"}
    return (
        f"code {code!r} is {_KIND_NAMES[found]}, but {ref} is {_KIND_NAMES[kind]} tag: "
        f"it never matches; write {hint[kind]}"
    )


def _product_key_mismatch(key: str, kind: str, ref: str) -> str | None:
    """Why a key of ideal_cycle_times can never equal a reading of a `kind` product tag."""
    if kind == "int":
        if not re.fullmatch(r"-?[0-9]+", key):
            return f"product {key!r} is not an integer, but {ref} is an integer tag"
        if str(int(key)) != key:
            return f'product {key!r}: write the integer as "{int(key)}" ({ref} reads numbers)'
    elif kind == "bool" and key not in ("true", "false"):
        return f'product {key!r} is not "true" or "false", but {ref} is a bool tag'
    return None


def _unique(section: str, names: list[str], what: str) -> Iterator[Problem]:
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in seen:
            yield (
                (section, index, "name"),
                f"duplicate {what} name {name!r} ({section}[{seen[name]}])",
            )
        seen.setdefault(name, index)
