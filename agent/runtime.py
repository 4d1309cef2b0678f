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
from agent.live import LivePublisher
from agent.oee_live import LiveOee
from agent.pipeline import Pipeline
from agent.poller import DevicePoller
from agent.settings import AgentSettings
from agent.topics import live_topic, status_payload, status_topic
from drivers.base import Driver, load_driver_class
from drivers.config import DeviceConfigBase
from drivers.registry import DRIVERS
from sync.mqtt import MqttClient, TlsOptions, Will

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
        self.mqtt: MqttClient | None = None
        self.live: LivePublisher | None = None
        self.pipeline: Pipeline | None = None
        self.oee: LiveOee | None = None
        self.pollers: dict[str, DevicePoller] = {}
        self._shared: dict[str, Any] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.started = asyncio.Event()

    def device_states(self) -> dict[str, str]:
        """{device: up|down|open}."""
        return {name: poller.state for name, poller in self.pollers.items()}

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then shut down in order: sources, then sinks."""
        settings = self.settings
        settings.gateway.data_dir.mkdir(parents=True, exist_ok=True)
        root = settings.mqtt.topic_root
        async with mqtt_client_for(settings) as mqtt:
            self.mqtt = mqtt
            live = LivePublisher(mqtt, topic_root=root)
            self.live = live
            pipeline = Pipeline(live=live.offer_events)
            self.pipeline = pipeline
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
                self._spawn(group, live.run(), "live-publisher")
                self._spawn(group, pipeline.heartbeats(), "heartbeats")
                if self.oee is not None:
                    self._spawn(group, self.oee.run(), "oee")
                for device in settings.devices:
                    poller = DevicePoller(
                        config=device,
                        driver_factory=make_driver_factory(
                            device, data_dir=str(settings.gateway.data_dir), shared=self._shared
                        ),
                        submit=pipeline.submit,
                    )
                    self.pollers[device.name] = poller
                    self._spawn(group, poller.run(), f"device:{device.name}")
                self.started.set()
                log.info("running: %d devices, live topics under %s/", len(settings.devices), root)
                await stop.wait()
                log.info("stopping")
                for task in reversed(self._tasks):
                    task.cancel()
            # Sources are stopped: give the last values a moment to reach the broker.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHUTDOWN_GRACE):
                    await live.drain()
            await mqtt.close(
                final_publish=(
                    status_topic(root),
                    status_payload(time.time(), "offline", __version__),
                    True,
                )
            )
        log.info("stopped")

    def _spawn(self, group: asyncio.TaskGroup, coro: Any, name: str) -> None:
        self._tasks.append(group.create_task(coro, name=name))


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
