"""The OPC UA simulator's control commands (simulators/README.md), one function each; the
channel and ``send_control`` are simulators/control.py (the same protocol as the Modbus
simulator's)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

from simulators.control import ControlServer, parse_speed, send_control
from simulators.opcua.values import json_value

if TYPE_CHECKING:
    from simulators.opcua.server import OpcUaSimulator

__all__ = ["ControlChannel", "send_control"]

Handler = Callable[["OpcUaSimulator", list[str]], Awaitable[str]]


class ControlChannel(ControlServer):
    """The control channel with the OPC UA simulator's commands, acting on one simulator."""

    def __init__(self, *, simulator: OpcUaSimulator) -> None:
        """Commands act on ``simulator``; nothing listens before ``listen()``."""
        super().__init__(
            commands={name: partial(handler, simulator) for name, handler in _COMMANDS.items()}
        )


async def _ping(sim: OpcUaSimulator, args: list[str]) -> str:
    return "ok"


async def _status(sim: OpcUaSimulator, args: list[str]) -> str:
    return "ok " + json.dumps(sim.status_report(), separators=(",", ":"))


async def _close(sim: OpcUaSimulator, args: list[str]) -> str:
    return f"ok {sim.close_connections()}"


async def _stall(sim: OpcUaSimulator, args: list[str]) -> str:
    sim.stall(float(args[0]) if args else None)
    return "ok"


async def _unstall(sim: OpcUaSimulator, args: list[str]) -> str:
    sim.unstall()
    return "ok"


async def _restart(sim: OpcUaSimulator, args: list[str]) -> str:
    await sim.restart()
    return "ok"


async def _status_code(sim: OpcUaSimulator, args: list[str]) -> str:
    await sim.set_status(args[0], args[1])
    return "ok"


async def _set_value(sim: OpcUaSimulator, args: list[str]) -> str:
    await sim.set_value(args[0], json.loads(" ".join(args[1:])))
    return "ok"


async def _change_type(sim: OpcUaSimulator, args: list[str]) -> str:
    await sim.change_type(args[0], args[1])
    return "ok"


async def _release(sim: OpcUaSimulator, args: list[str]) -> str:
    await sim.release(args[0])
    return "ok"


async def _clear(sim: OpcUaSimulator, args: list[str]) -> str:
    await sim.clear_faults()
    return "ok"


async def _speed(sim: OpcUaSimulator, args: list[str]) -> str:
    sim.speed = parse_speed(args)
    return "ok"


async def _force_state(sim: OpcUaSimulator, args: list[str]) -> str:
    sim.model.force_state(int(args[0]), int(args[1]) if len(args) > 1 else 0)
    return "ok"


async def _write(sim: OpcUaSimulator, args: list[str]) -> str:
    sim.model.write(args[0], json.loads(" ".join(args[1:])))
    return "ok"


async def _read(sim: OpcUaSimulator, args: list[str]) -> str:
    datavalue = sim.value(args[0])
    raw = datavalue.Value.Value if datavalue.Value is not None else None
    status = datavalue.StatusCode.name if datavalue.StatusCode is not None else "Good"
    return "ok " + json.dumps({"value": json_value(raw), "status": status})


_COMMANDS: Final[Mapping[str, Handler]] = MappingProxyType(
    {
        "ping": _ping,
        "status": _status,
        "close": _close,
        "stall": _stall,
        "unstall": _unstall,
        "restart": _restart,
        "status_code": _status_code,
        "set_value": _set_value,
        "change_type": _change_type,
        "release": _release,
        "clear": _clear,
        "speed": _speed,
        "force_state": _force_state,
        "write": _write,
        "read": _read,
    }
)
