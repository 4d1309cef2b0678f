"""The device's subscription: created with its monitored items on each connection, consumed as
a stream of reading batches (docs/opcua.md, "Subscribe and poll" and "Connection, reconnect
and stalls").

* asyncua's low-level service call with a plain callback is used instead of its
  ``Subscription`` class: the handler class creates a task per notification, the iterator
  class a queue item per notification (a queue of 1,000 that silently drops the oldest). The
  callback here turns one PublishResponse into one ``list[Reading]`` and puts it on a small
  bounded queue; when the consumer lags, the callback waits, asyncua's publish loop stops
  asking for more and the server's per-item queues (``queue_size``, discard oldest) absorb it.
  Nothing is dropped on the client side.
* Stall detection: the subscription asks for a keep-alive at least every second or so; the
  stream raises ``DriverUnavailable`` when neither data nor a keep-alive arrived within
  ``max(3 x keep-alive period, timeout) + 1 s`` (counted while the consumer waits, so that
  a busy agent does not mistake its own delay for a silent server). asyncua's session
  watchdog reports a lost or hung connection as a BadShutdown status change, which ends the
  stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Final

from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.status_codes import StatusCodes

from drivers.base import DriverUnavailable, Reading
from drivers.opcua.config import OpcUaDeviceConfig, OpcUaTagConfig
from drivers.opcua.nodes import NodeTypes
from drivers.opcua.values import NUMERIC_TYPES, make_reading, status_name

log = logging.getLogger("edge_agent.opcua")

_BATCH: Final = 1000  # monitored items per CreateMonitoredItems call (PLCs limit it)
_QUEUE_BATCHES: Final = 8  # PublishResponses buffered before the publish loop waits


class ReadingStream:
    """What ``subscriptions()`` returns: one ``list[Reading]`` per PublishResponse.

    A class rather than an async generator, so that a consumer cancelled mid-iteration leaves
    nothing for asyncio to finalise in a background task.
    """

    def __init__(self, url: str, handles: dict[int, str], stall_after: float) -> None:
        self.url = url
        self.handles = handles
        self.stall_after = stall_after
        self.last_activity = time.monotonic()
        self.publishes = 0
        self.notifications = 0
        self._queue: asyncio.Queue[list[Reading] | None] = asyncio.Queue(_QUEUE_BATCHES)
        self._failure: str | None = None

    async def on_publish(self, result: ua.PublishResult) -> None:
        """asyncua's publish-loop callback (data, keep-alives and status changes)."""
        self.last_activity = time.monotonic()
        self.publishes += 1
        data = result.NotificationMessage.NotificationData
        if not data:
            return  # keep-alive
        received = time.time()
        handles = self.handles
        readings: list[Reading] = []
        for notification in data:
            if isinstance(notification, ua.DataChangeNotification):
                for item in notification.MonitoredItems:
                    tag = handles.get(item.ClientHandle)
                    if tag is not None:
                        readings.append(make_reading(tag, item.Value, received))
            elif isinstance(notification, ua.StatusChangeNotification):
                # The subscription is gone: asyncua's session watchdog saw the connection die
                # or the server stop answering (it reports BadShutdown), or the server ended it.
                code = notification.Status.value
                if code == StatusCodes.BadShutdown:
                    self.fail("connection lost or the server stopped answering")
                else:
                    self.fail(f"subscription ended by the server ({status_name(code)})")
        if readings:
            self.notifications += len(readings)
            # Backpressure: while the queue is full the publish loop waits here and stops
            # asking the server for more; the server's monitored-item queues hold the rest.
            await self._queue.put(readings)
            self.last_activity = time.monotonic()

    def put_nowait(self, readings: list[Reading]) -> None:
        """Queue readings produced locally (items the server refused)."""
        if readings:
            self._queue.put_nowait(readings)

    def fail(self, reason: str) -> None:
        """End the iteration with DriverUnavailable(reason) after what is queued."""
        if self._failure is None:
            self._failure = reason
            # If the queue is full the consumer is busy and finds the failure after it.
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(None)

    def __aiter__(self) -> ReadingStream:
        return self

    async def __anext__(self) -> list[Reading]:
        # The stall clock runs only while the consumer waits: a consumer that was busy (and
        # so held the publish loop back) must not mistake its own delay for a silent server.
        waiting_since = time.monotonic()
        while True:
            if self._queue.empty():
                if self._failure is not None:
                    raise DriverUnavailable(f"{self.url}: {self._failure}")
                since = max(self.last_activity, waiting_since)
                remaining = since + self.stall_after - time.monotonic()
                if remaining <= 0:
                    raise DriverUnavailable(
                        f"{self.url}: no publish response or keep-alive for "
                        f"{self.stall_after:.1f} s (server stalled?)"
                    )
                try:
                    async with asyncio.timeout(remaining):
                        item = await self._queue.get()
                except TimeoutError:
                    continue  # re-check: a keep-alive may have arrived meanwhile
            else:
                item = self._queue.get_nowait()
            if item is None:
                raise DriverUnavailable(f"{self.url}: {self._failure or 'subscription closed'}")
            return item


async def subscribe(
    client: Client,
    config: OpcUaDeviceConfig,
    tags: Sequence[OpcUaTagConfig],
    nodes: Mapping[str, ua.NodeId],
    types: NodeTypes,
) -> ReadingStream:
    """One subscription for the device; monitored items with sampling interval, queue
    size and, for numeric nodes, the tag's deadband as an absolute DataChangeFilter."""
    handles = {index: tag.name for index, tag in enumerate(tags, start=1)}
    stream = ReadingStream(config.url, handles, stall_after=60.0)
    deadline = config.timeout * 3 + 2.0
    numeric = await _numeric_deadband_tags(client, tags, nodes, types)
    async with asyncio.timeout(deadline):
        result = await client.uaclient.create_subscription(
            _subscription_parameters(config), stream.on_publish
        )
    # The server sends something (data or a keep-alive) at least every keep-alive period.
    keepalive_s = (
        result.RevisedPublishingInterval / 1000.0 * max(1, int(result.RevisedMaxKeepAliveCount))
    )
    stream.stall_after = max(3 * keepalive_s, config.timeout) + 1.0
    stream.last_activity = time.monotonic()
    items = [
        (handle, _item_request(handle, tag, nodes[tag.name], tag.name in numeric))
        for handle, tag in enumerate(tags, start=1)
    ]
    refused: list[Reading] = []
    for start in range(0, len(items), _BATCH):
        chunk = items[start : start + _BATCH]
        request = ua.CreateMonitoredItemsParameters(
            SubscriptionId=result.SubscriptionId,
            TimestampsToReturn=ua.TimestampsToReturn.Both,
            ItemsToCreate=[item for _, item in chunk],
        )
        async with asyncio.timeout(deadline):
            results = await client.uaclient.create_monitored_items(request)
        now = time.time()
        for (handle, _), item_result in zip(chunk, results, strict=True):
            if not item_result.StatusCode.is_good():
                code = status_name(item_result.StatusCode.value)
                refused.append(Reading(handles[handle], None, "bad", now, code))
    if refused:
        log.warning(
            "device %s: %d monitored item(s) refused (%s: %s)",
            config.name,
            len(refused),
            refused[0].tag,
            refused[0].error,
        )
        stream.put_nowait(refused)
    return stream


def _subscription_parameters(config: OpcUaDeviceConfig) -> ua.CreateSubscriptionParameters:
    interval_ms = config.publishing_interval * 1000.0
    # A keep-alive at least every second or so (or every publishing interval if slower):
    # that is what makes a hung server visible.
    keepalive = max(1, math.ceil(1000.0 / interval_ms))
    lifetime = max(3 * keepalive, math.ceil(config.session_timeout * 1000.0 / interval_ms))
    return ua.CreateSubscriptionParameters(
        RequestedPublishingInterval=interval_ms,
        RequestedLifetimeCount=min(lifetime, 0xFFFF_FFFF),
        RequestedMaxKeepAliveCount=keepalive,
        # Bounds the work of one PublishResponse after a backlog (the server then sets
        # MoreNotifications and answers the next Publish at once).
        MaxNotificationsPerPublish=1000,
        PublishingEnabled=True,
        Priority=0,
    )


async def _numeric_deadband_tags(
    client: Client,
    tags: Sequence[OpcUaTagConfig],
    nodes: Mapping[str, ua.NodeId],
    types: NodeTypes,
) -> set[str]:
    """Tags with a deadband whose node has a numeric data type (one Read for all)."""
    names = [tag.name for tag in tags if tag.deadband is not None]
    if not names:
        return set()
    await types.read(client, nodes, names)
    numeric: set[str] = set()
    for name in names:
        node_type = types.get(name)
        if node_type is not None and node_type[0] in NUMERIC_TYPES:
            numeric.add(name)
    return numeric


def _item_request(
    handle: int, tag: OpcUaTagConfig, node: ua.NodeId, numeric: bool
) -> ua.MonitoredItemCreateRequest:
    parameters = ua.MonitoringParameters(
        ClientHandle=handle,
        SamplingInterval=tag.sampling_interval * 1000.0,
        QueueSize=tag.queue_size,
        DiscardOldest=True,
    )
    if tag.deadband is not None and numeric:
        # Servers refuse a deadband on a non-numeric node: only numeric nodes get the filter.
        parameters.Filter = ua.DataChangeFilter(
            Trigger=ua.DataChangeTrigger.StatusValue,
            DeadbandType=ua.DeadbandType.Absolute,
            DeadbandValue=float(tag.deadband),
        )
    return ua.MonitoredItemCreateRequest(
        ItemToMonitor=ua.ReadValueId(NodeId=node, AttributeId=AttributeIds.Value),
        MonitoringMode=ua.MonitoringMode.Reporting,
        RequestedParameters=parameters,
    )
