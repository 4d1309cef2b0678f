"""The central side (`edge-agent ingest`'s library): batch parsing, PostgreSQL commits, the
ingest service, partitions and their maintenance, schema (docs/central.md).
"""
