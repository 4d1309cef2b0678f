"""The daemon: sinks first (MQTT, live publisher), then sources (one poller per device),
all as named tasks in one TaskGroup; SIGTERM/SIGINT stop everything in bounded time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from agent import __version__
from agent.http import HttpServer, Response, Route, json_response
from agent.live import LivePublisher
from agent.metrics import AgentMetrics
from agent.oee_live import LiveOee
from agent.pipeline import Pipeline
from agent.poller import DevicePoller
from agent.settings import AgentSettings
from agent.topics import health_topic, live_topic, status_payload, status_topic
from drivers.base import Driver, DriverFault, JsonValue, Reading, load_driver_class
from drivers.config import DeviceConfigBase
from drivers.registry import DRIVERS
from sync.events import Event, dumps, rfc3339
from sync.forwarder import Forwarder
from sync.mqtt import MqttClient, NotConnected, TlsOptions, Will
from sync.outbox import Outbox

log = logging.getLogger("edge_agent.runtime")

SHUTDOWN_GRACE = 5.0  # seconds for the last publishes after the sources stopped


def make_driver_factory(
    config: DeviceConfigBase, *, data_dir: str, shared: dict[str, Any]
) -> Callable[[], Driver]:
    """A factory of fresh driver instances for one device (one per connection)."""
    driver_name = getattr(config, "driver", "")
    cls = load_driver_class(DRIVERS[driver_name].driver)

    def factory() -> Driver:
        return cls(config, data_dir=data_dir, shared=shared)

    return factory


def mqtt_client_for(settings: AgentSettings) -> MqttClient:
    """The agent's MQTT client: Last Will offline, birth online, both retained."""
    mqtt = settings.mqtt
    root = mqtt.topic_root
    tls = (
        TlsOptions(
            ca_file=str(mqtt.ca_file) if mqtt.ca_file else None,
            cert_file=str(mqtt.cert_file) if mqtt.cert_file else None,
            key_file=str(mqtt.key_file) if mqtt.key_file else None,
        )
        if mqtt.tls
        else None
    )
    return MqttClient(
        host=mqtt.host,
        port=mqtt.port,
        client_id=settings.client_id,
        username=mqtt.username,
        password=mqtt.password.get_secret_value() if mqtt.password else None,
        tls=tls,
        keepalive=mqtt.keepalive,
        will=Will(status_topic(root), lambda: status_payload(time.time(), "offline", __version__)),
        birth=Will(status_topic(root), lambda: status_payload(time.time(), "online", __version__)),
        name="uplink",
    )


class Runtime:
    """Everything the daemon runs, for one loaded config."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.outbox: Outbox | None = None
        self.mqtt: MqttClient | None = None
        self.live: LivePublisher | None = None
        self.pipeline: Pipeline | None = None
        self.forwarder: Forwarder | None = None
        self.oee: LiveOee | None = None
        self.pollers: dict[str, DevicePoller] = {}
        self._shared: dict[str, Any] = {}
        self._sources: list[asyncio.Task[None]] = []
        self._sinks: list[asyncio.Task[None]] = []
        self.started = asyncio.Event()
        self.started_at = time.time()
        self.metrics: AgentMetrics | None = None
        self.http: HttpServer | None = None

    def device_states(self) -> dict[str, str]:
        """{device: up|down|open}."""
        return {name: poller.state for name, poller in self.pollers.items()}

    def _poller_for(self, ref: str) -> tuple[DevicePoller, str]:
        device, _, tag = ref.partition("/")
        poller = self.pollers.get(device)
        resolved = self.settings.tag(ref)
        if poller is None or resolved is None:
            raise DriverFault(f"unknown tag {ref!r}")
        return poller, tag

    async def write(self, ref: str, value: JsonValue) -> JsonValue:
        """Write 'device/tag' once (only writable tags, checked again here) and verify it."""
        resolved = self.settings.tag(ref)
        if resolved is None or not resolved[1].writable:
            raise DriverFault(f"{ref} is not a writable tag")
        poller, tag = self._poller_for(ref)
        return await poller.write(tag, value)

    async def read(self, ref: str) -> Reading:
        """Read 'device/tag' now."""
        poller, tag = self._poller_for(ref)
        return await poller.read_tag(tag)

    def status(self) -> dict[str, Any]:
        """The health document plus details, for /status and `edge-agent status`."""
        document = self.health()
        document["version"] = __version__
        document["uptime_s"] = round(time.time() - self.started_at, 1)
        document["gateway"] = self.settings.gateway.id
        document["device_detail"] = {
            name: {
                "state": poller.state,
                "reason": poller.reason,
                "breaker": poller.breaker_state,
                "polls": poller.polls,
                "last_poll_s": round(poller.last_poll_duration, 4),
            }
            for name, poller in self.pollers.items()
        }
        document["uplink_error"] = self.mqtt.last_error if self.mqtt is not None else None
        document["outbox_append_failures"] = self.outbox.append_failures if self.outbox else 0
        document["oee"] = self.oee.machines if self.oee is not None else {}
        return document

    def ready(self) -> bool:
        """Outbox open, and either the uplink is up or events are being buffered."""
        if self.outbox is None or not self.started.is_set():
            return False
        uplink = self.mqtt is not None and self.mqtt.is_connected
        buffering = self.pipeline is not None and not self.pipeline.durable_down
        return uplink or buffering

    def _routes(self, metrics: AgentMetrics) -> dict[str, Route]:
        def healthz() -> Response:
            return json_response({"status": "alive"})

        def readyz() -> Response:
            ready = self.ready()
            return json_response({"ready": ready}, 200 if ready else 503)

        def status() -> Response:
            return json_response(self.status())

        def metrics_page() -> Response:
            return Response(200, metrics.render(), "text/plain; version=0.0.4; charset=utf-8")

        return {"/healthz": healthz, "/readyz": readyz, "/status": status, "/metrics": metrics_page}

    def health(self) -> dict[str, Any]:
        """The R/_agent/health document (design §5)."""
        outbox = self.outbox
        oldest = outbox.oldest_unacked_ts if outbox is not None else None
        now = time.time()
        return {
            "ts": rfc3339(now),
            "stream": outbox.stream if outbox else None,
            "committed_seq": outbox.committed_seq if outbox else 0,
            "acked_seq": outbox.acked_seq if outbox else 0,
            "outbox_events": outbox.events_count if outbox else 0,
            "oldest_unacked_s": None if oldest is None else round(max(0.0, now - oldest), 3),
            "dropped_total": outbox.dropped_total if outbox else 0,
            "devices": self.device_states(),
            "uplink": "up" if self.mqtt is not None and self.mqtt.is_connected else "down",
        }

    async def _durable(self, events: list[Event]) -> None:
        assert self.outbox is not None
        await self.outbox.append(events)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then shut down in order: sources, then sinks."""
        settings = self.settings
        data_dir = settings.gateway.data_dir
        await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
        root = settings.mqtt.topic_root
        buffer = settings.buffer
        async with Outbox(
            data_dir / "outbox.db",
            max_size=buffer.max_size,
            commit_interval=buffer.commit_interval,
            commit_max_events=buffer.commit_max_events,
        ) as outbox:
            self.outbox = outbox
            if outbox.recovered_from:
                log.error(
                    "outbox was corrupt; moved to %s, new stream %s",
                    outbox.recovered_from,
                    outbox.stream,
                )
            await outbox.append([_lifecycle("start", outbox.stream)])
            metrics = AgentMetrics(self)
            self.metrics = metrics
            async with contextlib.AsyncExitStack() as stack:
                if settings.http.enabled:
                    host, _, port = settings.http.listen.rpartition(":")
                    server = HttpServer(
                        host=host.strip("[]"), port=int(port), routes=self._routes(metrics)
                    )
                    try:
                        self.http = await stack.enter_async_context(server)
                    except OSError as exc:
                        # The endpoint is for operators; the data path must run without it.
                        log.error("http: cannot listen on %s: %s", settings.http.listen, exc)
                mqtt = await stack.enter_async_context(mqtt_client_for(settings))
                self.mqtt = mqtt
                await self._run_with(settings, outbox, mqtt, root, stop)
                await mqtt.close(
                    final_publish=(
                        status_topic(root),
                        status_payload(time.time(), "offline", __version__),
                        True,
                    )
                )
        log.info("stopped")

    async def _run_with(
        self,
        settings: AgentSettings,
        outbox: Outbox,
        mqtt: MqttClient,
        root: str,
        stop: asyncio.Event,
    ) -> None:
        live = LivePublisher(mqtt, topic_root=root)
        self.live = live
        pipeline = Pipeline(live=live.offer_events, durable=self._durable)
        self.pipeline = pipeline
        mqtt_settings = settings.mqtt
        forwarder = Forwarder(
            outbox=outbox,
            client=mqtt,
            gateway_id=settings.gateway.id,
            sync_prefix=mqtt_settings.sync_prefix,
            batch_events=mqtt_settings.sync_batch_events,
            window=mqtt_settings.sync_window,
            ack_timeout=mqtt_settings.ack_timeout,
            max_rate=mqtt_settings.sync_max_rate,
            max_bytes=mqtt_settings.sync_max_bytes,
        )
        self.forwarder = forwarder
        for device in settings.devices:
            for tag in device.tag_list():
                pipeline.configure_tag(
                    device.name,
                    tag.name,
                    deadband=tag.deadband,
                    max_interval=tag.max_interval or device.max_interval,
                )
        if settings.machines:
            self.oee = LiveOee(settings, publish=live.offer, emit=pipeline.emit)
            pipeline.add_observer(self.oee.observe)
        async with asyncio.TaskGroup() as group:
            # Sinks first, sources last.
            self._sinks.append(group.create_task(live.run(), name="live-publisher"))
            self._sinks.append(group.create_task(forwarder.run(), name="forwarder"))
            self._sinks.append(group.create_task(self._health_loop(mqtt, root), name="health"))
            self._sinks.append(group.create_task(pipeline.heartbeats(), name="heartbeats"))
            if self.oee is not None:
                self._sinks.append(group.create_task(self.oee.run(), name="oee"))
            for device in settings.devices:
                poller = DevicePoller(
                    config=device,
                    driver_factory=make_driver_factory(
                        device, data_dir=str(settings.gateway.data_dir), shared=self._shared
                    ),
                    submit=pipeline.submit,
                )
                if self.metrics is not None:
                    poller.on_poll = self.metrics.observe_poll
                self.pollers[device.name] = poller
                self._sources.append(group.create_task(poller.run(), name=f"device:{device.name}"))
            self.started.set()
            log.info("running: %d devices, live topics under %s/", len(settings.devices), root)
            await stop.wait()
            log.info("stopping")
            # Sources first: no new readings; their pending appends complete or are cancelled.
            for task in self._sources:
                task.cancel()
            if self._sources:
                await asyncio.wait(self._sources)
            await outbox.append([_lifecycle("stop", outbox.stream)])
            # Bounded time for the last live values and the last acknowledgements.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHUTDOWN_GRACE):
                    await live.drain()
                    if mqtt.is_connected:
                        await outbox.wait_acked(outbox.committed_seq)
            for task in self._sinks:
                task.cancel()

    async def _health_loop(self, mqtt: MqttClient, root: str) -> None:
        while True:
            if mqtt.is_connected:
                with contextlib.suppress(NotConnected):
                    mqtt.publish(health_topic(root), dumps(self.health()), qos=0, retain=True)
            await asyncio.sleep(self.settings.mqtt.health_interval)


def _lifecycle(what: str, stream: str) -> Event:
    return Event(
        time.time(), "agent", value={"event": what, "version": __version__, "stream": stream}
    )


def topic_of(settings: AgentSettings, device: str, tag: str) -> str:
    """R/{device}/{tag} for a loaded config."""
    return live_topic(settings.mqtt.topic_root, device, tag)


async def run_until_signalled(settings: AgentSettings) -> int:
    """`edge-agent run`: SIGTERM/SIGINT stop the runtime; exit code 0."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runtime = Runtime(settings)
    try:
        await runtime.run(stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0
