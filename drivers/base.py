"""The Driver interface every protocol implements, the Reading it produces, its errors."""

from __future__ import annotations

import abc
import importlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

from drivers.config import DeviceConfigBase, TagConfigBase
from drivers.values import JsonValue as JsonValue  # re-exported: the drivers' value type

Quality = Literal["good", "uncertain", "bad"]


class DriverError(Exception):
    """Base of driver errors."""


class DriverUnavailable(DriverError):
    """Transient: the device cannot be reached now (connection refused, timeout, closed)."""


class DriverFault(DriverError):
    """Permanent for this request: the device answered that it cannot do it (bad address,
    wrong type, write refused); retrying the same request will not help."""


class WriteUnverified(DriverError):
    """A write went out but reading it back did not show the written value (or failed)."""

    def __init__(self, message: str, *, read_back: JsonValue = None) -> None:
        super().__init__(message)
        self.read_back = read_back


@dataclass(frozen=True, slots=True)
class Reading:
    """One value of one tag as read: `ts` is the source timestamp (epoch seconds, UTC) when
    the device gave one, else when the read completed; `error` says why quality is not good."""

    tag: str
    value: JsonValue
    quality: Quality
    ts: float
    error: str | None = None


SharedT = TypeVar("SharedT")


class SharedResources:
    """Objects the devices of one runtime share, by kind and key: one Modbus link (and its
    lock) per physical link, one lock per OPC UA certificate pair. Owned by the runtime, so
    that drivers keep no module-level state."""

    def __init__(self) -> None:
        self._items: dict[tuple[type[Any], str], Any] = {}

    def get_or_create(
        self, kind: type[SharedT], key: str, create: Callable[[], SharedT]
    ) -> SharedT:
        """The shared `kind` object for `key`, created by `create()` on first use."""
        item = self._items.get((kind, key))
        if not isinstance(item, kind):
            item = create()
            self._items[(kind, key)] = item
        return item

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True, slots=True)
class DriverContext:
    """What a driver gets from the runtime besides its device's config."""

    data_dir: Path | None = None  # where a driver may keep files (OPC UA client certificates)
    shared: SharedResources = field(default_factory=SharedResources)
    application_uri: str | None = None  # the gateway's OPC UA application URI


class Driver(abc.ABC):
    """One device. Use as ``async with driver:`` (connect/close). A driver instance is one
    connection: after `DriverUnavailable` the owner closes it and makes a new one."""

    def __init__(self, config: DeviceConfigBase, context: DriverContext | None = None) -> None:
        self.config = config
        self.context = context if context is not None else DriverContext()
        self._tag_configs = {tag.name: tag for tag in config.tag_list()}

    def tag_config(self, name: str) -> TagConfigBase:
        """The config of this device's tag `name`; DriverFault when there is none."""
        tag = self._tag_configs.get(name)
        if tag is None:
            raise DriverFault(f"{self.config.name} has no tag {name!r}")
        return tag

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the connection; raise DriverUnavailable or DriverFault."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection; never raises."""

    @abc.abstractmethod
    async def read(self) -> list[Reading]:
        """One poll cycle of the polled tags. Per-tag problems become bad readings; a
        connection problem raises DriverUnavailable."""

    @abc.abstractmethod
    async def read_tag(self, tag: str) -> Reading:
        """Read one tag now (workflows read back and capture previous values)."""

    async def write(self, tag: str, value: JsonValue) -> JsonValue:
        """Write once (never resent), read back, return the read-back value; raise
        DriverFault if refused, WriteUnverified if the read-back differs.

        Only a tag configured ``writable = true`` is written: this is the one place that
        enforces it, whoever asks (a workflow, a commissioning tool, a later uplink).
        """
        if not self.tag_config(tag).writable:
            raise DriverFault(
                f"{self.config.name}/{tag} is not writable: not a writable tag in the config"
            )
        return await self._write(tag, value)

    @abc.abstractmethod
    async def _write(self, tag: str, value: JsonValue) -> JsonValue:
        """`write` for a tag known to be writable."""

    def subscriptions(self) -> AsyncIterator[list[Reading]] | None:
        """Pushed readings (OPC UA monitored items); None for drivers that only poll."""
        return None

    @property
    def polled_tags(self) -> tuple[TagConfigBase, ...]:
        """Tags `read()` covers."""
        return self.config.tag_list()

    @property
    def state_detail(self) -> dict[str, Any]:
        """Driver specifics for health and metrics."""
        return {}


def load_driver_class(path: str) -> type[Driver]:
    """Import ``"module:Class"`` from the registry."""
    module_name, _, class_name = path.partition(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name)
    if not (isinstance(cls, type) and issubclass(cls, Driver)):
        raise TypeError(f"{path} is not a Driver")
    return cls
