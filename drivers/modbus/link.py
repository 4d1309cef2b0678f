"""One physical Modbus link (a TCP connection or a serial line): its pymodbus client, its lock
and its counters, plus the exception codes and failure wording every request shares.

Quirks this module is written around (docs/modbus.md, "Requests"):

* pymodbus resends a request on timeout when `retries` > 0. Fine for reads, wrong for
  writes: the client is built with retries=0; the driver retries reads itself and settles an
  unanswered write by reading the value back.
* One request at a time per physical link: devices that share a link (several unit ids behind
  one gateway or on one RS-485 bus) share one `ModbusLink` and its lock. No pipelining.
* RTU frames carry no transaction id: after a failed request a late answer could be taken for
  the answer to the next request, so the line is kept quiet for a while first.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU

from drivers.base import DriverFault, DriverUnavailable
from drivers.modbus.config import SerialLink, TcpLink

ModbusClient = AsyncModbusTcpClient | AsyncModbusSerialClient

# Modbus exception codes (Modbus application protocol specification, section 7).
ILLEGAL_DATA_ADDRESS = 2
ILLEGAL_DATA_VALUE = 3
GATEWAY_PATH_UNAVAILABLE = 0x0A
GATEWAY_TARGET_NO_RESPONSE = 0x0B
_EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    0x0A: "gateway path unavailable",
    0x0B: "gateway target device failed to respond",
}

# Longest quiet gap after a failed request on a serial line (capped by the link's timeout).
_SERIAL_QUIET_AFTER_FAILURE = 0.5


def exception_text(code: int) -> str:
    """'illegal data address (exception 2)'."""
    return f"{_EXCEPTION_NAMES.get(code, 'exception')} (exception {code})"


def exception_code(response: ModbusPDU) -> int:
    """The exception code of an error response (0 when pymodbus gives none)."""
    return int(getattr(response, "exception_code", 0) or 0)


class ModbusExceptionResponse(DriverFault):
    """The device answered a request with a Modbus exception code."""

    def __init__(self, code: int) -> None:
        super().__init__(exception_text(code))
        self.code = code


def failure_reason(exc: BaseException) -> str:
    """A short reason for a request that got no answer: 'timeout' or pymodbus' message."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    text = str(exc).strip()
    if "No response received" in text:
        return "timeout"  # pymodbus' wording for a request that timed out
    # pymodbus messages start with "Modbus Error: [...]"; keep them short.
    return text.replace("Modbus Error: ", "")[:200] or type(exc).__name__


@dataclass(slots=True)
class LinkStats:
    """Counters of one physical link."""

    requests: int = 0
    errors: int = 0
    timeouts: int = 0
    connects: int = 0


class ModbusLink:
    """One physical link (TCP endpoint or serial line), its client and its lock."""

    def __init__(self, link: TcpLink | SerialLink, *, timeout: float) -> None:
        self.link = link
        self.timeout = timeout
        self.lock = asyncio.Lock()
        self.stats = LinkStats()
        self.users = 0
        self._client: ModbusClient | None = None

    @property
    def is_serial(self) -> bool:
        """RTU over a serial line."""
        return isinstance(self.link, SerialLink)

    @property
    def name(self) -> str:
        """host:port or the serial device."""
        if isinstance(self.link, TcpLink):
            return f"{self.link.host}:{self.link.port}"
        return self.link.port

    @property
    def request_deadline(self) -> float:
        """Our backstop over pymodbus' own timeout for one request, in seconds."""
        return self.timeout * 2 + 1.0

    def _make_client(self) -> ModbusClient:
        # retries=0: never resend (writes must go out once); reconnect_delay=0: we reconnect.
        if isinstance(self.link, TcpLink):
            return AsyncModbusTcpClient(
                self.link.host,
                port=self.link.port,
                timeout=self.timeout,
                retries=0,
                reconnect_delay=0,
            )
        return AsyncModbusSerialClient(
            self.link.port,
            framer=FramerType.RTU,
            baudrate=self.link.baudrate,
            bytesize=self.link.bytesize,
            parity=self.link.parity,
            stopbits=self.link.stopbits,
            timeout=self.timeout,
            retries=0,
            reconnect_delay=0,
        )

    async def ensure_connected(self) -> ModbusClient:
        """The connected client; connects first if needed (call with the lock held)."""
        client = self._client
        if client is not None and client.connected:
            return client
        self.drop()
        client = self._make_client()
        try:
            async with asyncio.timeout(self.timeout + 5.0):
                ok = await client.connect()
        except TimeoutError:
            ok = False
        if not ok or not client.connected:
            client.close()
            raise DriverUnavailable(f"cannot connect to {self.name}")
        self.stats.connects += 1
        self._client = client
        return client

    def drop(self) -> None:
        """Close the client; the next request reconnects."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    async def quiet(self, seconds: float) -> None:
        """Keep the line silent (serial inter-frame gap, late answers after a timeout)."""
        if seconds > 0:
            await asyncio.sleep(seconds)

    async def settle_after_failure(self, client: ModbusClient) -> bool:
        """After a request got no answer: quiet a serial line, drop a lost connection.

        Returns True when the connection was lost (and dropped)."""
        if self.is_serial:
            # RTU has no transaction id: let a late answer pass before the next request.
            await self.quiet(min(_SERIAL_QUIET_AFTER_FAILURE, self.timeout))
        if client.connected:
            return False
        self.drop()
        return True
