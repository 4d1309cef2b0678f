"""The devices of a running daemon: one poller task per device, started and stopped by name,
and access to single tags by ``device/tag`` (the workflows' read/write protocol)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from agent.daemon.poller import DevicePoller, Submit
from agent.service.tasks import cancel_and_wait
from agent.settings.config_file import AgentSettings
from drivers.base import Driver, DriverContext, DriverFault, JsonValue, Reading, SharedResources
from drivers.config import DeviceConfigBase
from drivers.registry import driver_class

PollObserver = Callable[[str, float], None]


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


class Devices:
    """The pollers of one runtime, as tasks of its TaskGroup."""

    def __init__(
        self,
        *,
        group: asyncio.TaskGroup,
        context: DriverContext,
        submit: Submit,
        on_poll: PollObserver | None = None,
    ) -> None:
        self._group = group
        self._context = context
        self._submit = submit
        self._on_poll = on_poll
        self.pollers: dict[str, DevicePoller] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, device: DeviceConfigBase) -> None:
        """Start polling a device (its task is named ``device:{name}``)."""
        poller = DevicePoller(
            config=device,
            driver_factory=make_driver_factory(device, self._context),
            submit=self._submit,
        )
        poller.on_poll = self._on_poll
        self.pollers[device.name] = poller
        self._tasks[device.name] = self._group.create_task(
            poller.run(), name=f"device:{device.name}"
        )

    async def stop(self, name: str) -> None:
        """Stop polling a device and wait until its connection is closed."""
        task = self._tasks.pop(name, None)
        self.pollers.pop(name, None)
        if task is not None:
            await cancel_and_wait([task])

    async def stop_all(self) -> None:
        """Stop every device (shutdown: the sources stop first)."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        await cancel_and_wait(tasks)

    def running(self, name: str) -> bool:
        """Whether a device has a poller task."""
        return name in self._tasks

    @property
    def tasks(self) -> Iterable[asyncio.Task[None]]:
        """The pollers' tasks (the watchdog checks that none ended)."""
        return self._tasks.values()

    def states(self) -> dict[str, str]:
        """{device: up|down|open}."""
        return {name: poller.state for name, poller in self.pollers.items()}

    # -- the workflows' read/write protocol ----------------------------------------------------

    async def read(self, ref: str) -> Reading:
        """Read 'device/tag' now through the device's connection."""
        poller, tag = self._resolve(ref, f"unknown tag {ref!r}")
        return await poller.read_tag(tag)

    async def write(self, ref: str, value: JsonValue) -> JsonValue:
        """Write 'device/tag' once and return the verified read-back (the driver refuses a
        tag that is not writable)."""
        poller, tag = self._resolve(ref, f"{ref} is not a writable tag: no such device or tag")
        return await poller.write(tag, value)

    def _resolve(self, ref: str, unknown: str) -> tuple[DevicePoller, str]:
        device, _, tag = ref.partition("/")
        poller = self.pollers.get(device)
        if poller is None or all(config.name != tag for config in poller.config.tag_list()):
            raise DriverFault(unknown)
        return poller, tag
