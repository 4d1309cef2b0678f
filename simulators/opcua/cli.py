"""``edge-agent simulate opcua`` / ``python -m simulators.opcua``: run the simulator."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable

from simulators.opcua.nodes import BULK_COUNT, node_table
from simulators.opcua.security import DEFAULT_PASSWORD
from simulators.opcua.server import DEFAULT_PORT, OpcUaSimulator
from simulators.running import run_until_signalled

__all__ = ["main", "serve"]


async def serve(
    simulator: OpcUaSimulator, stop: asyncio.Event, *, out: Callable[[str], None] = print
) -> None:
    """Run ``simulator`` until ``stop`` is set, printing the node table and the endpoints."""
    async with simulator:
        out(node_table())
        out(f"opcua simulator listening on {simulator.url}")
        out(
            "opcua simulator endpoints "
            + ", ".join(f"{policy}/{mode}" for policy, mode in simulator.endpoints)
            + (f"; users {', '.join(sorted(simulator.users))}" if simulator.users else "")
            + ("; anonymous allowed" if simulator.allow_anonymous else "")
        )
        if simulator.certificate_path is not None:
            out(
                f"opcua simulator certificate {simulator.certificate_path} "
                f"(SHA-256 {simulator.certificate_fingerprint})"
            )
        if simulator.control_port is not None:
            out(f"opcua simulator control on 127.0.0.1:{simulator.control_port}")
        out(f"seed {simulator.seed}, speed {simulator.speed:g}, bulk {simulator.bulk_count}")
        await stop.wait()


def _parser() -> argparse.ArgumentParser:
    """Command-line options of ``edge-agent simulate opcua``."""
    p = argparse.ArgumentParser(
        prog="edge-agent simulate opcua",
        description="OPC UA simulator of a production line (node table in the README).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port, 0 = any free ({DEFAULT_PORT})"
    )
    p.add_argument("--seed", type=int, default=1, help="line model seed (default 1)")
    p.add_argument(
        "--speed", type=float, default=1.0, help="simulated seconds per second (default 1)"
    )
    p.add_argument(
        "--secure",
        action="store_true",
        help="offer only Basic256Sha256/SignAndEncrypt with user 'edge' and --password",
    )
    p.add_argument(
        "--password",
        default=DEFAULT_PASSWORD,
        help=f"password of user 'edge' (default {DEFAULT_PASSWORD!r})",
    )
    p.add_argument(
        "--pki",
        metavar="DIR",
        default=None,
        help="server certificate directory, created and reused (default: a temporary one)",
    )
    p.add_argument(
        "--bulk", type=int, default=BULK_COUNT, help=f"bulk variables (default {BULK_COUNT})"
    )
    p.add_argument(
        "--bulk-change-fraction",
        type=float,
        default=0.1,
        help="share of the bulk variables changing per simulated second (default 0.1)",
    )
    p.add_argument("--write-log", metavar="FILE", help="append every client write as JSON lines")
    p.add_argument(
        "--control-port",
        type=int,
        default=None,
        help="fault-injection control port on 127.0.0.1 (0 = any free; see the README)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the OPC UA simulator until SIGINT/SIGTERM; 0 ok, 1 runtime error, 2 usage."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        simulator = OpcUaSimulator(
            host=args.host,
            port=args.port,
            seed=args.seed,
            speed=args.speed,
            secure=args.secure,
            password=args.password,
            pki_dir=args.pki,
            bulk_count=args.bulk,
            bulk_change_fraction=args.bulk_change_fraction,
            control_port=args.control_port,
            write_log=args.write_log,
        )
    except ValueError as exc:
        print(f"edge-agent simulate opcua: {exc}", file=sys.stderr)
        return 2

    return run_until_signalled("opcua", lambda stop, out: serve(simulator, stop, out=out))
