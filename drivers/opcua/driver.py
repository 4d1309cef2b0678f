"""OPC UA driver (asyncua client): connect, batched polling, verified writes (docs/opcua.md).

A driver instance is one connection: a fresh asyncua ``Client`` per connect (built and closed
in ``client.py``), secured with the pinned server certificate (``security.py``), with one
subscription for the subscribe-mode tags (``subscription.py``); values are converted in
``values.py``. A client that lost its connection is never reused: the poller closes the
driver and builds a new one, which re-creates the subscription. Reads and writes run under a
deadline.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaStatusCodeError

from drivers.base import (
    Driver,
    DriverContext,
    DriverError,
    DriverFault,
    DriverUnavailable,
    JsonValue,
    Reading,
    WriteUnverified,
)
from drivers.config import DeviceConfigBase, TagConfigBase
from drivers.opcua.browse import BrowseLimits, Browser
from drivers.opcua.browse_text import BrowseResult
from drivers.opcua.client import connect_error, new_client, shutdown
from drivers.opcua.config import OpcUaDeviceConfig, OpcUaTagConfig
from drivers.opcua.nodes import NodeType, NodeTypes, resolve_nodes
from drivers.opcua.security import check_server_certificate, prepare_security
from drivers.opcua.subscription import ReadingStream, subscribe
from drivers.opcua.values import make_reading, status_code, status_name, to_variant


class OpcUaDriver(Driver):
    """An OPC UA server: one subscription for subscribe-mode tags, one batched Read per poll
    for poll-mode tags, verified writes converted to each node's data type."""

    config: OpcUaDeviceConfig

    def __init__(self, config: DeviceConfigBase, context: DriverContext | None = None) -> None:
        if not isinstance(config, OpcUaDeviceConfig):
            raise TypeError("OpcUaDriver needs an OpcUaDeviceConfig")
        super().__init__(config, context)
        self._application_uri = (
            self.context.application_uri or f"urn:edge-agent:{socket.gethostname()}"
        )
        self._poll = tuple(tag for tag in config.tags if tag.mode == "poll")
        self._subscribed = tuple(tag for tag in config.tags if tag.mode == "subscribe")
        self._client: Client | None = None
        self._nodes: dict[str, ua.NodeId] = {}
        self._types = NodeTypes(timeout=config.timeout)
        self._poll_request: ua.ReadParameters | None = None
        self._stream: ReadingStream | None = None
        self.reads = 0
        self.writes = 0

    # -- connection ------------------------------------------------------------------------

    @property
    def security_label(self) -> str:
        """``None`` or ``Basic256Sha256/SignAndEncrypt``."""
        if self.config.security_mode == "None":
            return "None"
        return f"{self.config.security_policy}/{self.config.security_mode}"

    async def connect(self) -> None:
        """Connect, open a session, resolve node ids and create the subscription."""
        config = self.config
        security = None
        if config.security_mode != "None":
            security = await prepare_security(config, self.context, self._application_uri)
            await check_server_certificate(config, security)
        client = new_client(
            config, security.application_uri if security is not None else self._application_uri
        )
        self._client = client
        try:
            if security is not None:
                await security.apply(client)
            # socket, hello, secure channel, session, activation: each bounded by asyncua's
            # request timeout; this is the backstop.
            async with asyncio.timeout(config.timeout * 5 + 2.0):
                await client.connect()
            self._nodes = await resolve_nodes(client, config)
            self._poll_request = _read_request(self._nodes, self._poll)
            if self._subscribed:
                self._stream = await subscribe(
                    client, config, self._subscribed, self._nodes, self._types
                )
        except DriverError:
            raise
        except Exception as exc:
            raise connect_error(config, exc) from None

    async def close(self) -> None:
        """Bounded teardown: CloseSession if the server answers, then tasks and socket."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.fail("connection closed")
        client, self._client = self._client, None
        if client is not None:
            await shutdown(client, self.config.timeout + 1.0)

    def _require_client(self) -> Client:
        if self._client is None:
            raise DriverUnavailable(f"{self.config.url}: not connected")
        return self._client

    # -- reading ---------------------------------------------------------------------------

    @property
    def polled_tags(self) -> tuple[TagConfigBase, ...]:
        """Tags with mode = "poll" (read() covers only these)."""
        return self._poll

    def subscriptions(self) -> AsyncIterator[list[Reading]] | None:
        """Readings of the subscribe-mode tags, one list per PublishResponse; raises
        DriverUnavailable when the subscription ends or the server stalls."""
        return self._stream

    async def _read(self, request: ua.ReadParameters) -> list[ua.DataValue]:
        client = self._require_client()
        url = self.config.url
        try:
            # asyncua's own request timeout (config.timeout) normally fires first.
            async with asyncio.timeout(self.config.timeout + 1.0):
                results = await client.uaclient.read(request)
        except TimeoutError:
            raise DriverUnavailable(
                f"{url}: no answer to Read within {self.config.timeout:g} s"
            ) from None
        except OSError as exc:
            raise DriverUnavailable(f"{url}: connection lost ({exc})") from None
        except UaStatusCodeError as exc:
            raise DriverUnavailable(f"{url}: Read failed: {status_name(int(exc.code))}") from None
        self.reads += 1
        return results

    async def read(self) -> list[Reading]:
        """One batched Read (one service call) of every poll-mode tag."""
        if not self._poll:
            return []
        request = self._poll_request
        if request is None:
            raise DriverUnavailable(f"{self.config.url}: not connected")
        results = await self._read(request)
        received = time.time()
        # A server that answers fewer values than asked gives the missing tags "no value".
        return [
            make_reading(tag.name, results[index] if index < len(results) else None, received)
            for index, tag in enumerate(self._poll)
        ]

    async def read_tag(self, tag: str) -> Reading:
        """Read one tag now, whatever its mode."""
        config = self._tag(tag)
        if tag not in self._nodes:
            raise DriverUnavailable(f"{self.config.url}: not connected")
        results = await self._read(_read_request(self._nodes, [config]))
        return make_reading(tag, results[0] if results else None, time.time())

    def _tag(self, name: str) -> OpcUaTagConfig:
        tag = self.tag_config(name)
        assert isinstance(tag, OpcUaTagConfig)  # the config model holds only OpcUaTagConfigs
        return tag

    async def browse(self, start: str, limits: BrowseLimits) -> BrowseResult:
        """The address space below the node ``start`` (``edge-agent browse``), bounded."""
        browser = Browser(self._require_client(), url=self.config.url, timeout=self.config.timeout)
        return await browser.run(start, limits)

    # -- writing ---------------------------------------------------------------------------

    async def _node_type(self, tag: str) -> NodeType:
        """The node's data type, read before the first write to it on this connection."""
        client = self._require_client()
        name = f"{self.config.name}/{tag}"
        try:
            await self._types.read(client, self._nodes, [tag])
        except TimeoutError:
            raise DriverUnavailable(f"{name}: no answer reading the data type") from None
        except OSError as exc:
            raise DriverUnavailable(f"{self.config.url}: connection lost ({exc})") from None
        except UaStatusCodeError as exc:
            raise DriverFault(
                f"{name}: cannot read the data type: {status_name(int(exc.code))}"
            ) from None
        node_type = self._types.get(tag)
        if node_type is None:
            raise DriverFault(f"{name}: cannot determine the node's data type")
        return node_type

    async def _write(self, tag: str, value: JsonValue) -> JsonValue:
        """Convert to the node's data type, write once, read back and compare."""
        config = self._tag(tag)
        name = f"{self.config.name}/{tag}"
        vtype, array = await self._node_type(tag)
        try:
            variant, expected = to_variant(value, vtype, array)
        except (ValueError, TypeError) as exc:
            raise DriverFault(f"{name}: {exc}") from None
        outcome = await self._write_once(tag, variant)
        try:
            read_back = await self.read_tag(tag)
        except DriverUnavailable as exc:
            raise WriteUnverified(f"{name}: cannot read back: {exc}") from None
        if read_back.quality != "good" or not config.same_value(read_back.value, expected):
            detail = outcome or "read-back differs"
            raise WriteUnverified(
                f"{name}: wrote {value!r}, read back {read_back.value!r} ({detail})",
                read_back=read_back.value,
            )
        return read_back.value

    async def _write_once(self, tag: str, variant: ua.Variant) -> str | None:
        """One Write (never resent); DriverFault if refused, else None or, when its outcome
        is unknown, why (the read-back settles it)."""
        name = f"{self.config.name}/{tag}"
        client = self._require_client()
        request = ua.WriteParameters(
            NodesToWrite=[
                ua.WriteValue(
                    NodeId=self._nodes[tag],
                    AttributeId=AttributeIds.Value,
                    # No status, no timestamps: many PLCs refuse writes that carry them.
                    Value=ua.DataValue(variant, StatusCode=None),
                )
            ]
        )
        self.writes += 1
        try:
            async with asyncio.timeout(self.config.timeout + 1.0):
                results = await client.uaclient.write(request)
        except TimeoutError:
            return "no answer to the write"  # applied or not: the read-back settles it
        except OSError as exc:
            return f"connection lost during the write ({exc})"
        except UaStatusCodeError as exc:
            raise DriverFault(f"{name}: write refused: {status_name(int(exc.code))}") from None
        status = results[0] if results else status_code(StatusCodes.BadUnexpectedError)
        if not status.is_good():
            if status.value == StatusCodes.BadTypeMismatch:
                self._types.forget(tag)  # the node's type changed: read it again
            raise DriverFault(f"{name}: write refused: {status_name(status.value)}")
        return None

    @property
    def state_detail(self) -> dict[str, Any]:
        """Subscription and request counters."""
        detail: dict[str, Any] = {
            "security": self.security_label,
            "subscribed_items": len(self._subscribed),
            "polled_items": len(self._poll),
            "reads": self.reads,
            "writes": self.writes,
        }
        stream = self._stream
        if stream is not None:
            detail.update(
                publishes=stream.publishes,
                notifications=stream.notifications,
                last_publish_age_s=round(time.monotonic() - stream.last_activity, 3),
            )
        return detail


def _read_request(
    nodes: Mapping[str, ua.NodeId], tags: Sequence[OpcUaTagConfig]
) -> ua.ReadParameters:
    """One Read of the tags' values, fresh from the device, with both timestamps."""
    return ua.ReadParameters(
        MaxAge=0,
        TimestampsToReturn=ua.TimestampsToReturn.Both,
        NodesToRead=[
            ua.ReadValueId(NodeId=nodes[tag.name], AttributeId=AttributeIds.Value) for tag in tags
        ],
    )
