"""Injected faults of the Modbus simulator, shared by every transport (simulators/README.md).

Stall and exception mode act in the datastore (``store.py``): the request is neither executed
nor, for a stall, answered. Wrong transaction id, garbage and a second stall guard act on the
outgoing bytes through pymodbus' ``trace_packet`` hook (``trace_hook``), after the request was
executed. No proxy sits in between.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerRTU

from simulators.modbus.registers import Area, parse_ref

__all__ = ["Faults"]


class Faults:
    """Switchable faults of one simulator; every switch takes effect on the next request."""

    def __init__(self, *, seed: int) -> None:
        """All faults off; ``seed`` seeds the garbage bytes."""
        self._garbage_rng = random.Random(f"garbage-{seed}")
        self.stall_until: float | None = None  # monotonic deadline; math.inf = until unstalled
        self.exception_code: ExcCodes | None = None
        self.exception_any: frozenset[int] | None = None  # addresses matched in every area
        self.exception_refs: frozenset[tuple[str, int]] = frozenset()
        self.wrong_tid = False
        self.garbage = False

    def clear(self) -> None:
        """Turn every fault off (the garbage stream goes on where it was)."""
        self.unstall()
        self.set_exception(None)
        self.wrong_tid = False
        self.garbage = False

    def stall(self, seconds: float | None) -> None:
        """Swallow requests for ``seconds`` (None = until unstalled; <= 0 unstalls)."""
        if seconds is not None and seconds <= 0:
            self.unstall()
            return
        self.stall_until = time.monotonic() + (math.inf if seconds is None else seconds)

    def unstall(self) -> None:
        """Answer requests again."""
        self.stall_until = None

    def stalled(self) -> bool:
        """True while requests must be swallowed."""
        if self.stall_until is None:
            return False
        if time.monotonic() < self.stall_until:
            return True
        self.stall_until = None
        return False

    def set_exception(self, code: int | None, addresses: Iterable[int | str] | None = None) -> None:
        """Answer requests covering ``addresses`` (None = all) with ``code``; None or 0 = off."""
        if not code:
            self.exception_code = None
            self.exception_any = None
            self.exception_refs = frozenset()
            return
        exc_code = ExcCodes(code)
        any_area: set[int] = set()
        refs: set[tuple[str, int]] = set()
        for ref in addresses or ():
            area, number = parse_ref(ref)
            if area is None:
                any_area.add(number)
            else:
                refs.add((area, number))
        self.exception_code = exc_code
        self.exception_any = frozenset(any_area) if any_area else None
        self.exception_refs = frozenset(refs)

    def exception_for(self, area: Area, address: int, count: int) -> ExcCodes | None:
        """The injected exception code if it applies to this request."""
        code = self.exception_code
        if code is None:
            return None
        if self.exception_any is None and not self.exception_refs:
            return code
        for addr in range(address, address + count):
            if (self.exception_any and addr in self.exception_any) or (
                (area, addr) in self.exception_refs
            ):
                return code
        return None

    def as_dict(self) -> dict[str, object]:
        """Current fault switches, JSON friendly."""
        stall: float | str | None = None
        if self.stalled() and self.stall_until is not None:
            remaining = self.stall_until - time.monotonic()
            stall = "forever" if math.isinf(remaining) else round(remaining, 3)
        return {
            "stall": stall,
            "exception": None if self.exception_code is None else int(self.exception_code),
            "exception_addresses": sorted(self.exception_any or ())
            + [f"{a}:{n}" for a, n in sorted(self.exception_refs)],
            "wrong_transaction_id": self.wrong_tid,
            "garbage": self.garbage,
        }

    def trace_hook(self, *, rtu: bool) -> Callable[[bool, bytes], bytes]:
        """pymodbus ``trace_packet`` hook: mangle outgoing frames according to the faults."""

        def trace(sending: bool, data: bytes) -> bytes:
            if not sending or not data:
                return data
            if self.stalled():
                return b""  # anything not stopped in the store (e.g. decode errors) too
            if self.garbage:
                junk = bytearray(self._garbage_rng.randbytes(len(data)))
                if not rtu:
                    junk[2] |= 0x80  # non-zero MBAP protocol id: never a valid frame
                return bytes(junk)
            if self.wrong_tid:
                return _wrong_unit_rtu(data) if rtu else _wrong_tid_tcp(data)
            return data

        return trace


def _wrong_tid_tcp(frame: bytes) -> bytes:
    """Change the MBAP transaction id; never to 0, which the pymodbus client accepts for any."""
    tid = int.from_bytes(frame[0:2], "big")
    wrong = tid % 0xFFFF + 1
    return wrong.to_bytes(2, "big") + frame[2:]


def _wrong_unit_rtu(frame: bytes) -> bytes:
    """RTU has no transaction id: answer as another unit id, with a valid CRC."""
    body = bytes([frame[0] % 247 + 1]) + frame[1:-2]
    return body + FramerRTU.compute_CRC(body).to_bytes(2, "big")
