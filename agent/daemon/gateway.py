"""The parts of a running gateway, wired from one loaded config: the uplinks (sinks), the
pipeline, OEE, the devices and the workflows. Adding an uplink is one line in `build_sinks`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent import __version__
from agent.daemon.devices import Devices, PollObserver, driver_context
from agent.daemon.pipeline import Durable, Pipeline
from agent.oee.live import LiveOee
from agent.service.mqtt import mqtt_client
from agent.settings.config_file import AgentSettings
from agent.workflows.engine import WorkflowEngine
from sync.events import Event
from sync.mqtt.client import MqttClient, Will
from sync.outbox.store import OnCommit, Outbox
from sync.uplink.forwarder import Forwarder
from sync.uplink.live import LivePublisher
from sync.uplink.sink import Sink
from sync.uplink.topics import status_payload, status_topic

if TYPE_CHECKING:
    from sync.uplink.sparkplug.node import SparkplugNode


def mqtt_client_for(settings: AgentSettings) -> MqttClient:
    """The agent's MQTT client: Last Will offline, birth online, both retained."""
    root = settings.mqtt.topic_root
    return mqtt_client(
        settings.mqtt,
        client_id=settings.client_id,
        name="uplink",
        will=Will(status_topic(root), lambda: status_payload(time.time(), "offline", __version__)),
        birth=Will(status_topic(root), lambda: status_payload(time.time(), "online", __version__)),
    )


def forwarder_for(settings: AgentSettings, outbox: Outbox, mqtt: MqttClient) -> Forwarder:
    """The durable path: the outbox as S/sync batches, deleted on S/ack."""
    keys = settings.mqtt
    return Forwarder(
        outbox=outbox,
        client=mqtt,
        gateway_id=settings.gateway.id,
        sync_prefix=keys.sync_prefix,
        batch_events=keys.sync_batch_events,
        window=keys.sync_window,
        ack_timeout=keys.ack_timeout,
        max_rate=keys.sync_max_rate,
        max_bytes=keys.sync_max_bytes,
        warn_after=keys.ack_warning_after,
    )


# The Sparkplug history's cap (docs/sparkplug.md, "History"): about 100 bytes a change on disk.
HISTORY_MAX_CHANGES = 1_000_000


def sparkplug_node_for(settings: AgentSettings, outbox: Outbox, mqtt: MqttClient) -> SparkplugNode:
    """The Sparkplug B edge node: its own MQTT connection (the [mqtt] keys unless
    [sparkplug.broker] is set), its bdSeq in the data directory (docs/sparkplug.md)."""
    # Imported here, where [sparkplug] is on: the node's modules and protobuf are about 2 MiB
    # of RSS that a gateway without Sparkplug would carry for nothing (docs/performance.md).
    from sync.sparkplug.bdseq import BdSeq
    from sync.sparkplug.codec import datatype_for_kind
    from sync.sparkplug.history import History
    from sync.sparkplug.model import DeviceModel, NodeModel, NodeStatus, TagModel
    from sync.uplink.sparkplug.node import SparkplugNode

    keys = settings.sparkplug
    broker = keys.broker or settings.mqtt
    client_id = (
        keys.broker.client_id if keys.broker else None
    ) or f"{settings.client_id}-sparkplug"
    model = NodeModel(
        group_id=keys.group_id,
        edge_node_id=settings.sparkplug_edge_node_id,
        primary_host_id=keys.primary_host_id,
        version=__version__,
        devices=tuple(
            DeviceModel(
                device.name,
                tuple(
                    TagModel(
                        tag.name, datatype_for_kind(tag.value_kind(), tag_type=tag.value_type())
                    )
                    for tag in device.tag_list()
                ),
            )
            for device in settings.devices
        ),
        machines=tuple(machine.name for machine in settings.machines),
    )
    return SparkplugNode(
        model=model,
        connect=lambda will: mqtt_client(broker, client_id=client_id, name="sparkplug", will=will),
        bdseq=BdSeq(settings.gateway.data_dir),
        status=lambda: NodeStatus(outbox.events_count, mqtt.is_connected),
        history=History(settings.gateway.data_dir, max_rows=HISTORY_MAX_CHANGES),
        keepalive=broker.keepalive,
    )


def build_sinks(
    settings: AgentSettings,
    outbox: Outbox,
    mqtt: MqttClient,
    live: LivePublisher,
    sparkplug: SparkplugNode | None,
) -> tuple[Sink, ...]:
    """Every uplink, in the order they start (all before the first device, all after it stops)."""
    sinks: list[Sink] = [live]  # R/{device}/{tag}, newest value per topic
    if settings.mqtt.sync_enabled:
        sinks.append(forwarder_for(settings, outbox, mqtt))  # S/sync to the central store
    if sparkplug is not None:
        sinks.append(sparkplug)  # spBv1.0/{group}/...
    return tuple(sinks)


class RecordsOnly:
    """The outbox for live-only mode: every event but samples (records of their own, OEE and
    workflow audits, stay in the outbox, capped by buffer.max_size, and go to the central
    store if sync is enabled later; docs/delivery.md, "Live only")."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox

    def submit(self, events: Sequence[Event], on_commit: OnCommit) -> None:
        """Queue the records among `events`; with none, `on_commit(None)` at once."""
        records = [event for event in events if event.kind != "sample"]
        if records:
            self._outbox.submit(records, on_commit)
        else:
            on_commit(None)

    async def room(self) -> None:
        """Wait while the outbox's commit queue is full."""
        await self._outbox.room()


def durable_for(settings: AgentSettings, outbox: Outbox) -> Durable:
    """What the pipeline commits: every event, or in live-only mode every event but samples."""
    return outbox if settings.mqtt.sync_enabled else RecordsOnly(outbox)


@dataclass(frozen=True, slots=True)
class Gateway:
    """What runs for one loaded config while the daemon runs."""

    outbox: Outbox
    mqtt: MqttClient
    sinks: tuple[Sink, ...]
    pipeline: Pipeline
    oee: LiveOee
    devices: Devices
    workflows: WorkflowEngine


def build_gateway(
    settings: AgentSettings,
    *,
    outbox: Outbox,
    mqtt: MqttClient,
    group: asyncio.TaskGroup,
    on_poll: PollObserver | None = None,
) -> Gateway:
    """Wire the parts; nothing runs until the caller starts their tasks."""
    live = LivePublisher(mqtt, topic_root=settings.mqtt.topic_root)
    sparkplug = sparkplug_node_for(settings, outbox, mqtt) if settings.sparkplug.enabled else None
    sinks = build_sinks(settings, outbox, mqtt, live, sparkplug)
    pipeline = Pipeline(sinks=sinks, durable=durable_for(settings, outbox), live=(live,))
    configure_tags(pipeline, settings)
    oee = LiveOee(
        settings,
        publish=live.offer,
        emit=pipeline.emit,
        report=sparkplug.offer_oee if sparkplug is not None else None,
    )
    pipeline.add_observer(oee.observe)
    devices = Devices(
        group=group, context=driver_context(settings), submit=pipeline.submit, on_poll=on_poll
    )
    workflows = WorkflowEngine(settings, outbox=outbox, mqtt=mqtt, devices=devices)
    pipeline.add_observer(workflows.observe)
    if sparkplug is not None:
        sparkplug.reports_to(pipeline.emit)  # a gap of its history: outbox, central, live
        if settings.sparkplug.commands == "writable":  # DCMD writes: one guarded write each
            sparkplug.writes_to(
                lambda ref, value: workflows.single_write(ref, value, origin="sparkplug DCMD")
            )
    return Gateway(outbox, mqtt, sinks, pipeline, oee, devices, workflows)


def configure_tags(
    pipeline: Pipeline, settings: AgentSettings, only: set[str] | None = None
) -> None:
    """(Re-)register the filter of every tag of the config's devices (or of `only` those)."""
    for device in settings.devices:
        if only is not None and device.name not in only:
            continue
        for tag in device.tag_list():
            pipeline.configure_tag(
                device.name,
                tag.name,
                deadband=tag.deadband,
                max_interval=tag.max_interval or device.max_interval,
                published=tag.published_value,
            )
