"""The Driver interface every protocol implements, the Reading it produces, its errors."""

from __future__ import annotations

import abc
import importlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

from drivers.config import DeviceConfigBase, TagConfigBase

Quality = Literal["good", "uncertain", "bad"]
JsonValue = bool | int | float | str | list[Any] | None


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


ReadingSink = Callable[[list[Reading]], None]


class Driver(abc.ABC):
    """One device. Use as ``async with driver:`` (connect/close). A driver instance is one
    connection: after `DriverUnavailable` the owner closes it and makes a new one."""

    def __init__(
        self,
        config: DeviceConfigBase,
        *,
        data_dir: str | None = None,
        shared: dict[str, Any] | None = None,
    ) -> None:
        # `shared` is owned by the runtime: drivers keep per-link objects there (one lock per
        # physical link shared by the devices on it). No module-level state.
        self.config = config
        self.data_dir = data_dir

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

    @abc.abstractmethod
    async def write(self, tag: str, value: JsonValue) -> JsonValue:
        """Write once (never resent), read back, return the read-back value; raise
        DriverFault if refused, WriteUnverified if the read-back differs."""

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
