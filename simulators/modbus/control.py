"""The Modbus simulator's control commands (simulators/README.md); the channel and
``send_control`` are simulators/control.py."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from simulators.control import ControlServer, parse_speed, send_control

if TYPE_CHECKING:
    from simulators.modbus.server import ModbusSimulator

__all__ = ["ControlChannel", "send_control"]


class ControlChannel(ControlServer):
    """The control channel with the Modbus simulator's commands, acting on one simulator."""

    def __init__(self, *, simulator: ModbusSimulator) -> None:
        """Act on ``simulator``; nothing listens before ``listen()``."""
        self._sim = simulator
        super().__init__(
            commands={
                "ping": self._ping,
                "status": self._status,
                "close": self._close_connections,
                "stall": self._stall,
                "unstall": self._unstall,
                "exception": self._exception,
                "wrong_tid": self._wrong_tid,
                "garbage": self._garbage,
                "clear": self._clear,
                "restart": self._restart,
                "speed": self._speed,
                "force_state": self._force_state,
                "write": self._write,
            }
        )

    # One handler per command: args are the words after the command name.

    async def _ping(self, args: list[str]) -> str:
        return "ok"

    async def _status(self, args: list[str]) -> str:
        sim = self._sim
        status = {
            "port": sim.port,
            "serial": sim.serial_device,
            "speed": sim.speed,
            "faults": sim.faults(),
            "connections": sim.connections,
            "writes": len(sim.writes),
            "units": {str(unit): sim.model(unit).snapshot() for unit in sim.units},
        }
        return "ok " + json.dumps(status, separators=(",", ":"))

    async def _close_connections(self, args: list[str]) -> str:
        return f"ok {self._sim.close_connections()}"

    async def _stall(self, args: list[str]) -> str:
        self._sim.stall(float(args[0]) if args else None)
        return "ok"

    async def _unstall(self, args: list[str]) -> str:
        self._sim.unstall()
        return "ok"

    async def _exception(self, args: list[str]) -> str:
        if not args:
            raise ValueError("usage: exception CODE [ADDR ...] | exception off")
        self._sim.exception(0 if args[0] == "off" else int(args[0], 0), args[1:] or None)
        return "ok"

    async def _wrong_tid(self, args: list[str]) -> str:
        self._sim.wrong_transaction_id(_parse_on(args))
        return "ok"

    async def _garbage(self, args: list[str]) -> str:
        self._sim.garbage(_parse_on(args))
        return "ok"

    async def _clear(self, args: list[str]) -> str:
        self._sim.clear_faults()
        return "ok"

    async def _restart(self, args: list[str]) -> str:
        await self._sim.restart()
        return "ok"

    async def _speed(self, args: list[str]) -> str:
        self._sim.speed = parse_speed(args)
        return "ok"

    async def _force_state(self, args: list[str]) -> str:
        unit, code = int(args[0]), int(args[1])
        self._sim.model(unit).force_state(code, int(args[2]) if len(args) > 2 else 0)
        return "ok"

    async def _write(self, args: list[str]) -> str:
        unit, point = int(args[0]), args[1]
        self._sim.model(unit).write(point, json.loads(" ".join(args[2:])))
        return "ok"


def _parse_on(args: list[str]) -> bool:
    """Parse ``on``/``off`` (default on)."""
    if not args or args[0].lower() in ("on", "1", "true"):
        return True
    if args[0].lower() in ("off", "0", "false"):
        return False
    raise ValueError(f"expected on or off, got {args[0]!r}")
