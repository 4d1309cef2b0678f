"""Command line of the Modbus simulator: ``edge-agent simulate modbus``.

``python -m simulators.modbus`` runs the same. It prints the register map and the endpoints,
then serves until SIGINT/SIGTERM. Exit codes: 0 stopped by a signal, 1 cannot listen / open
the serial device, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable

from simulators.modbus.registers import register_map_table
from simulators.modbus.server import DEFAULT_PORT, ModbusSimulator
from simulators.running import run_until_signalled

__all__ = ["main", "serve"]


async def serve(
    simulator: ModbusSimulator, stop: asyncio.Event, *, out: Callable[[str], None] = print
) -> None:
    """Run ``simulator`` until ``stop`` is set, printing the map and the endpoints."""
    async with simulator:
        out(register_map_table())
        if simulator.port is not None:
            out(f"modbus simulator listening on {simulator.host}:{simulator.port}")
        if simulator.serial_device is not None:
            out(f"modbus simulator RTU on {simulator.serial_device}")
        if simulator.control_port is not None:
            out(f"modbus simulator control on 127.0.0.1:{simulator.control_port}")
        if simulator.write_log_path is not None:
            out(f"modbus simulator write log {simulator.write_log_path}")
        out(
            f"units {', '.join(map(str, simulator.units))}, seed {simulator.seed}, "
            f"speed {simulator.speed:g}"
        )
        await stop.wait()


def _parser() -> argparse.ArgumentParser:
    """Command-line options of ``edge-agent simulate modbus``."""
    p = argparse.ArgumentParser(
        prog="edge-agent simulate modbus",
        description="Modbus TCP/RTU simulator of a production line (register map in the README).",
    )
    p.add_argument("--host", default="127.0.0.1", help="TCP address to bind (default 127.0.0.1)")
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"TCP port, 0 = any free (default {DEFAULT_PORT}; no TCP with --serial unless given)",
    )
    p.add_argument(
        "--seed", type=int, default=1, help="model seed of unit 1 (unit u: seed+u-1; default 1)"
    )
    p.add_argument(
        "--speed", type=float, default=1.0, help="simulated seconds per second (default 1)"
    )
    p.add_argument(
        "--serial",
        metavar="PATH",
        help="serve RTU on this serial device; 'pty' creates a pty pair and prints its path",
    )
    p.add_argument("--baudrate", type=int, default=19200, help="RTU baud rate (default 19200)")
    p.add_argument("--write-log", metavar="FILE", help="append every write request as JSON lines")
    p.add_argument("--units", type=int, default=1, help="number of unit ids 1..N (default 1)")
    p.add_argument(
        "--bulk-change-fraction",
        type=float,
        default=0.1,
        help="share of the 5,000 bulk registers changing per simulated second (default 0.1)",
    )
    p.add_argument(
        "--control-port",
        type=int,
        default=None,
        help="fault-injection control port on 127.0.0.1 (0 = any free; see the README)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the Modbus simulator until SIGINT/SIGTERM; 0 ok, 1 runtime error, 2 usage."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    port = args.port
    if port is None and args.serial is None:
        port = DEFAULT_PORT
    try:
        simulator = ModbusSimulator(
            host=args.host,
            port=port,
            seed=args.seed,
            speed=args.speed,
            units=args.units,
            serial=args.serial,
            baudrate=args.baudrate,
            write_log=args.write_log,
            bulk_change_fraction=args.bulk_change_fraction,
            control_port=args.control_port,
        )
    except ValueError as exc:
        print(f"edge-agent simulate modbus: {exc}", file=sys.stderr)
        return 2

    return run_until_signalled("modbus", lambda stop, out: serve(simulator, stop, out=out))
