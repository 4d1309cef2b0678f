"""The one explicit driver registry: driver name -> config model (+ driver class, lazily).

Adding a protocol: write ``drivers/<name>.py`` (config model and Driver class) and add one
line to ``DRIVERS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import Discriminator, Tag

from drivers.base import Driver, load_driver_class
from drivers.config import DeviceConfigBase
from drivers.modbus.config import ModbusDeviceConfig
from drivers.opcua.config import OpcUaDeviceConfig


@dataclass(frozen=True, slots=True)
class DriverSpec:
    """What the registry knows of a protocol: its config model and where its driver lives."""

    config: type[DeviceConfigBase]
    driver: str  # "module:Class", imported on first use so `check` never loads protocol stacks


DRIVERS: dict[str, DriverSpec] = {
    "modbus": DriverSpec(ModbusDeviceConfig, "drivers.modbus.driver:ModbusDriver"),
    "opcua": DriverSpec(OpcUaDeviceConfig, "drivers.opcua.driver:OpcUaDriver"),
}

DRIVER_TAG_PREFIX = "driver:"


def driver_class(config: DeviceConfigBase) -> type[Driver]:
    """The Driver class for a device's config (imported on first use)."""
    for spec in DRIVERS.values():
        if isinstance(config, spec.config):
            return load_driver_class(spec.driver)
    raise LookupError(f"no driver is registered for {type(config).__name__}")


def _driver_of(value: Any) -> str | None:
    driver = value.get("driver") if isinstance(value, dict) else getattr(value, "driver", None)
    return f"{DRIVER_TAG_PREFIX}{driver}" if isinstance(driver, str) else None


if TYPE_CHECKING:
    DeviceConfig = DeviceConfigBase
else:
    DeviceConfig = Annotated[
        Union[  # noqa: UP007 - built from the registry at import time
            tuple(
                Annotated[spec.config, Tag(f"{DRIVER_TAG_PREFIX}{name}")]
                for name, spec in DRIVERS.items()
            )
        ],
        Discriminator(
            _driver_of,
            custom_error_type="unknown_driver",
            custom_error_message="unknown or missing driver; known drivers: " + ", ".join(DRIVERS),
        ),
    ]
