"""Sparkplug B 3.0: the payload codec, topic names, the persisted bdSeq (docs/sparkplug.md).
The edge node itself is an uplink: sync/uplink/sparkplug/."""
