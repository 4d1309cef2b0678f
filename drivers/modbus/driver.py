"""Modbus TCP and RTU driver (pymodbus async clients): one device on a shared `ModbusLink`.

Protocol quirks this module is written around (docs/modbus.md):

* Reads are retried here (`read_retries`); writes go out once (the link's client never
  resends) and an unknown outcome is settled by reading the value back, never by writing again.
* An exception response to a coalesced block says nothing about which tag is wrong: the
  block is split in halves until the offending tag is alone, and the finer plan is kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ModbusPDU

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
    Value,
    encode_registers,
    make_decoder,
    plan_blocks,
    scale_value,
    unscale_value,
)
from drivers.modbus.config import (
    MAX_READ_BITS,
    MAX_READ_REGISTERS,
    ModbusDeviceConfig,
    ModbusTagConfig,
)
from drivers.modbus.link import (
    GATEWAY_PATH_UNAVAILABLE,
    GATEWAY_TARGET_NO_RESPONSE,
    ILLEGAL_DATA_ADDRESS,
    ILLEGAL_DATA_VALUE,
    ModbusClient,
    ModbusExceptionResponse,
    ModbusLink,
    exception_code,
    exception_text,
    failure_reason,
)

# What pymodbus raises for a request that got no (valid) answer.
_REQUEST_FAILURES = (TimeoutError, ModbusException, OSError)


class _NoAnswer(Exception):
    """A read got no answer but the connection is still up: worth another attempt."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def read_area(
    client: ModbusClient, area: str, start: int, count: int, unit: int
) -> ModbusPDU:
    """One read request: FC1 coils, FC2 discrete inputs, FC3 holding, FC4 input registers."""
    if area == "hr":
        return await client.read_holding_registers(start, count=count, device_id=unit)
    if area == "ir":
        return await client.read_input_registers(start, count=count, device_id=unit)
    if area == "co":
        return await client.read_coils(start, count=count, device_id=unit)
    return await client.read_discrete_inputs(start, count=count, device_id=unit)


async def write_tag_value(
    client: ModbusClient,
    tag: ModbusTagConfig,
    raw: Value,
    registers: list[int],
    *,
    unit: int,
    write_multiple: bool,
) -> ModbusPDU:
    """One write request: FC5 coil, FC22 bit of a register, FC6 one register, FC16 several;
    `write_multiple` (PLCs without FC5/FC6) turns FC5 into FC15 and FC6 into FC16."""
    address = tag.parsed_address
    if address.area == "co":
        if write_multiple:
            return await client.write_coils(address.offset, [bool(raw)], device_id=unit)
        return await client.write_coil(address.offset, bool(raw), device_id=unit)
    if address.bit is not None:
        mask = 1 << address.bit
        return await client.mask_write_register(
            address=address.offset,
            and_mask=0xFFFF ^ mask,
            or_mask=mask if raw else 0,
            device_id=unit,
        )
    if tag.type == "bool":
        return await client.write_register(address.offset, 1 if raw else 0, device_id=unit)
    if len(registers) == 1 and not write_multiple:
        return await client.write_register(address.offset, registers[0], device_id=unit)
    return await client.write_registers(address.offset, registers, device_id=unit)


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
            lambda: ModbusLink(config.link, timeout=config.timeout),
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

    async def _request(self, link: ModbusLink, area: str, start: int, count: int) -> list[int]:
        """One read with our retry policy; returns registers or bits. Lock must be held."""
        attempts = 1 + self.config.read_retries
        for attempt in range(1, attempts + 1):
            try:
                response = await self._send_read(link, area, start, count)
            except _NoAnswer as exc:
                if attempt < attempts:
                    continue
                raise DriverUnavailable(f"{link.name}: no answer ({exc.reason})") from None
            return self._answer_values(link, response, area, count)
        raise AssertionError("unreachable")

    async def _send_read(self, link: ModbusLink, area: str, start: int, count: int) -> ModbusPDU:
        """One read request on the wire: a lost connection is DriverUnavailable, a request
        without answer on a live connection is _NoAnswer (the caller may retry)."""
        client = await link.ensure_connected()
        link.stats.requests += 1
        self.requests_last_cycle += 1
        try:
            async with asyncio.timeout(link.request_deadline):
                return await read_area(client, area, start, count, self.config.unit_id)
        except _REQUEST_FAILURES as exc:
            link.stats.timeouts += 1
            link.stats.errors += 1
            reason = failure_reason(exc)
            if await link.settle_after_failure(client):
                raise DriverUnavailable(f"{link.name}: connection lost ({reason})") from None
            raise _NoAnswer(reason) from None
        finally:
            await link.quiet(self.config.frame_gap)

    def _answer_values(
        self, link: ModbusLink, response: ModbusPDU, area: str, count: int
    ) -> list[int]:
        """The registers or bits of a read answer; exception answers raise."""
        if response.isError():
            link.stats.errors += 1
            code = exception_code(response)
            if code in (GATEWAY_PATH_UNAVAILABLE, GATEWAY_TARGET_NO_RESPONSE):
                unit = self.config.unit_id
                raise DriverUnavailable(f"{link.name} unit {unit}: {exception_text(code)}")
            raise ModbusExceptionResponse(code)
        values: list[int] = list(response.bits if area in ("co", "di") else response.registers)
        if len(values) < count:
            raise DriverUnavailable(f"{link.name}: short answer ({len(values)} of {count} values)")
        return values[:count]

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
        self, tag: ModbusTagConfig, values: Sequence[int], block: Block, ts: float
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
        block = plan_blocks(
            [config], max_gap=0, max_registers=MAX_READ_REGISTERS, max_bits=MAX_READ_BITS
        )[0]
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
        raw, registers = self._encode_write(config, value)
        outcome = await self._send_write(config, raw, registers)
        return await self._verify_write(config, value, raw, outcome)

    def _encode_write(self, tag: ModbusTagConfig, value: JsonValue) -> tuple[Value, list[int]]:
        """The raw (unscaled) value and, for a register tag, its registers."""
        if isinstance(value, list) or value is None:
            raise DriverFault(f"cannot write {value!r} to {tag.name}")
        try:
            raw = unscale_value(value, tag.type, tag.scale, tag.offset)
            if tag.parsed_address.is_bit_area or tag.type == "bool":
                if not isinstance(raw, bool):
                    raise ValueError(f"expected a boolean, got {value!r}")
                return raw, []
            return raw, encode_registers(
                raw,
                tag.type,
                byte_order=tag.byte_order or self.config.byte_order,
                word_order=tag.word_order or self.config.word_order,
                length=tag.length,
            )
        except ValueError as exc:
            raise DriverFault(f"{self.config.name}/{tag.name}: {exc}") from None

    async def _send_write(
        self, tag: ModbusTagConfig, raw: Value, registers: list[int]
    ) -> str | None:
        """Send the write once; None when acknowledged, the reason when it got no answer
        (the outcome is then unknown); an exception answer raises DriverFault."""
        link = self._require_link()
        outcome: str | None = None
        async with link.lock:
            client = await link.ensure_connected()
            link.stats.requests += 1
            try:
                async with asyncio.timeout(link.request_deadline):
                    response = await write_tag_value(
                        client,
                        tag,
                        raw,
                        registers,
                        unit=self.config.unit_id,
                        write_multiple=self.config.write_multiple,
                    )
            except _REQUEST_FAILURES as exc:
                # The write may or may not have been applied: never resend, read back later.
                link.stats.errors += 1
                outcome = f"no answer to the write ({failure_reason(exc)})"
                await link.settle_after_failure(client)
            else:
                if response.isError():
                    link.stats.errors += 1
                    raise DriverFault(
                        f"{self.config.name}/{tag.name}: write refused: "
                        f"{exception_text(exception_code(response))}"
                    )
            finally:
                await link.quiet(self.config.frame_gap)
        return outcome

    async def _verify_write(
        self, tag: ModbusTagConfig, value: JsonValue, raw: Value, outcome: str | None
    ) -> JsonValue:
        """Read the tag back: the write succeeded only if the device holds the written value."""
        name = f"{self.config.name}/{tag.name}"
        try:
            read_back = await self.read_tag(tag.name)
        except DriverUnavailable as exc:
            raise WriteUnverified(f"{name}: cannot read back: {exc}") from None
        expected = scale_value(raw, tag.scale, tag.offset) if not isinstance(raw, str) else raw
        if read_back.quality != "good" or not tag.same_value(read_back.value, expected):
            detail = outcome or "read-back differs"
            raise WriteUnverified(
                f"{name}: wrote {value!r}, read back {read_back.value!r} ({detail})",
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
