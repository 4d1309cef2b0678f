"""Uplinks: the Sink protocol and its sinks (live JSON topics, the S/sync forwarder), topic
names and payloads.
"""
