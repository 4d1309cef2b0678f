"""Modbus TCP and RTU driver (pymodbus async clients).

Protocol quirks this module is written around:

* pymodbus resends a request on timeout when `retries` > 0. Fine for reads, wrong for
  writes: the client is built with retries=0, reads are retried here, writes go out once
  and an unknown outcome is settled by reading the value back.
* One request at a time per physical link (a TCP connection, a serial line): devices that
  share a link (several unit ids behind one gateway or on one RS-485 bus) share one
  `ModbusLink` and its lock. No pipelining.
* RTU frames carry no transaction id: after a timeout a late answer could be taken for the
  answer to the next request, so the line is kept quiet for a while first.
* An exception response to a coalesced block says nothing about which tag is wrong: the
  block is split in halves until the offending tag is alone, and the finer plan is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerType

from drivers.base import (
    Driver,
    DriverContext,
    DriverFault,
    DriverUnavailable,
    JsonValue,
    Reading,
    WriteUnverified,
)
from drivers.config import DeviceConfigBase
from drivers.modbus.codec import (
    Block,
    DecodeError,
    Decoder,
    encode_registers,
    make_decoder,
    plan_blocks,
    scale_value,
    unscale_value,
)
from drivers.modbus.config import (
    ModbusDeviceConfig,
    ModbusTagConfig,
    SerialLink,
    TcpLink,
)

log = logging.getLogger("edge_agent.modbus")

# Modbus exception codes (spec §7) and what they mean for us.
ILLEGAL_FUNCTION = 1
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


def exception_text(code: int) -> str:
    """'illegal data address (exception 2)'."""
    return f"{_EXCEPTION_NAMES.get(code, 'exception')} (exception {code})"


class ModbusExceptionResponse(DriverFault):
    """The device answered a request with a Modbus exception code."""

    def __init__(self, code: int) -> None:
        super().__init__(exception_text(code))
        self.code = code


@dataclass(slots=True)
class LinkStats:
    """Counters of one physical link."""

    requests: int = 0
    errors: int = 0
    timeouts: int = 0
    connects: int = 0


class ModbusLink:
    """One physical link (TCP endpoint or serial line), its client and its lock."""

    def __init__(self, link: TcpLink | SerialLink, *, timeout: float, frame_gap: float) -> None:
        self.link = link
        self.timeout = timeout
        self.frame_gap = frame_gap
        self.lock = asyncio.Lock()
        self.stats = LinkStats()
        self.users = 0
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None

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

    def _make_client(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
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

    async def ensure_connected(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
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


class ModbusDriver(Driver):
    """A Modbus device: coalesced block reads, typed decoding, verified single writes."""

    config: ModbusDeviceConfig

    def __init__(self, config: DeviceConfigBase, context: DriverContext | None = None) -> None:
        if not isinstance(config, ModbusDeviceConfig):
            raise TypeError("ModbusDriver needs a ModbusDeviceConfig")
        super().__init__(config, context)
        self._plan = plan_blocks(
            config.tags,
            max_gap=config.max_gap,
            max_registers=config.max_block_registers,
            max_bits=config.max_block_bits,
        )
        self._link: ModbusLink | None = None
        # Decoders are built once per tag: the per-poll path only slices and calls.
        self._decoders = {tag.name: self._decoder(tag) for tag in config.tags}
        self.requests_last_cycle = 0

    # -- connection ------------------------------------------------------------------------

    def _acquire_link(self) -> ModbusLink:
        config = self.config
        link = self.context.shared.get_or_create(
            ModbusLink,
            config.url.split("?", 1)[0],  # one link per endpoint or serial port, any settings
            lambda: ModbusLink(config.link, timeout=config.timeout, frame_gap=config.frame_gap),
        )
        link.users += 1
        return link

    async def connect(self) -> None:
        """Connect (or join the shared link) and check that it answers TCP/serial I/O."""
        if self._link is None:
            self._link = self._acquire_link()
        async with self._link.lock:
            await self._link.ensure_connected()

    async def close(self) -> None:
        """Leave the shared link; the last user closes it."""
        link, self._link = self._link, None
        if link is None:
            return
        link.users -= 1
        if link.users <= 0:
            link.drop()

    def _require_link(self) -> ModbusLink:
        if self._link is None:
            raise DriverUnavailable("not connected")
        return self._link

    # -- requests --------------------------------------------------------------------------

    async def _request(self, link: ModbusLink, area: str, start: int, count: int) -> list[Any]:
        """One read with our retry policy; returns registers or bits. Lock must be held."""
        attempts = 1 + self.config.read_retries
        for attempt in range(attempts):
            client = await link.ensure_connected()
            link.stats.requests += 1
            self.requests_last_cycle += 1
            unit = self.config.unit_id
            try:
                async with asyncio.timeout(link.timeout * 2 + 1.0):  # backstop over pymodbus'
                    if area == "hr":
                        response = await client.read_holding_registers(
                            start, count=count, device_id=unit
                        )
                    elif area == "ir":
                        response = await client.read_input_registers(
                            start, count=count, device_id=unit
                        )
                    elif area == "co":
                        response = await client.read_coils(start, count=count, device_id=unit)
                    else:
                        response = await client.read_discrete_inputs(
                            start, count=count, device_id=unit
                        )
            except (TimeoutError, ModbusException, OSError) as exc:
                link.stats.timeouts += 1
                link.stats.errors += 1
                reason = _reason(exc)
                if link.is_serial:
                    await link.quiet(min(0.5, link.timeout))
                if not client.connected:
                    link.drop()
                    raise DriverUnavailable(f"{link.name}: connection lost ({reason})") from None
                if attempt + 1 < attempts:
                    continue
                raise DriverUnavailable(f"{link.name}: no answer ({reason})") from None
            finally:
                await link.quiet(self.config.frame_gap)
            if response.isError():
                link.stats.errors += 1
                code = int(getattr(response, "exception_code", 0) or 0)
                if code in (GATEWAY_PATH_UNAVAILABLE, GATEWAY_TARGET_NO_RESPONSE):
                    raise DriverUnavailable(f"{link.name} unit {unit}: {exception_text(code)}")
                raise ModbusExceptionResponse(code)
            values = list(response.bits if area in ("co", "di") else response.registers)
            if len(values) < count:
                raise DriverUnavailable(
                    f"{link.name}: short answer ({len(values)} of {count} values)"
                )
            return values[:count]
        raise AssertionError("unreachable")

    async def _read_block(self, link: ModbusLink, block: Block, now: float) -> list[Reading]:
        try:
            values = await self._request(link, block.area, block.start, block.count)
        except ModbusExceptionResponse as exc:
            if exc.code in (ILLEGAL_DATA_ADDRESS, ILLEGAL_DATA_VALUE):
                halves = block.split()
                if halves is not None:
                    # Keep the finer plan so that the next cycle does not fail again.
                    index = self._plan.index(block)
                    self._plan[index : index + 1] = list(halves)
                    readings = await self._read_block(link, halves[0], now)
                    return readings + await self._read_block(link, halves[1], now)
            return [Reading(slot.tag.name, None, "bad", now, str(exc)) for slot in block.slots]
        stamp = time.time()
        start = block.start
        decoders = self._decoders
        readings = []
        for slot in block.slots:
            first = slot.address.offset - start
            name = slot.tag.name
            try:
                value = decoders[name](values[first : first + slot.count])
            except DecodeError as exc:
                readings.append(Reading(name, None, "bad", stamp, str(exc)))
                continue
            readings.append(Reading(name, value, "good", stamp))
        return readings

    def _decoder(self, tag: ModbusTagConfig) -> Decoder:
        address = tag.parsed_address
        if address.is_bit_area:
            return lambda bits: bool(bits[0])
        return make_decoder(
            tag.type,
            byte_order=tag.byte_order or self.config.byte_order,
            word_order=tag.word_order or self.config.word_order,
            length=tag.length,
            bit=address.bit,
            scale=tag.scale,
            offset=tag.offset,
        )

    def _decode(
        self, tag: ModbusTagConfig, values: Sequence[Any], block: Block, ts: float
    ) -> Reading:
        first = tag.parsed_address.offset - block.start
        try:
            value = self._decoders[tag.name](values[first : first + tag.count])
        except DecodeError as exc:
            return Reading(tag.name, None, "bad", ts, str(exc))
        return Reading(tag.name, value, "good", ts)

    async def read(self) -> list[Reading]:
        """One poll cycle: every block of the plan, in address order."""
        link = self._require_link()
        self.requests_last_cycle = 0
        readings: list[Reading] = []
        now = time.time()
        async with link.lock:
            for block in list(self._plan):
                readings += await self._read_block(link, block, now)
        return readings

    async def read_tag(self, tag: str) -> Reading:
        """Read one tag now (its own request)."""
        config = self._tag(tag)
        link = self._require_link()
        block = plan_blocks([config], max_gap=0, max_registers=125, max_bits=2000)[0]
        async with link.lock:
            try:
                values = await self._request(link, block.area, block.start, block.count)
            except ModbusExceptionResponse as exc:
                return Reading(tag, None, "bad", time.time(), str(exc))
        return self._decode(config, values, block, time.time())

    def _tag(self, name: str) -> ModbusTagConfig:
        tag = self.tag_config(name)
        assert isinstance(tag, ModbusTagConfig)  # the config model holds only ModbusTagConfigs
        return tag

    async def _write(self, tag: str, value: JsonValue) -> JsonValue:
        """Write once with FC5/6/16 (FC22 for a register bit), then verify by reading back."""
        config = self._tag(tag)
        address = config.parsed_address
        if isinstance(value, list) or value is None:
            raise DriverFault(f"cannot write {value!r} to {tag}")
        try:
            raw = unscale_value(value, config.type, config.scale, config.offset)
            if address.is_bit_area or config.type == "bool":
                if not isinstance(raw, bool):
                    raise ValueError(f"expected a boolean, got {value!r}")
                registers: list[int] = []
            else:
                registers = encode_registers(
                    raw,
                    config.type,
                    byte_order=config.byte_order or self.config.byte_order,
                    word_order=config.word_order or self.config.word_order,
                    length=config.length,
                )
        except ValueError as exc:
            raise DriverFault(f"{self.config.name}/{tag}: {exc}") from None
        link = self._require_link()
        unit = self.config.unit_id
        outcome: str | None = None
        async with link.lock:
            client = await link.ensure_connected()
            link.stats.requests += 1
            try:
                async with asyncio.timeout(link.timeout * 2 + 1.0):
                    if address.area == "co":
                        if self.config.write_multiple:
                            response = await client.write_coils(
                                address.offset, [bool(raw)], device_id=unit
                            )
                        else:
                            response = await client.write_coil(
                                address.offset, bool(raw), device_id=unit
                            )
                    elif address.bit is not None:
                        mask = 1 << address.bit
                        response = await client.mask_write_register(
                            address=address.offset,
                            and_mask=0xFFFF ^ mask,
                            or_mask=mask if raw else 0,
                            device_id=unit,
                        )
                    elif config.type == "bool":
                        response = await client.write_register(
                            address.offset, 1 if raw else 0, device_id=unit
                        )
                    elif len(registers) == 1 and not self.config.write_multiple:
                        response = await client.write_register(
                            address.offset, registers[0], device_id=unit
                        )
                    else:
                        response = await client.write_registers(
                            address.offset, registers, device_id=unit
                        )
            except (TimeoutError, ModbusException, OSError) as exc:
                # The write may or may not have been applied: never resend, read back below.
                link.stats.errors += 1
                outcome = f"no answer to the write ({_reason(exc)})"
                if link.is_serial:
                    await link.quiet(min(0.5, link.timeout))
                if not client.connected:
                    link.drop()
            else:
                if response.isError():
                    link.stats.errors += 1
                    code = int(getattr(response, "exception_code", 0) or 0)
                    raise DriverFault(
                        f"{self.config.name}/{tag}: write refused: {exception_text(code)}"
                    )
            finally:
                await link.quiet(self.config.frame_gap)
        try:
            read_back = await self.read_tag(tag)
        except DriverUnavailable as exc:
            raise WriteUnverified(f"{self.config.name}/{tag}: cannot read back: {exc}") from None
        expected = (
            scale_value(raw, config.scale, config.offset) if not isinstance(raw, str) else raw
        )
        if read_back.quality != "good" or not config.same_value(read_back.value, expected):
            detail = outcome or "read-back differs"
            raise WriteUnverified(
                f"{self.config.name}/{tag}: wrote {value!r}, read back "
                f"{read_back.value!r} ({detail})",
                read_back=read_back.value,
            )
        return read_back.value

    @property
    def state_detail(self) -> dict[str, Any]:
        """Requests per cycle and link counters."""
        detail: dict[str, Any] = {
            "blocks": len(self._plan),
            "requests_last_cycle": self.requests_last_cycle,
        }
        if self._link is not None:
            stats = self._link.stats
            detail.update(
                requests=stats.requests,
                errors=stats.errors,
                timeouts=stats.timeouts,
                connects=stats.connects,
            )
        return detail

    @property
    def plan(self) -> list[Block]:
        """The current block plan (after any splits)."""
        return list(self._plan)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    text = str(exc).strip()
    if "No response received" in text:
        return "timeout"  # pymodbus' wording for a request that timed out
    # pymodbus messages start with "Modbus Error: [...]"; keep them short.
    return text.replace("Modbus Error: ", "")[:200] or type(exc).__name__
