"""The daemon: sinks first (MQTT, uplinks), then sources (one poller per device), all as named
tasks in one TaskGroup; SIGTERM/SIGINT stop everything in bounded time, sources first."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent import __version__
from agent.daemon.clock import ClockStepWatch
from agent.daemon.gateway import Gateway, build_gateway, mqtt_client_for
from agent.daemon.health import (
    DeviceDetail,
    HealthDocument,
    StatusDocument,
    health_document,
    liveness_problems,
    status_line,
)
from agent.daemon.metrics import AgentMetrics
from agent.daemon.page import page_document
from agent.daemon.poller import DevicePoller
from agent.daemon.reload import apply_reload, needs_restart
from agent.service.http import (
    HttpServer,
    Response,
    Route,
    guard_for,
    json_response,
    page_routes,
)
from agent.service.sdnotify import SdNotifier
from agent.service.shutdown import report_slow_shutdown
from agent.service.tasks import cancel_and_wait
from agent.service.watchdog import watchdog_loop
from agent.settings.config_file import AgentSettings
from agent.settings.loader import ConfigError, dotted, load_agent_settings
from drivers.base import JsonValue, Reading
from sync.events import Event, dumps
from sync.files import private_dir
from sync.mqtt.client import MqttClient, NotConnected
from sync.outbox.store import Outbox
from sync.uplink.topics import health_topic, status_payload, status_topic

log = logging.getLogger("edge_agent.runtime")

SHUTDOWN_GRACE = 5.0  # seconds for the last publishes after the sources stopped
SLOW_SHUTDOWN_REPORT = 15.0  # seconds into a stop before the pending tasks are logged


@dataclass(slots=True)
class ReloadCounts:
    """SIGHUP reloads, for /metrics."""

    applied: int = 0
    failed: int = 0


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
        self.config_path = config_path
        # systemd notifications (READY/STATUS/WATCHDOG/STOPPING); no-ops outside systemd.
        self.notifier = notifier if notifier is not None else SdNotifier()
        self.started = asyncio.Event()
        self.started_at = time.time()
        # Set by a reload that needs a restart: the next Runtime runs with these settings.
        self.restart_settings: AgentSettings | None = None
        self.reloads = ReloadCounts()
        self._gateway: Gateway | None = None
        self._services: list[asyncio.Task[None]] = []
        self.clock = ClockStepWatch()
        self._workflows_task: asyncio.Task[None] | None = None
        self._reload_requested = asyncio.Event()
        self.http_port: int | None = None  # the HTTP endpoint's bound port while it serves
        self.metrics = AgentMetrics(self)  # reads the fields above (also when it is created)

    # -- what the rest of the program reads ------------------------------------------------

    @property
    def gateway(self) -> Gateway | None:
        """The running parts (None before `run()` opened the outbox and MQTT)."""
        return self._gateway

    @property
    def pollers(self) -> dict[str, DevicePoller]:
        """The device pollers by name (empty before the start)."""
        return self._gateway.devices.pollers if self._gateway is not None else {}

    def device_states(self) -> dict[str, str]:
        """{device: up|down|open}."""
        return {name: poller.state for name, poller in self.pollers.items()}

    async def write(self, ref: str, value: JsonValue) -> JsonValue:
        """Write 'device/tag' once and verify it (writable tags only)."""
        return await self._running().devices.write(ref, value)

    async def read(self, ref: str) -> Reading:
        """Read 'device/tag' now."""
        return await self._running().devices.read(ref)

    def health(self) -> HealthDocument | None:
        """The R/_agent/health document (None before the start)."""
        gateway = self._gateway
        if gateway is None:
            return None
        return health_document(
            gateway.outbox,
            gateway.mqtt,
            gateway.devices.states(),
            now=time.time(),
            sync_enabled=self.settings.mqtt.sync_enabled,
        )

    def status(self) -> StatusDocument | None:
        """The health document plus details, for /status and `edge-agent status`."""
        gateway, health = self._gateway, self.health()
        if gateway is None or health is None:
            return None
        detail: dict[str, DeviceDetail] = {
            name: {
                "state": poller.state,
                "reason": poller.reason,
                "breaker": poller.breaker_state,
                "polls": poller.polls,
                "last_poll_s": round(poller.last_poll_duration, 4),
            }
            for name, poller in gateway.devices.pollers.items()
        }
        return {
            **health,
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 1),
            "gateway": self.settings.gateway.id,
            "device_detail": detail,
            "uplink_error": gateway.mqtt.last_error,
            "sync_problems": self.sync_problems(),
            "outbox_append_failures": gateway.outbox.append_failures,
            "outbox_refusing": gateway.pipeline.durable_error,
            "oee": gateway.oee.machines,
        }

    def sync_problems(self) -> list[str]:
        """Why an uplink does not keep its promise now (e.g. no central acknowledgement)."""
        gateway = self._gateway
        if gateway is None:
            return []
        return [problem for sink in gateway.sinks for problem in sink.problems()]

    def readiness_problems(self) -> list[str]:
        """Why the gateway is not ready (empty: ready): starting, events neither sent nor
        buffered, or an uplink's problem."""
        gateway = self._gateway
        if gateway is None or not self.started.is_set():
            return ["starting"]
        problems = self.sync_problems()
        if gateway.pipeline.durable_down:
            problems.insert(0, f"the outbox refuses events: {gateway.pipeline.durable_error}")
        # The ack, central status and command topics: without them a promise is broken.
        for topic, reason in gateway.mqtt.refused_subscriptions.items():
            problems.append(f"the broker refused the subscription to {topic}: {reason}")
        return problems

    def liveness_problems(self) -> list[str]:
        """Dead tasks and silent pollers; the systemd watchdog is fed only while empty."""
        gateway = self._gateway
        if gateway is None:
            return []
        tasks = [*self._services, *gateway.devices.tasks]
        if self._workflows_task is not None:
            tasks.append(self._workflows_task)
        return liveness_problems(gateway.devices.pollers, tasks)

    def status_line(self) -> str:
        """One-line summary for systemd's STATUS=."""
        health = self.health()
        return status_line(health) if health is not None else "starting"

    def _running(self) -> Gateway:
        if self._gateway is None:
            raise RuntimeError("the runtime is not running")
        return self._gateway

    def _routes(self) -> dict[str, Route]:
        def healthz() -> Response:
            return json_response({"status": "alive"})

        def readyz() -> Response:
            problems = self.readiness_problems()
            return json_response(
                {"ready": not problems, "problems": problems}, 503 if problems else 200
            )

        def status() -> Response:
            document = self.status()
            if document is None:
                return json_response({"status": "starting"}, 503)
            return json_response(document)

        def metrics_page() -> Response:
            return Response(200, self.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")

        return {
            "/healthz": healthz,
            "/readyz": readyz,
            "/status": status,
            "/metrics": metrics_page,
            **page_routes("index.html", "page.css", "common.js", "page.js"),
        }

    async def _page(self, query: Mapping[str, str]) -> Response:
        """/api/page: the status page's document; ?filter=TEXT keeps the matching tags."""
        document = await page_document(self, tag_filter=query.get("filter", ""))
        if document is None:
            return json_response({"status": "starting"}, 503)
        return Response(200, dumps(document))

    # -- running -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then shut down in order: sources, then sinks."""
        settings = self.settings
        _log_warnings(settings)
        data_dir = settings.gateway.data_dir
        # Created 0700 whatever the umask; the files in it are 0600 (docs/install.md).
        await asyncio.to_thread(private_dir, data_dir)
        buffer = settings.buffer
        async with Outbox(
            data_dir / "outbox.db",
            max_size=buffer.max_size,
            commit_interval=buffer.commit_interval,
            commit_max_events=buffer.commit_max_events,
        ) as outbox:
            if outbox.recovered_from:
                log.error(
                    "outbox was corrupt; moved to %s, new stream %s",
                    outbox.recovered_from,
                    outbox.stream,
                )
            await outbox.append([_lifecycle("start", outbox.stream)])
            async with contextlib.AsyncExitStack() as stack:
                await self._serve_http(stack)
                mqtt = await stack.enter_async_context(mqtt_client_for(settings))
                async with asyncio.TaskGroup() as group:
                    gateway = build_gateway(
                        settings,
                        outbox=outbox,
                        mqtt=mqtt,
                        group=group,
                        on_poll=self.metrics.observe_poll,
                    )
                    self._gateway = gateway
                    await self._serve(gateway, group, stop)
                await mqtt.close(
                    final_publish=(
                        status_topic(settings.mqtt.topic_root),
                        status_payload(time.time(), "offline", __version__),
                        True,
                    )
                )
        log.info("stopped")

    async def _serve_http(self, stack: contextlib.AsyncExitStack) -> None:
        http = self.settings.http
        if not http.enabled:
            return
        token = None if http.token is None else http.token.get_secret_value()
        server = HttpServer(
            host=http.host,
            port=http.port,
            routes=self._routes(),
            query_routes={"/api/page": self._page},
            guard=guard_for(token, metrics_open=http.metrics_open),
        )
        try:
            await stack.enter_async_context(server)
            self.http_port = server.port
            stack.callback(setattr, self, "http_port", None)
        except OSError as exc:
            # The endpoint is for operators; the data path must run without it.
            log.error("http: cannot listen on %s: %s", http.listen, exc)

    async def _serve(self, gateway: Gateway, group: asyncio.TaskGroup, stop: asyncio.Event) -> None:
        settings = self.settings
        root = settings.mqtt.topic_root
        # Sinks first, sources last.
        for sink in gateway.sinks:
            self._services.append(group.create_task(sink.run(), name=sink.name))
        for name, coroutine in (
            ("health", self._health_loop(gateway.mqtt, root)),
            ("heartbeats", gateway.pipeline.heartbeats()),
            ("oee", gateway.oee.run()),
            ("reloader", self._reloader(stop)),
            ("clock", self.clock.run(gateway.pipeline.emit)),
        ):
            self._services.append(group.create_task(coroutine, name=name))
        for device in settings.devices:
            gateway.devices.start(device)
        # Sagas act on the devices: cancelled first, with the sources.
        self._workflows_task = group.create_task(gateway.workflows.run(), name="workflows")
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
        await self._shut_down(gateway)

    async def _shut_down(self, gateway: Gateway) -> None:
        if self.restart_settings is None:
            self.notifier.stopping(status="stopping: draining live values and acks")
        else:
            # In-process restart after a reload: one last ping covers the drain; the next
            # Runtime's READY=1 ends the reload.
            self.notifier.watchdog(status="reloading: restarting inside the process")
        # Sources first: no new readings; their pending appends complete or are cancelled.
        if self._workflows_task is not None:
            await cancel_and_wait([self._workflows_task])
        await gateway.devices.stop_all()
        outbox = gateway.outbox
        # Committed after every event the sources queued, which reach the sinks first.
        await outbox.append([_lifecycle("stop", outbox.stream)])
        await gateway.pipeline.settle()
        # Bounded time for the last live values and the last acknowledgements.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHUTDOWN_GRACE):
                for sink in gateway.sinks:
                    await sink.drain()
        for task in self._services:
            task.cancel()

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
                new = await self._load_for_reload()
                if new is None:
                    continue
                if needs_restart(self.settings, new):
                    log.info(
                        "reload: [gateway], [mqtt], [buffer], [http] or [sparkplug] changed "
                        "(or, with Sparkplug on, the devices or machines): "
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

    async def _load_for_reload(self) -> AgentSettings | None:
        if self.config_path is None:
            log.warning("reload: no config file to re-read")
            return None
        try:
            return await asyncio.to_thread(load_agent_settings, self.config_path)
        except ConfigError as exc:
            log.error(
                "reload: %s is invalid, keeping the running config: %s",
                self.config_path,
                "; ".join(exc.problems),
            )
            self.reloads.failed += 1
            return None

    async def apply(self, new: AgentSettings) -> None:
        """Apply device, tag, machine, calendar and workflow changes without a restart."""
        old, self.settings = self.settings, new
        _log_warnings(new)  # a reloaded file is read anew: say again what is unsafe in it
        await apply_reload(self._running(), old, new)
        self.reloads.applied += 1

    async def _health_loop(self, mqtt: MqttClient, root: str) -> None:
        while True:
            health = self.health()
            if mqtt.is_connected and health is not None:
                with contextlib.suppress(NotConnected):
                    mqtt.publish(health_topic(root), dumps(health), qos=0, retain=True)
            await asyncio.sleep(self.settings.mqtt.health_interval)


def _log_warnings(settings: AgentSettings) -> None:
    """What `edge-agent check` warns of (a cleartext password), once per start or reload."""
    for loc, reason in settings.warnings():
        log.warning("config: %s: %s", dotted(loc), reason)


def _lifecycle(what: str, stream: str) -> Event:
    return Event(
        time.time(), "agent", value={"event": what, "version": __version__, "stream": stream}
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
