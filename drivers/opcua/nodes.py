"""The device's nodes on the server: NodeIds resolved once per connection, and each node's data
type (variant type and whether it holds an array), read before its first write or deadband."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any, cast

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.node import Node
from asyncua.common.ua_utils import data_type_to_variant_type
from asyncua.ua.attribute_ids import AttributeIds

from drivers.opcua.config import OpcUaDeviceConfig

log = logging.getLogger("edge_agent.opcua")

NodeType = tuple[ua.VariantType, bool | None]  # variant type, array (None: either)


def _node_id(identifier: Any, namespace: int, kind: ua.NodeIdType) -> ua.NodeId:
    return ua.NodeId(identifier, cast(ua.Int16, namespace), kind)


async def resolve_nodes(client: Client, config: OpcUaDeviceConfig) -> dict[str, ua.NodeId]:
    """NodeIds of every tag; ``nsu=`` namespace URIs looked up in the server's array."""
    parsed: dict[str, ua.NodeId] = {}
    namespaces: list[str] | None = None
    for tag in config.tags:
        node = ua.NodeId.from_string(tag.node_id)
        if isinstance(node, ua.ExpandedNodeId) and node.NamespaceUri:
            if namespaces is None:
                async with asyncio.timeout(config.timeout + 1.0):
                    namespaces = await client.get_namespace_array()
            if node.NamespaceUri in namespaces:
                index = namespaces.index(node.NamespaceUri)
            else:
                log.warning(
                    "device %s tag %s: the server has no namespace %s",
                    config.name,
                    tag.name,
                    node.NamespaceUri,
                )
                index = 0xFFFF  # no such namespace: the server answers BadNodeIdUnknown
            node = _node_id(node.Identifier, index, node.NodeIdType)
        parsed[tag.name] = _node_id(node.Identifier, node.NamespaceIndex, node.NodeIdType)
    return parsed


def _is_array(rank: Any) -> bool | None:
    """From a ValueRank: -1 scalar, >= 0 array (0: one or more dimensions), -2 any and -3
    scalar or one dimension: either (decided by the value written)."""
    if not isinstance(rank, int) or rank in (-2, -3):
        return None
    return rank >= 0


class NodeTypes:
    """The data type of each tag's node, read once per connection and cached by tag name."""

    def __init__(self, *, timeout: float) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._timeout = timeout
        self._types: dict[str, NodeType] = {}

    def get(self, tag: str) -> NodeType | None:
        """The cached type of ``tag``'s node; None when unknown."""
        return self._types.get(tag)

    def forget(self, tag: str) -> None:
        """Drop ``tag``'s cached type (the node's type changed: read it again)."""
        self._types.pop(tag, None)

    async def read(
        self, client: Client, nodes: Mapping[str, ua.NodeId], tags: Iterable[str]
    ) -> None:
        """Read DataType and ValueRank of ``tags`` not yet known, in one call."""
        todo = [tag for tag in tags if tag not in self._types]
        if not todo:
            return
        request = ua.ReadParameters(
            NodesToRead=[
                ua.ReadValueId(NodeId=nodes[tag], AttributeId=attribute)
                for tag in todo
                for attribute in (AttributeIds.DataType, AttributeIds.ValueRank)
            ]
        )
        async with asyncio.timeout(self._timeout + 1.0):
            results = await client.uaclient.read(request)
        for index, tag in enumerate(todo):
            node_type = await self._node_type(client, results[2 * index], results[2 * index + 1])
            if node_type is not None:
                self._types[tag] = node_type

    async def _node_type(
        self, client: Client, dtype_value: ua.DataValue, rank_value: ua.DataValue
    ) -> NodeType | None:
        """A node's type from its DataType and ValueRank; None when unknown or not a value type."""
        if dtype_value.StatusCode is not None and not dtype_value.StatusCode.is_good():
            return None
        dtype = _value_of(dtype_value)
        if not isinstance(dtype, ua.NodeId):
            return None
        vtype = await self._variant_type(client, dtype)
        if vtype is None:
            return None
        return vtype, _is_array(_value_of(rank_value))

    async def _variant_type(self, client: Client, dtype: ua.NodeId) -> ua.VariantType | None:
        identifier = dtype.Identifier
        if dtype.NamespaceIndex == 0 and isinstance(identifier, int) and 1 <= identifier <= 21:
            return ua.VariantType(identifier)  # built-in types: DataType id = variant type
        # A derived type (UtcTime, Duration, an enumeration, ...): follow its supertypes.
        async with asyncio.timeout(self._timeout * 3 + 1.0):
            vtype = await data_type_to_variant_type(Node(client.uaclient.session, dtype))
        vtypes = ua.VariantType
        return None if vtype in (vtypes.Variant, vtypes.Null, vtypes.ExtensionObject) else vtype


def _value_of(result: ua.DataValue) -> Any:
    """The attribute value of a Read result (None when it has none)."""
    return result.Value.Value if result.Value is not None else None
