"""Sparkplug B 3.0 topic names (spec 3.0, "Topic Namespace Elements"), pure."""

from __future__ import annotations

from typing import Literal

NAMESPACE = "spBv1.0"
NodeMessage = Literal["NBIRTH", "NDEATH", "NDATA", "NCMD"]
DeviceMessage = Literal["DBIRTH", "DDEATH", "DDATA", "DCMD"]


def node_topic(group: str, message: NodeMessage, node: str) -> str:
    """spBv1.0/{group}/{message}/{node}."""
    return f"{NAMESPACE}/{group}/{message}/{node}"


def device_topic(group: str, message: DeviceMessage, node: str, device: str) -> str:
    """spBv1.0/{group}/{message}/{node}/{device}."""
    return f"{NAMESPACE}/{group}/{message}/{node}/{device}"


def state_topic(host: str) -> str:
    """spBv1.0/STATE/{host}: a primary host application's retained online/offline state."""
    return f"{NAMESPACE}/STATE/{host}"
