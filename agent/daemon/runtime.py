"""The daemon: sinks first (MQTT, live publisher), then sources (one poller per device),
all as named tasks in one TaskGroup; SIGTERM/SIGINT stop everything in bounded time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent import __version__
from agent.daemon.metrics import AgentMetrics
from agent.daemon.pipeline import Pipeline
from agent.daemon.poller import DevicePoller
from agent.oee.live import LiveOee
from agent.service.http import HttpServer, Response, Route, json_response
from agent.service.sdnotify import SdNotifier
from agent.service.tasks import cancel_and_wait
from agent.service.watchdog import liveness_problems, status_line, watchdog_loop
from agent.settings.config_file import AgentSettings
from agent.settings.loader import ConfigError, load_agent_settings
from agent.workflows.engine import WorkflowEngine, attach_workflows
from drivers.base import Driver, DriverContext, DriverFault, JsonValue, Reading, SharedResources
from drivers.config import DeviceConfigBase
from drivers.registry import driver_class
from sync.events import Event, dumps, rfc3339
from sync.mqtt.client import MqttClient, NotConnected, TlsOptions, Will
from sync.outbox.store import Outbox
from sync.uplink.forwarder import Forwarder
from sync.uplink.live import LivePublisher
from sync.uplink.topics import health_topic, live_topic, status_payload, status_topic

log = logging.getLogger("edge_agent.runtime")

SHUTDOWN_GRACE = 5.0  # seconds for the last publishes after the sources stopped
SLOW_SHUTDOWN_REPORT = 15.0  # seconds into a stop before the pending tasks are logged


def driver_context(settings: AgentSettings) -> DriverContext:
    """What every driver of this gateway gets: its data directory, one set of shared
    resources (links, locks) for all its devices, the OPC UA application URI."""
    return DriverContext(
        data_dir=settings.gateway.data_dir,
        shared=SharedResources(),
        application_uri=f"urn:{settings.gateway.id}:edge-agent",
    )


def make_driver_factory(config: DeviceConfigBase, context: DriverContext) -> Callable[[], Driver]:
    """A factory of fresh driver instances for one device (one per connection)."""
    cls = driver_class(config)
    return lambda: cls(config, context)


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

    def __init__(
        self,
        settings: AgentSettings,
        *,
        config_path: Path | None = None,
        notifier: SdNotifier | None = None,
    ) -> None:
        self.settings = settings
        # systemd notifications (READY/STATUS/WATCHDOG/STOPPING); no-ops outside systemd.
        self.notifier = notifier if notifier is not None else SdNotifier()
        self.outbox: Outbox | None = None
        self.mqtt: MqttClient | None = None
        self.live: LivePublisher | None = None
        self.pipeline: Pipeline | None = None
        self.forwarder: Forwarder | None = None
        self.oee: LiveOee | None = None
        self.pollers: dict[str, DevicePoller] = {}
        self.workflows: WorkflowEngine | None = None
        self._driver_context = driver_context(settings)
        self._sources: dict[str, asyncio.Task[None]] = {}
        self._sinks: list[asyncio.Task[None]] = []
        self._group: asyncio.TaskGroup | None = None
        self._reload_requested = asyncio.Event()
        self._reload_listeners: list[Callable[[AgentSettings], Awaitable[None]]] = []
        self.config_path = config_path
        self.restart_settings: AgentSettings | None = None
        self.reloads = 0
        self.reloads_failed = 0
        self.started = asyncio.Event()
        self.started_at = time.time()
        self.metrics: AgentMetrics | None = None
        self.http: HttpServer | None = None

    def liveness_problems(self) -> list[str]:
        """Dead tasks and silent pollers; the systemd watchdog is fed only while empty."""
        return liveness_problems(self.pollers, [*self._sinks, *self._sources.values()])

    def status_line(self) -> str:
        """One-line summary for systemd's STATUS=."""
        return status_line(self.health())

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

    def workflow_outcomes(self) -> dict[str, int]:
        """Workflow commands by outcome, for /metrics."""
        if self.workflows is None:
            return {}
        stats = self.workflows.stats
        return {
            "accepted": stats.accepted,
            "rejected": stats.rejected,
            "duplicate": stats.duplicates,
            "completed": stats.completed,
            "compensated": stats.compensated,
            "failed": stats.failed,
        }

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
        self._configure_tags(settings.devices)
        self.oee = LiveOee(settings, publish=live.offer, emit=pipeline.emit)
        pipeline.add_observer(self.oee.observe)
        async with asyncio.TaskGroup() as group:
            self._group = group
            # Sinks first, sources last.
            self._sinks.append(group.create_task(live.run(), name="live-publisher"))
            self._sinks.append(group.create_task(forwarder.run(), name="forwarder"))
            self._sinks.append(group.create_task(self._health_loop(mqtt, root), name="health"))
            self._sinks.append(group.create_task(pipeline.heartbeats(), name="heartbeats"))
            self._sinks.append(group.create_task(self.oee.run(), name="oee"))
            self._sinks.append(group.create_task(self._reloader(stop), name="reloader"))
            for device in settings.devices:
                self._start_poller(device)
            # Sagas act on the devices: cancelled first, with the sources.
            self.workflows = attach_workflows(self)
            self.add_reload_listener(self.workflows.reconfigure)
            self._sources["[workflows]"] = group.create_task(self.workflows.run(), name="workflows")
            self.started.set()
            log.info("running: %d devices, live topics under %s/", len(settings.devices), root)
            # Ready once the outbox is open and every task runs; devices connect on their own.
            self.notifier.ready(status=self.status_line())
            watchdog: asyncio.Task[None] | None = None
            if self.notifier.enabled:
                watchdog = group.create_task(
                    watchdog_loop(
                        self.notifier,
                        lambda: [] if stop.is_set() else self.liveness_problems(),
                        self.notifier.watchdog_interval,
                        status=self.status_line,
                    ),
                    name="watchdog",
                )
            await stop.wait()
            log.info("stopping")
            if watchdog is not None:
                watchdog.cancel()
            if self.restart_settings is None:
                self.notifier.stopping(status="stopping: draining live values and acks")
            else:
                # In-process restart after a reload: one last ping covers the drain; the next
                # Runtime's READY=1 ends the reload.
                self.notifier.watchdog(status="reloading: restarting inside the process")
            # Sources first: no new readings; their pending appends complete or are cancelled.
            await cancel_and_wait(self._sources.values())
            await outbox.append([_lifecycle("stop", outbox.stream)])
            # Bounded time for the last live values and the last acknowledgements.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHUTDOWN_GRACE):
                    await live.drain()
                    if mqtt.is_connected:
                        await outbox.wait_acked(outbox.committed_seq)
            for task in self._sinks:
                task.cancel()

    def _configure_tags(self, devices: tuple[DeviceConfigBase, ...]) -> None:
        assert self.pipeline is not None
        for device in devices:
            for tag in device.tag_list():
                self.pipeline.configure_tag(
                    device.name,
                    tag.name,
                    deadband=tag.deadband,
                    max_interval=tag.max_interval or device.max_interval,
                )

    def _start_poller(self, device: DeviceConfigBase) -> None:
        assert self._group is not None
        assert self.pipeline is not None
        poller = DevicePoller(
            config=device,
            driver_factory=make_driver_factory(device, self._driver_context),
            submit=self.pipeline.submit,
        )
        if self.metrics is not None:
            poller.on_poll = self.metrics.observe_poll
        self.pollers[device.name] = poller
        self._sources[device.name] = self._group.create_task(
            poller.run(), name=f"device:{device.name}"
        )

    async def _stop_poller(self, name: str) -> None:
        task = self._sources.pop(name, None)
        self.pollers.pop(name, None)
        if task is not None:
            await cancel_and_wait([task])

    # -- reload (SIGHUP) -----------------------------------------------------------------------

    def request_reload(self) -> None:
        """Re-read the config file soon (SIGHUP)."""
        self._reload_requested.set()

    async def _reloader(self, stop: asyncio.Event) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            self.notifier.reloading(status="reloading the configuration")
            try:
                if self.config_path is None:
                    log.warning("reload: no config file to re-read")
                    continue
                try:
                    new = await asyncio.to_thread(load_agent_settings, self.config_path)
                except ConfigError as exc:
                    log.error(
                        "reload: %s is invalid, keeping the running config: %s",
                        self.config_path,
                        "; ".join(exc.problems),
                    )
                    self.reloads_failed += 1
                    continue
                if _needs_restart(self.settings, new):
                    log.info(
                        "reload: [gateway], [mqtt], [buffer] or [http] changed: "
                        "restarting inside the process"
                    )
                    self.restart_settings = new
                    stop.set()
                    return
                await self.apply(new)
            finally:
                # systemd waits for READY=1 after RELOADING=1; after an in-process restart
                # the next Runtime sends it once it runs.
                if self.restart_settings is None:
                    self.notifier.ready(status=self.status_line())

    async def apply(self, new: AgentSettings) -> None:
        """Apply device, tag, machine, calendar and workflow changes without a restart."""
        old = self.settings
        old_devices = {device.name: device for device in old.devices}
        new_devices = {device.name: device for device in new.devices}
        changed = [
            name
            for name in old_devices
            if name not in new_devices or new_devices[name] != old_devices[name]
        ]
        for name in changed:
            await self._stop_poller(name)
            assert self.pipeline is not None
            self.pipeline.forget_device(name)
            if name not in new_devices and self.live is not None:
                for tag in old_devices[name].tag_list():
                    self.live.clear(live_topic(new.mqtt.topic_root, name, tag.name))
        self.settings = new
        self._configure_tags(
            tuple(d for d in new.devices if d.name not in old_devices or d.name in changed)
        )
        for name, device in new_devices.items():
            if name not in self._sources:
                self._start_poller(device)
        if self.oee is not None:
            self.oee.reconfigure(new)
        for listener in list(self._reload_listeners):
            await listener(new)
        self.reloads += 1
        added = [name for name in new_devices if name not in old_devices]
        removed = [name for name in old_devices if name not in new_devices]
        log.info(
            "reload: applied (%d devices: %d added, %d removed, %d changed)",
            len(new_devices),
            len(added),
            len(removed),
            len([n for n in changed if n in new_devices]),
        )

    def add_reload_listener(self, listener: Callable[[AgentSettings], Awaitable[None]]) -> None:
        """Call `listener(new_settings)` after a reload was applied (workflows)."""
        self._reload_listeners.append(listener)

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


def _needs_restart(old: AgentSettings, new: AgentSettings) -> bool:
    return (old.gateway, old.mqtt, old.buffer, old.http) != (
        new.gateway,
        new.mqtt,
        new.buffer,
        new.http,
    )


def awaiting(coro: object) -> list[str]:
    """`file:line function` of each coroutine in an await chain, outermost first."""
    frames: list[str] = []
    while coro is not None and len(frames) < 50:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            code = frame.f_code
            frames.append(f"{Path(code.co_filename).name}:{frame.f_lineno} {code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return frames


async def report_slow_shutdown(stop: asyncio.Event, after: float) -> None:
    """Log every pending task's stack once if shutdown takes longer than `after` seconds."""
    # A hung stop is otherwise invisible (the loop idles, systemd kills us after
    # TimeoutStopSec): name what it is waiting for so that the log explains the SIGKILL.
    await stop.wait()
    await asyncio.sleep(after)
    me = asyncio.current_task()
    lines = []
    for task in sorted(asyncio.all_tasks(), key=lambda t: t.get_name()):
        if task is me or task.done():
            continue
        lines.append(f"  {task.get_name()}: {' > '.join(awaiting(task.get_coro())) or '?'}")
    log.warning(
        "shutdown has taken more than %.0f s; still waiting on:\n%s", after, "\n".join(lines)
    )


async def run_until_signalled(settings: AgentSettings, config_path: Path | None = None) -> int:
    """`edge-agent run`: SIGTERM/SIGINT stop, SIGHUP reloads; exit code 0."""
    loop = asyncio.get_running_loop()
    # One notifier for the process: READY/RELOADING/STOPPING span in-process restarts.
    notifier = SdNotifier(unset_environment=True)
    while True:
        stop = asyncio.Event()
        runtime = Runtime(settings, config_path=config_path, notifier=notifier)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, runtime.request_reload)
        reporter = asyncio.create_task(
            report_slow_shutdown(stop, SLOW_SHUTDOWN_REPORT), name="slow-shutdown-report"
        )
        try:
            await runtime.run(stop)
        finally:
            reporter.cancel()
            await asyncio.wait([reporter])
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
        if runtime.restart_settings is None:
            return 0
        settings = runtime.restart_settings
