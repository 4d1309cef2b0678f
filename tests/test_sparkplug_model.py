"""sync/sparkplug/model.py: aliases in config order and the metrics an event changes (pure)."""

from __future__ import annotations

import pytest

from sync.events import Event
from sync.sparkplug.codec import DataType, MetricValue
from sync.sparkplug.model import (
    MACHINE_METRICS,
    NODE_METRICS,
    QUALITY_CODES,
    DeviceModel,
    NodeModel,
    TagModel,
    devices_of,
    metric_updates,
    ms,
    quality_property,
    scalar,
)

MODEL = NodeModel(
    group_id="plant1",
    edge_node_id="line3",
    primary_host_id=None,
    version="1.0",
    devices=(
        DeviceModel("press1", (TagModel("count", DataType.UINT32), TagModel("name", None))),
        DeviceModel("press2", (TagModel("count", DataType.UINT32),)),
    ),
    machines=("assembly",),
)


def test_aliases_follow_the_node_metrics_in_config_order() -> None:
    devices = devices_of(MODEL)
    first = 3 + len(NODE_METRICS)
    assert [m.alias for m in devices["press1"].metrics.values()] == [first, first + 1]
    assert [m.alias for m in devices["press2"].metrics.values()] == [first + 2]
    machine = devices["assembly"]
    assert machine.machine
    assert [m.name for m in machine.metrics.values()] == [name for name, _ in MACHINE_METRICS]
    assert [m.alias for m in machine.metrics.values()] == list(
        range(first + 3, first + 3 + len(MACHINE_METRICS))
    )


@pytest.mark.parametrize(
    ("device", "event", "expected"),
    [
        ("press1", Event(1.0, "sample", "press1", "count", 7, "good"), [("count", 7, "good")]),
        ("press1", Event(1.0, "sample", "press1", "count", 7, None), [("count", 7, "good")]),
        (
            "press1",
            Event(1.0, "sample", "press1", "name", [1, 2], "bad"),
            [("name", "[1,2]", "bad")],
        ),
        ("press1", Event(1.0, "sample", "press1", "unknown", 7, "good"), []),
        ("press1", Event(1.0, "state", "press1", "state", {"state": "running"}), []),
        (
            "assembly",
            Event(1.0, "state", "assembly", "state", {"state": "running", "code": 2}, "good"),
            [("State", "running", "good"), ("State Code", 2, "good")],
        ),
        (
            "assembly",
            Event(1.0, "oee", "assembly", "oee", {"oee": 1, "quality": True, "other": 3}),
            [("OEE/Quality", None, "good"), ("OEE/OEE", 1.0, "good")],
        ),
        ("assembly", Event(1.0, "sample", "assembly", "State", 1, "good"), []),
        ("assembly", Event(1.0, "oee", "assembly", "oee", "not a record"), []),
        ("assembly", Event(1.0, "gap", "assembly", None, {"count": 1}), []),
    ],
)
def test_metric_updates(
    device: str, event: Event, expected: list[tuple[str, MetricValue, str]]
) -> None:
    state = devices_of(MODEL)[device]
    got = [(metric.name, value, quality) for metric, value, quality in metric_updates(state, event)]
    assert got == expected


def test_small_helpers() -> None:
    assert ms(0) == 0
    assert ms(1.0005) == 1001
    assert scalar({"a": 1}) == '{"a":1}'
    assert quality_property("uncertain") == (
        ("Quality", DataType.INT32, QUALITY_CODES["uncertain"]),
    )
    assert quality_property(None)[0][2] == 0
